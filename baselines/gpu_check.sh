#!/usr/bin/env bash
# The GPU checks of issue 8 as one script, for a machine with an NVIDIA GPU and no network (the device tool).
#
# Here (with network), once:   bash baselines/gpu_check.sh fetch     (wheels into .whl/, about 55 MB)
# There (repo root, .whl carried):  bash baselines/gpu_check.sh run      (results.tar.gz in $OUT, or ./gpu-out)
# `run` installs the carried wheels (transformers as pinned, bitsandbytes for QLoRA rows, peft as the baseline)
# beside the machine's own torch, then, in this order: GPU facts; the 7B rows (ours vs peft); the 7B QLoRA rows
# with q/k/v and gate/up apart and the bias last (STUDIO_SIBLING_LORA=0 STUDIO_BIAS_FIRST=0), and with gate's and
# up's LoRA terms written out (STUDIO_TERMS_IN_GATED=0); the Triton kernel
# and CUDA rounding tests, how much of a small term CUDA's addmm keeps in its epilogue
# (baselines/epilogue_check.py), bitsandbytes' dequantization against the NF4 kernel's (baselines/dequant_ab.py),
# LoRA's product orders (baselines/lora_order_ab.py), the frozen GEMMs' forms (baselines/gemm_ab.py), a GEMM beside
# a memory-bound kernel on a second stream (baselines/overlap_ab.py); bench
# --graphs-grid's 7B rows (1x512 below auto's line, QLoRA 4x2048 above it; eager and replayed); chat speed (bench
# --chat: base, adapter unmerged, merged); train.cuda_graphs through the trainer (baselines/graphs_check.py: also
# LoRA dropout, AdaMix and diff pruning with checkpointing, and packed batches); the quick speed grid (ours as
# train.cuda_graphs=auto runs it, also eagerly, and with AB=1 without the Triton kernels); the quick grid's rows
# run by the trainer (bench --trainer); the same rows with expandable allocator segments; the memory estimate of
# every method against max_memory_allocated (bench --memory --methods); bench --long-grid; every capture-safe
# method captured for real (graphs_check --methods); bench --packed-grid; the Llama-3.2-1B row; bench --methods
# (every preset peft trains too); the 7B QLoRA rows with bitsandbytes' dequantization (STUDIO_NF4_KERNEL=0); bf16
# loss curves against fp32 (baselines/bf16_curves.py); a checkpointed torch dropout replayed from a graph
# (baselines/graph_rng_check.py); with AB=1 the recompute skip (baselines/recompute_ab.py); with MEMORY_S=N the
# memory estimate against max_memory_allocated for N seconds; then a summary table and the issue's targets, met or
# not (baselines/targets.py).
# Up to about 20 minutes without AB: one device call (timeout_s 590) reaches about graphs_check and keeps
# what the earlier stages wrote; a second call takes the rest (SKIP=7b,apart,terms,kernels,grid,chat,graphs,quick).
set -uo pipefail
cd "$(dirname "$0")/.."
want() { [[ ",${SKIP:-}," != *",$1,"* ]]; }
WHEELS=(transformers==5.24.0 bitsandbytes==0.50.2 peft==0.21.2)

