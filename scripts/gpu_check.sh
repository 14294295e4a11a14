#!/usr/bin/env bash
# The single short GPU check (< 5 minutes): CUDA-marked tests, then the overhead benchmark on --device cuda at batch
# 256 (plus writer throughput and the probe comparison). Results go under $1 (default ./gpu-out).
set -uo pipefail
OUT="${1:-./gpu-out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
status=0
if grep -rqs "mark.cuda" tests; then
  timeout 120 python -m pytest -q -m cuda -p no:cacheprovider > "$OUT/pytest_cuda.txt" 2>&1 || status=$?
  tail -3 "$OUT/pytest_cuda.txt"
else
  echo "no cuda-marked tests" > "$OUT/pytest_cuda.txt"
fi
timeout 150 python scripts/bench_overhead.py --device cuda --batch 256 --models cnn,resnet18,transformer \
  --reps 10 --slow-reps 3 --warmup 3 --json "$OUT/bench_cuda.json" --markdown "$OUT/bench_cuda.md" \
  > "$OUT/bench_cuda.log" 2>&1 || status=$?
timeout 60 python scripts/bench_overhead.py --device cuda --writer --probe --json "$OUT/writer_probe_cuda.json" \
  --markdown "$OUT/writer_probe_cuda.md" > "$OUT/writer_probe_cuda.log" 2>&1 || status=$?
cat "$OUT"/bench_cuda.md "$OUT"/writer_probe_cuda.md 2>/dev/null
exit $status
