#!/usr/bin/env bash
# Issue 8's follow-up GPU call (about 4 minutes): the small rows again (ours vs peft), where the step time goes
# (profiles grouped by input shape) and our compiled rows (whole-row vs steady-state peak).
# There (repo root, .whl carried): bash baselines/gpu_profile.sh   (writes into $OUT, or ./gpu-out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
timeout 95 python3 -m studio bench --quick --only qwen2.5-0.5b,qwen2.5-1.5b --out "$OUT/bench.jsonl" 2>&1 \
  | grep -v Warning > "$OUT/bench.log"
python3 baselines/bench_table.py "$OUT/bench.jsonl"
prof() { local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m baselines.profile_step "$@" --shapes --rows 60 2>&1 | grep -v "Warning\|warn\|USDT" \
    > "$OUT/profile-$name.txt"; head -1 "$OUT/profile-$name.txt"; }
prof 7b-lora-ckpt 45 qwen2.5-7b lora 4 2048 --ckpt
prof 0.5b-lora 25 qwen2.5-0.5b lora 4 1024
timeout 55 python3 -m studio bench --quick --compile --no-peft --only qwen2.5-0.5b \
  --out "$OUT/compiled.jsonl" 2>&1 | grep -v Warning > "$OUT/compiled.log"
python3 baselines/bench_table.py "$OUT/compiled.jsonl"