case "${1:-run}" in
fetch)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  ls -la .whl ;;
run)
  OUT=${OUT:-gpu-out}; W=${WORK:-/tmp/gpu-work}; mkdir -p "$OUT" "$W"
  # the device tool brings back at most 8 files from $OUT: every stage writes into $W, packed into
  # $OUT/results.tar.gz every 20 s (renamed into place whole, so a call cut at its limit keeps the last pack)
  # (tar exits 1 when a stage was writing a file as it read it: the archive is whole, that file as far as written)
  pack() {
    tar -czf "$OUT/results.partial" -C "$W" . 2>/dev/null
    [ $? -le 1 ] && mv "$OUT/results.partial" "$OUT/results.tar.gz"
  }
  ( while sleep 20; do pack; done ) &
  packer=$!
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site || exit 1
  fi
  export PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
  } 2>&1 | tee "$W/facts.txt"
  # Stages in priority order, each time-boxed; a call's own limit may cut the last ones (each writes as it
  # goes). SKIP=name,name leaves stages out (a second call: SKIP=7b,apart,terms,kernels,grid,chat,graphs,quick). The 7B rows
  # come first: they decide the issue's open targets, and a session's device time may allow one call.
  # 7b: the 7B rows (MFU, checkpointing fitted to a 24 GB card, QLoRA in 24 GB, offloading last): six rows of
  # ours and two of peft's now (the 2026-11-28 run wrote its six 7B rows within 210 s); the rows fitted to an RTX 4090
  # run with the allocator capped at what that card leaves it (studio/card_cap.py): do they fit it, and how fast?
  want 7b && timeout 270 python3 -m studio bench --only qwen2.5-7b --out "$W/bench.jsonl" 2>&1 | grep -v Warning \
    | tee -a "$W/bench.log"
  # apart: the 7B QLoRA row at default settings (ours) without the changes of 2026-11-30's sessions: q/k/v and
  # gate/up apart (STUDIO_SIBLING_LORA=0, which also writes gate's and up's LoRA terms out) and q/k/v's bias added
  # last (STUDIO_BIAS_FIRST=0): ~28 ms a step by count
  want apart && STUDIO_SIBLING_LORA=0 STUDIO_BIAS_FIRST=0 timeout 100 python3 -m studio bench --no-peft \
    --only qwen2.5-7b:qlora:default --out "$W/bench_apart.jsonl" 2>&1 | grep -v Warning | tee "$W/bench_apart.log"
  # terms: the same row with gate's and up's LoRA terms written out before the base GEMMs add onto them
  # (STUDIO_TERMS_IN_GATED=0) instead of added by the gated kernels (studio/kernels/gated_terms.py): ~11 ms by count
  want terms && STUDIO_TERMS_IN_GATED=0 timeout 100 python3 -m studio bench --no-peft \
    --only qwen2.5-7b:qlora:default --out "$W/bench_terms.jsonl" 2>&1 | grep -v Warning | tee "$W/bench_terms.log"
  # kernels: the Triton kernels against the torch ops (NF4 dequantization against bitsandbytes), and the seeded
  # dropout, compiled for this card; DoRA, IA3 and SSF through CUDA's fp32-output GEMM, and a small update beside
  # a large bias (tests/test_update_rounding.py); norm outputs rebuilt by the Triton norm; a chunked MLP's seeded
  # masks (the whole batch's, from the chunk's first row); a step's numbers read late from pinned memory and
  # batches copied from it (tests/test_host_ahead.py); the joined q/k/v and gate/up op against the projections apart
  # (tests/test_sibling_lora.py); gate's and up's LoRA terms added by the gated kernels (tests/test_gated_terms.py)
  want kernels && timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
    tests/test_seeded_dropout.py tests/test_update_rounding.py tests/test_rebuilt_inputs.py \
    tests/test_chunked_mlp.py::test_seeded_dropout_takes_the_whole_batchs_masks tests/test_host_ahead.py \
    tests/test_sibling_lora.py tests/test_gated_terms.py 2>&1 | tail -40 | tee "$W/kernels.log"
  # the frozen GEMMs' forms at 7B shapes (onto the rank-r term as now, alone, F.linear, cuBLASLt; gate and up
  # joined): how far from the GEMM's own speed is the ~690 TFLOP/s a 7B QLoRA step's frozen GEMMs ran at?
  want kernels && timeout 60 python3 -m baselines.gemm_ab 2>&1 | grep '^{' | tee "$W/gemm_ab.jsonl"
  # a gate-sized GEMM with a memory-bound partner (NF4 dequantization, a rank-r term, act(gate)·up) on a second
  # stream: does the partner run in what the GEMM leaves free (worth a prefetching engine), or only after it?
  want kernels && timeout 60 python3 -m baselines.overlap_ab 2>&1 | grep '^{' | tee "$W/overlap_ab.jsonl"
  # how much of a small term CUDA's addmm keeps when it adds it in its epilogue (LoRA's fused op relies on it),
  # with cuBLAS's reduced-precision reductions allowed (torch's default) and not
  want kernels && timeout 30 python3 -m baselines.epilogue_check 2>&1 | grep '^{' | tee "$W/epilogue.jsonl"
  # a 7B layer's 4-bit weights dequantized by bitsandbytes (three launches) and by studio/kernels/nf4.py (one):
  # host and GPU time each (does the Triton launcher cost the host less than bitsandbytes' dispatches?)
  want kernels && timeout 60 python3 -m baselines.dequant_ab 2>&1 | grep '^{' | tee "$W/dequant_ab.jsonl"
  # LoRA's product orders at 7B shapes, and one wide GEMM ([x | low] @ [W | B]ᵀ; 0.91-0.95x on an H200, 2026-11-30)
  want kernels && timeout 30 python3 -m baselines.lora_order_ab 2>&1 | grep '^{' | tee "$W/lora_order.jsonl"
  # grid: 7B at 1x512 (below auto's line of parameters x tokens) and 7B QLoRA at 4x2048 (far above, but host-bound
  # on the H200: does replaying close its 54 ms of idle GPU?), eager and replayed; the 3B rows measured 2026-11-28
  want grid && timeout 160 python3 -m studio bench --graphs-grid --no-peft --only qwen2.5-7b \
    --out "$W/graphs_grid.jsonl" 2>&1 \
    | grep -v Warning | tee "$W/graphs_grid.log"
  # chat: greedy generation from the base, the adapter unmerged and merged (0.5B and 7B shapes)
  want chat && timeout 120 python3 -m studio bench --chat --out "$W/chat.jsonl" 2>&1 | grep -v Warning \
    | tee "$W/chat.log"
  # graphs: train.cuda_graphs through the real trainer, eager and graphed loss curves on tiny models (must
  # agree); LoRA's default dropout (0.05) drawn inside the graph, without and with checkpointing (seeded:
  # captured with it too); packed batches, eager (flash varlen attention) against captured (block mask)
  if want graphs; then
    timeout 60 python3 -m baselines.graphs_check 2>&1 | grep -v Warning | tee "$W/graphs_check.jsonl"
    for ck in "" --ckpt; do timeout 40 python3 -m baselines.graphs_check --models tiny-llama --keep-dropout $ck \
      2>&1 | grep -v Warning | tee -a "$W/graphs_check.jsonl"; done
    timeout 60 python3 -m baselines.graphs_check --packing 2>&1 | grep -v Warning | tee -a "$W/graphs_check.jsonl"
    # the methods' own draws (AdaMix's routing, diff pruning's gates) seeded: captured with checkpointing too
    timeout 60 python3 -m baselines.graphs_check --models tiny-llama --keep-dropout --ckpt --methods adamix,diff_pruning \
      2>&1 | grep -v Warning | tee -a "$W/graphs_check.jsonl"
  fi
  # quick: the quick grid (auto graphs, also eagerly; with AB=1 also without the Triton kernels)
  want quick && timeout 250 python3 -m studio bench --quick $([ "${AB:-0}" = 1 ] && echo --triton-ab) --eager-ab \
    --out "$W/bench.jsonl" 2>&1 | grep -v Warning | tee -a "$W/bench.log"
  # trainer: the quick grid's rows (ours, random weights, QLoRA's in 4-bit) also run by the trainer, as a user's run
  # goes (batches, metrics and status files; a step's loss read while the next one runs): trainer_ms_per_step
  # against the loop's ms_per_step
  want trainer && timeout 150 python3 -m studio bench --quick --no-peft --trainer --steps 10 \
    --out "$W/bench_trainer.jsonl" 2>&1 | grep -v Warning | tee "$W/bench_trainer.log"
  # alloc: the 7B rows and the quick grid (ours) with the caching allocator's expandable segments: the 7B QLoRA
  # row reserved 13% more than it allocated (fragmentation the estimate does not count); does this close it,
  # at what speed, and do graphs still capture?
  want alloc && PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 200 python3 -m studio bench --no-peft \
    --only qwen2.5-7b,qwen2.5-0.5b,qwen2.5-1.5b --out "$W/bench_expandable.jsonl" 2>&1 | grep -v Warning \
    | tee "$W/bench_expandable.log"
  # memmethods: the memory estimate of every method at its defaults against max_memory_allocated (0.5B, 4x512), and
  # the variants whose rules differ (LoHa/LoKr/GLoRA on every linear layer, IA3 and DoRA over a 4-bit base)
  want memmethods && timeout 180 python3 -m studio bench --memory --methods --out "$W/memory_methods.jsonl" 2>&1 \
    | grep -v Warning > "$W/memory_methods.log"
  # long: 7B LoRA and QLoRA at 1x16384, QLoRA at 1x32768, checkpointed: ours with the recomputed MLPs in row chunks
  # (studio/chunked_mlp.py) and whole, vs peft: peak, estimate, step time
  want long && timeout 300 python3 -m studio bench --long-grid --steps 3 --warmup 1 --out "$W/bench_long.jsonl" 2>&1 | grep -v Warning \
    | tee "$W/bench_long.log"
  # methods: every method marked safe to capture, captured for real (checked on the CPU by replaying recorded steps)
  want methods && timeout 120 python3 -m baselines.graphs_check --models tiny-llama --steps 4 --methods \
    dora,vera,loha,lokr,ia3,adalora,adapter,prompt_tuning,prefix_tuning,glora,compacter,ssf,parallel_adapter,lst,p_tuning,p_tuning_v2,mam_adapter,unipelt,bitfit,freeze,child_tuning,full,dylora,adamix,diff_pruning,adapter_fusion \
    2>&1 | grep -v Warning | tee "$W/graphs_methods.jsonl"
  # packed: packed rows on real shapes (0.5B 4x1024, 1.5B 4x2048 with checkpointing): eager, replayed, peft
  want packed && timeout 150 python3 -m studio bench --packed-grid --out "$W/bench_packed.jsonl" 2>&1 \
    | grep -v Warning | tee "$W/bench_packed.log"
  # llama: the issue's Llama-3.2-1B row (8x2048), not in the quick grid; with and without graphs
  want llama && timeout 120 python3 -m studio bench --only llama-3.2-1b --eager-ab --out "$W/bench.jsonl" 2>&1 \
    | grep -v Warning | tee -a "$W/bench.log"
  # presets: every preset peft trains too, at its own settings, ours vs peft given the same adapter (0.5B 4x1024)
  want presets && timeout 240 python3 -m studio bench --methods --steps 3 --out "$W/bench_methods.jsonl" 2>&1 \
    | grep -v Warning | tee "$W/bench_methods.log"
  # nf4off: the 7B QLoRA rows (ours) with bitsandbytes' dequantization instead of the NF4 kernel (STUDIO_NF4_KERNEL=0;
  # 647 against 640 ms on 2026-11-30)
  want nf4off && STUDIO_NF4_KERNEL=0 timeout 120 python3 -m studio bench --no-peft --only qwen2.5-7b:qlora \
    --out "$W/bench_nf4off.jsonl" 2>&1 | grep -v Warning | tee "$W/bench_nf4off.log"
  # curves: bf16 loss curves against fp32, ours and peft's (2-layer models; the update added before rounding;
