"""Markdown tables of `python -m studio bench` JSON lines (speed rows, --chat rows and --memory rows), for issue notes.

    python baselines/bench_table.py bench.jsonl [memory.jsonl ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

GB = 1e9


def _gb(n: float | None) -> str:
    return f"{n / GB:.2f}" if n else ""


def _machine(r: dict) -> str:
    """One line naming where a row ran (rows from before bench recorded it have no device_name)."""
    cpu = f", {r['threads']} threads, bf16 hardware: {'yes' if r['bf16_hardware'] else 'no'}" if "threads" in r else ""
    return f"Device: {r['device_name']}{cpu}; torch {r['torch']}, transformers {r['transformers']}, peft {r['peft']}"


def _card_note(r: dict) -> str:
    """A fitted row run within its card's memory (studio/card_cap.py): what the card held, or that it ran out."""
    if not r.get("card_capped"):
        return ""
    if r.get("oom"):
        return ", capped: out of memory"
    return f", capped: {_gb(r['on_card_bytes'])} of {_gb(r['card_bytes'])} GB on the card"


def speed_table(rows: list[dict]) -> list[str]:
    out = ["| shape | method | batch x seq | ckpt | offload | engine | ms/step | tokens/s | MFU | peak GB "
           "| steady GB | reserved GB | est. GB | speed vs peft | memory vs peft | loss first/last |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or r.get("oom"):
            result = [f"error: {' '.join(r['error'][:80].split())}" if "error" in r else "out of memory"] + [""] * 9
        else:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
            speed = f"{r['speedup_vs_peft']:.2f}x" if "speedup_vs_peft" in r else ""
            mem = f"{r['memory_ratio_vs_peft']:.2f}x" if "memory_ratio_vs_peft" in r else ""
            loss = "/".join(str(v) for v in r.get("loss_first_last", []))
            ms = f"{r['ms_per_step']:,.0f}" + (f" (trainer {r['trainer_ms_per_step']:,.0f})"  # bench --trainer
                                               if r.get("trainer_ms_per_step") else "")
            result = [ms, f"{r['tokens_per_s']:,.0f}", mfu, _gb(r.get("peak_bytes")),
                      _gb(r.get("steady_peak_bytes")), _gb(r.get("reserved_bytes")), _gb(r.get("estimated_bytes")),
                      speed, mem, loss]
        engine = r["engine"] + (" (torch ops)" if r["engine"] == "studio" and r.get("triton") is False else "") \
            + (" (graphs)" if r.get("graphs") else "") \
            + (" (bnb dequant)" if r.get("nf4_kernel") is False else "")
        ckpt = "on" if r["grad_ckpt"] else "off"
        k, n = r.get("checkpointed_layers") or ("?", "?")
        if r.get("fit"):  # the fewest recomputed layers that fit that card
            ckpt = f"{k} of {n} layers (fit {r['fit']}{_card_note(r)})"
        elif r["grad_ckpt"] and r["engine"] == "studio" and k != n:  # the top layer kept where that is free
            ckpt = f"on ({k} of {n} layers)"
        if r.get("mlp_chunks") is False:  # bench --long-grid's A/B: the recomputed MLPs kept whole
            ckpt += ", MLP whole"
        method = r["method"] + (" (preset)" if r.get("preset") else "")  # bench --methods: the preset's settings
        cells = [r["shape"], method, f"{r['batch']}x{r['seq']}", ckpt,
                 "on" if r.get("offload") else "", engine, *result]
        out.append("| " + " | ".join(cells) + " |")
    return out


def chat_table(rows: list[dict]) -> list[str]:
    out = ["| shape | dtype | generating from | ms/token | tokens/s | same tokens |", "|---|---|---|---|---|---|"]
    names = {"base": "base", "unmerged": "adapter, unmerged", "merged": "adapter, merged",
             "base_swapped": "base (merged model, weights swapped back)"}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | | {names[r['variant']]} | {r['error']} | | |")
            continue
        out.append(f"| {r['shape']} | {r['dtype']} | {names[r['variant']]} | {r['ms_per_token']:.2f} "
                   f"| {r['tokens_per_s']:,.1f} | {'yes' if r['same_tokens'] else 'no'} |")
    return out


def memory_table(rows: list[dict]) -> list[str]:
    out = ["| shape | method | batch x seq | ckpt | offload | estimated GB | measured GB | estimate/measured "
           "| on card GB | estimate/on card |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") else ("out of memory" if r.get("oom") else r.get("error", ""))
        on_card = f"{r['ratio_on_card']:.3f}" if r.get("ratio_on_card") else ""
        out.append(f"| {r['shape']} | {r['method']} | {r['batch']}x{r['seq']} | {'on' if r['grad_ckpt'] else 'off'} "
                   f"| {'on' if r.get('offload') else ''} | {_gb(r.get('estimated_bytes'))} "
                   f"| {_gb(r.get('measured_bytes'))} | {ratio} | {_gb(r.get('on_card_bytes'))} | {on_card} |")
    return out


def main(paths: list[str]) -> int:
    for path in paths:
        if not Path(path).exists():
            continue
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]
        speed = [r for r in rows if "engine" in r]
        chat = [r for r in rows if r.get("what") == "chat"]
        memory = [r for r in rows if "engine" not in r and r.get("what") != "chat" and "grad_ckpt" in r]
        other = len(rows) - len(speed) - len(chat) - len(memory)  # e.g. graphs_check's curves: not bench rows
        print(f"\n{path}\n" + (f"\n({other} lines that are not bench rows left out)\n" if other else ""))
        machines = sorted({_machine(r) for r in rows if "device_name" in r})
        if machines:
            print("\n".join(machines) + "\n")
        print("\n".join((speed_table(speed) if speed else []) + (chat_table(chat) if chat else [])
                        + (memory_table(memory) if memory else [])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
