#!/usr/bin/env bash
# Distillation throughput on a CUDA machine (cannot run on CPU-only hosts).
#   benchmarks/gpu.sh [extra args for gpu_distill.py]   e.g. benchmarks/gpu.sh --batch 128
# Runs r90 and r100 teachers with a MobileFaceNet student at 112 px, batch 256, and prints
# Markdown tables (bf16 + channels_last vs fp32, and vs the teacher-forward-only bound).
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
for teacher in r90 r100; do
  python benchmarks/gpu_distill.py --teacher "$teacher" --batch 256 --input-size 112 "$@"
  echo
done
