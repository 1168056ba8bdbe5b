"""How far a bf16-autocast loss curve strays from the fp32 one, ours and peft's: a method on every linear layer
of a 2-layer random model of a preset's shape (on CUDA when there is one), the same batch each step, AdamW at
lr 1e-4 (a small first update, as B or a factor leaves zero). Where an engine adds the adapter's small update to
a base output already rounded to bf16, most of it is lost and the curve falls behind.

    python -m baselines.bf16_curves [--shape gemma-3-270m] [--methods lora,loha,lokr,dora,ia3,adalora,ssf,adapter] [--steps 6]

One JSON line per (method, engine): its bf16 losses, its fp32 losses and the largest gap between them (methods peft
lacks, such as SSF and the bottleneck adapters: ours only).
"""
from __future__ import annotations

import argparse
import json

import torch

LR = 1e-4
FIELDS = {"lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}, "loha": {"r": 8, "alpha": 8},
          "lokr": {"r": 8, "alpha": 8},
          # no budget steps or orthogonality term in these few steps: the update's rounding alone
          "adalora": {"init_r": 12, "target_r": 8, "lora_alpha": 32, "orth_reg_weight": 0.0, "total_step": 100},
          "dora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "use_dora": True},
          "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}}
PEFT_CONFIG = {"lora": "LoraConfig", "dora": "LoraConfig", "loha": "LoHaConfig", "lokr": "LoKrConfig",
               "adalora": "AdaLoraConfig", "ia3": "IA3Config"}


def curve(shape_config: dict, method: str, engine: str, dtype: torch.dtype, steps: int,
          device: torch.device) -> list[float]:
    """The losses of `steps` training steps of one engine on the shape's 2-layer model in dtype."""
    from studio.attention import model_batch
    from studio.losses import causal_lm_loss
    from studio.memory_bench import random_batch
    from studio.methods import apply_method, method_config
    from studio.models import build_random_model
    from studio.step_copies import StepCopies
    from studio.trainer import build_optimizer

    with torch.device(device):
        model = build_random_model(shape_config, seed=0, dtype=dtype)
    model.requires_grad_(False).train()
    batch = random_batch(shape_config["vocab_size"], 2, 128, device)
    copies = None
    if engine == "peft":
        import peft
        kind = getattr(peft, PEFT_CONFIG[method])
        model = peft.get_peft_model(model, kind(**{"target_modules": "all-linear", **FIELDS.get(method, {})}))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)

        def loss_of(b):
            return model(**b).loss
    else:
        every = {"target_modules": "all-linear"} if method in PEFT_CONFIG else {}  # SSF's default; adapters have none
        info = apply_method(model, method_config({"name": method, **every, **FIELDS.get(method, {})}))
        opt = build_optimizer("adamw", info.method.optimizer_groups(model, LR, 0.0), LR, device)
        copies = StepCopies.for_model(model, dtype)  # as the trainer

        def loss_of(b):
            return causal_lm_loss(model, model_batch(b, model))[0]
    losses = []
    for _ in range(steps):
        if copies is not None:
            copies.refresh()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_of(batch)
        loss.backward()
        if copies is not None:
            copies.stale()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    return losses


def main() -> None:
    from studio.models import model_presets

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="gemma-3-270m")
    p.add_argument("--methods", default="lora,loha,lokr,dora,ia3")
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dict(model_presets()[a.shape]["config"])
    config["num_hidden_layers"] = 2
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:2]
    for method in a.methods.split(","):
        engines = ("peft", "studio") if method in PEFT_CONFIG else ("studio",)  # peft lacks e.g. the adapters
        for engine in engines:  # each against its own fp32 curve (AdaLoRA's engines draw their init apart)
            fp32 = curve(config, method, engine, torch.float32, a.steps, device)
            bf16 = curve(config, method, engine, torch.bfloat16, a.steps, device)
            gap = max(abs(x - y) for x, y in zip(bf16, fp32))
            print(json.dumps({"shape": a.shape, "method": method, "engine": engine, "device": device.type,
                              "lr": LR, "bf16_losses": bf16, "fp32_losses": fp32, "max_gap_to_fp32": round(gap, 4)}),
                  flush=True)


if __name__ == "__main__":
    main()
