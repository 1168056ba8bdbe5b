#!/usr/bin/env bash
# Issue 8's second GPU call: where the step time goes (profiles, ours vs peft) and our compiled rows.
# There (repo root, .whl carried): bash baselines/gpu_profile.sh   (writes into $OUT, or ./gpu-out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
prof() { timeout 45 python3 -m baselines.profile_step "$@" 2>&1 | grep -v "Warning\|warn\|USDT" >> "$OUT/profile.txt"; }
prof qwen2.5-0.5b lora 4 1024
prof qwen2.5-0.5b lora 4 1024 --engine peft
prof qwen2.5-0.5b full 4 1024
prof qwen2.5-0.5b full 4 1024 --engine peft
prof qwen2.5-7b lora 4 2048 --ckpt
grep "^==" "$OUT/profile.txt"
timeout "${COMPILE_S:-150}" python3 -m studio bench --quick --compile --no-peft --only qwen2.5-0.5b \
  --out "$OUT/compiled.jsonl" 2>&1 | grep -v Warning > "$OUT/compiled.log"
python3 baselines/bench_table.py "$OUT/compiled.jsonl"
tail -5 "$OUT/compiled.log"
