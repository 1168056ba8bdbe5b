"""`chat`: one reply from a run's tuned model (or its base with --base), or from any model."""
from __future__ import annotations

import json

HELP = "Generate a reply: chat (--run RUN_DIR | --model REF) --prompt TEXT [--base] [--raw] [--greedy] [--json]."


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (loads its base model and adapter)")
    src.add_argument("--model", help="model reference (preset, folder, hub id) without adapter")
    p.add_argument("--checkpoint", help="a checkpoints/step-N folder of the run instead of the final adapter")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--base", action="store_true", help="disable the adapter (the base model answers)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, no chat template")
    p.add_argument("--greedy", action="store_true", help="no sampling: always the most likely token")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="auto, cpu, cuda or mps (default: the run's setting)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="weights' dtype while chatting with a run (auto: as it trained; bfloat16 is faster on a CPU "
                        "with bf16 hardware)")
    p.add_argument("--json", action="store_true", help="print one JSON object with a `reply` field")


def run(args) -> int:
    from ..chat import ChatModel, GenerationSettings
    from ..config import ModelConfig
    if args.run:
        chat = ChatModel.from_run(args.run, args.checkpoint, device=args.device, merge=not args.base,
                                  dtype=args.dtype)
    else:
        chat = ChatModel.from_model(ModelConfig(name=args.model, device=args.device or "auto"))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  do_sample=not args.greedy, seed=args.seed)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    if args.json:
        reply = chat.reply(messages, settings, use_adapter=not args.base, raw=args.raw)
        print(json.dumps({"reply": reply, "model": chat.label, "adapter": chat.has_adapter and not args.base,
                          "merged": chat.merged is not None}))
        return 0
    for piece in chat.stream(messages, settings, use_adapter=not args.base, raw=args.raw):
        print(piece, end="", flush=True)
    print()
    return 0
