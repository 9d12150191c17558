#!/usr/bin/env bash
# The GPU acceptance check, one command on a machine with one CUDA GPU (about 8 minutes at most):
#   benchmarks/gpu.sh [extra args for gpu_distill.py]
# 1. the CUDA-only tests (they skip on CPU-only machines, so the normal suite never runs them);
# 2. one table: distill img/s through the real Trainer, MobileFaceNet <- r100 at 112 px, bf16,
#    batch 128, 93k-class sampled head, inline and cached, against the teacher-forward-only bound
#    measured in the same run, with peak GPU memory.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
timeout 180 python -m pytest -q -p no:cacheprovider -k cuda tests/test_freeze.py tests/test_fast_path.py
echo
timeout 300 python benchmarks/gpu_distill.py "$@"
