#!/usr/bin/env bash
# The single short GPU check (< 5 minutes in all, every step under its own `timeout`): CUDA-marked tests (every
# sketch route of every projection against the CPU), the overhead benchmark on --device cuda at batch 256 (cnn,
# resnet18, transformer), the real-models zoo at batch sizes that fill a GPU (text models batch 64 at T 128; image
# models batch 256) with exact statistics and both sketch sizes (k = 256, 1024) next to plain, CUDA-synchronised,
# then writer throughput and the probe comparison. Results (JSON + markdown + logs) go under OUT (default
# ./gpu-out); the benchmark rewrites its JSON and markdown after every model, so a step cut short by its timeout
# still leaves the models it finished.
#
#   bash scripts/gpu_check.sh [OUT]            # on a machine with a GPU
#   bash scripts/gpu_check.sh --tiny [OUT]     # the same steps on the CPU at tiny sizes (checks the script itself)
set -uo pipefail
TINY=0
SLOW=1  # timeouts × SLOW: --tiny runs on a (possibly shared) CPU
if [ "${1:-}" = "--tiny" ]; then TINY=1; SLOW=6; shift; fi
OUT="${1:-./gpu-out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
status=0
DEVICE=cuda
SIZE=()
if [ "$TINY" = 1 ]; then  # CPU, tiny models, one rep: the route tests run on the CPU instead of the CUDA ones
  DEVICE=cpu
  SIZE=(--tiny)
  timeout -k 5 120 python -m pytest -q -p no:cacheprovider tests/logger/test_sketch.py -k "agree or routes" \
    > "$OUT/pytest_cuda.txt" 2>&1 || status=$?
  tail -1 "$OUT/pytest_cuda.txt"
elif grep -rqs "mark.cuda" tests; then
  timeout -k 5 60 python -m pytest -q -m cuda -p no:cacheprovider > "$OUT/pytest_cuda.txt" 2>&1 || status=$?
  tail -3 "$OUT/pytest_cuda.txt"
else
  echo "no cuda-marked tests" > "$OUT/pytest_cuda.txt"
fi
bench() {  # bench NAME SECONDS ARGS...: one benchmark run under a timeout, its JSON/markdown/log under $OUT
  local name="$1" secs="$2"
  shift 2
  timeout -k 5 "$((secs * SLOW))" python scripts/bench_overhead.py --device "$DEVICE" "$@" ${SIZE[@]+"${SIZE[@]}"} \
    --json "$OUT/$name.json" \
    --markdown "$OUT/$name.md" > "$OUT/$name.log" 2>&1 || { status=$?; echo "$name: exit $status" >&2; }
}
ZOO_METHODS=plain,gradcoh_exact,gradcoh_k256,gradcoh_k1024,opacus_ghost,backpack_l2,vmap
bench bench_cuda 60 --batch 256 --models cnn,resnet18,transformer --reps 10 --slow-reps 3 --warmup 3
bench bench_zoo_text_cuda 55 --batch 64 --seq 128 --models gpt2,llama,bert --methods "$ZOO_METHODS" \
  --reps 5 --slow-reps 3 --warmup 2
bench bench_zoo_image_cuda 75 --batch 256 --models hf-vit,timm-vit,timm-deit,timm-resnet,timm-convnext,timm-efficientnet \
  --methods "$ZOO_METHODS" --reps 5 --slow-reps 3 --warmup 2
timeout -k 5 "$((40 * SLOW))" python scripts/bench_overhead.py --device "$DEVICE" ${SIZE[@]+"${SIZE[@]}"} --writer --probe \
  --json "$OUT/writer_probe_cuda.json" \
  --markdown "$OUT/writer_probe_cuda.md" > "$OUT/writer_probe_cuda.log" 2>&1 || status=$?
cat "$OUT"/bench_cuda.md "$OUT"/bench_zoo_text_cuda.md "$OUT"/bench_zoo_image_cuda.md "$OUT"/writer_probe_cuda.md \
  2>/dev/null
exit $status
