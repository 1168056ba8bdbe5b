#!/usr/bin/env bash
# The GPU checks of issue 8 as one script, for a machine with an NVIDIA GPU and no network (the device tool).
#
# Here (with network), once:   bash baselines/gpu_check.sh fetch     (wheels into .whl/, about 55 MB)
# There (repo root, .whl carried):  bash baselines/gpu_check.sh run      (writes into $OUT, or ./gpu-out)
# `run` installs the carried wheels (transformers as pinned, bitsandbytes for QLoRA rows, peft as the
# baseline) beside the machine's own torch, then: GPU facts, the quick speed grid (ours vs peft), the
# memory estimate against max_memory_allocated, and the full grid while time is left.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers==5.24.0 bitsandbytes==0.50.2 peft==0.21.2)

case "${1:-run}" in
fetch)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  ls -la .whl ;;
run)
  OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site || exit 1
  fi
  export PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
  } 2>&1 | tee "$OUT/facts.txt"
  timeout 330 python3 -m studio bench --quick --out "$OUT/bench.jsonl" 2>&1 | grep -v Warning | tee "$OUT/bench.log"
  timeout 150 python3 -m studio bench --memory --out "$OUT/memory.jsonl" 2>&1 | grep -v Warning | tail -40
  ;;
*) echo "usage: bash baselines/gpu_check.sh fetch|run" >&2; exit 2 ;;
esac
