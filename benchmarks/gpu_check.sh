#!/usr/bin/env bash
# The GPU run of issue #13 as one prepared script (a few minutes on one GPU): the Triton kernels'
# tests compiled for the GPU, then `normkit bench --device cuda` (torch native / cuDNN, normkit's
# Triton kernels and reference, and torch.compile of the composite on two cases).
#
# Needs: a Python with a CUDA build of torch and triton (`pip install -e ".[test,triton]"` on a GPU
# machine). Writes to $OUT (default ./gpu-out): tests.log, bench_cuda.{md,json}, bench_compiled.{md,json}.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  || { echo "gpu_check: needs torch with CUDA and triton"; exit 2; }
status=0
# 1. the same tests as CI's interpreter run, on CUDA tensors with compiled kernels
NORMKIT_TEST_DEVICE=cuda timeout 300 python -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib" \
  tests/kernels/test_triton.py 2>&1 | tee "$OUT/tests.log" || status=1
# 2. every op, shape (PERFORMANCE.md's and ResNet-50's), layout, dtype and pass: native vs normkit's backends
timeout 420 python -m normkit.cli bench --device cuda --no-e2e --repeats 2 --min-time 0.1 --quiet \
  --json "$OUT/bench_cuda.json" --md "$OUT/bench_cuda.md" > /dev/null || status=1
# 3. torch.compile of the composite next to them, on the ResNet-50 stage-1 activation
timeout 300 python -m normkit.cli bench --device cuda --no-e2e --compile --repeats 2 --min-time 0.1 --quiet \
  --ops group_norm,batch_norm,proxy --shapes 64x256x56x56 --dtypes bf16,fp32 \
  --json "$OUT/bench_compiled.json" --md "$OUT/bench_compiled.md" > /dev/null || status=1
cat "$OUT"/bench_*.md 2>/dev/null
exit $status