# DoRA and IA3 through CUDA's fp32-output GEMM)
  want curves && timeout 90 python3 -m baselines.bf16_curves 2>&1 | grep '^{' | tee "$W/bf16_curves.jsonl"
  # rng: does a replayed checkpoint redraw torch's dropout masks? (graphs keep such runs eager until it does)
  want rng && timeout 30 python3 -m baselines.graph_rng_check 2>&1 | grep '^{' | tee "$W/graph_rng.jsonl"
  # LoRA's product order (rank-r term first, base GEMM adding onto it) against the old one, 7B shapes, and
  # the recomputation without down's product against the full one, 7B LoRA 4x2048; with AB=1 only
  [ "${AB:-0}" = 1 ] && timeout 90 python3 -m baselines.recompute_ab 2>&1 | grep '^{' | tee "$W/recompute_ab.jsonl"
  [ "${MEMORY_S:-0}" -gt 0 ] && timeout "$MEMORY_S" python3 -m studio bench --memory --out "$W/memory.jsonl" 2>&1 | grep -v Warning \
    > "$W/memory.log"
  python3 baselines/bench_table.py "$W/bench.jsonl" "$W/graphs_grid.jsonl" "$W/bench_long.jsonl" \
    "$W/bench_trainer.jsonl" "$W/bench_expandable.jsonl" "$W/bench_nf4off.jsonl" "$W/bench_apart.jsonl" "$W/bench_terms.jsonl" "$W/chat.jsonl" "$W/bench_methods.jsonl" "$W/memory.jsonl" \
    "$W/memory_methods.jsonl" 2>&1 | tee "$W/table.md"
  # the issue's targets, met or not, row by row
  python3 -m baselines.targets "$W/bench.jsonl" 2>&1 | grep -v Warning | tee "$W/targets.md"
  kill "$packer" 2>/dev/null; pack
  ;;
*) echo "usage: bash baselines/gpu_check.sh fetch|run" >&2; exit 2 ;;
esac
