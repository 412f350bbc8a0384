#!/usr/bin/env bash
# The GPU run of issue #13 as one prepared script (under 10 minutes on one GPU, each stage capped):
#   0. versions, and every op once through the Triton kernels against torch on the GPU (smoke);
#   1. the Triton kernels' tests (the same module as CI's interpreter run) compiled for the GPU;
#   2. `normkit bench --device cuda`: torch native / cuDNN, normkit's Triton kernels and reference,
#      on PERFORMANCE.md's and ResNet-50's shapes, both layouts, forward and forward + backward
#      (one run per dtype, so that a stage cut short by its cap still leaves the other's table);
#   3. torch.compile of the composite next to them, on the ResNet-50 stage-1 activation.
#
# Needs: a Python with a CUDA build of torch and triton (PY, default python3), run from a checkout
# (src/ goes on PYTHONPATH; nothing is installed). Writes to $OUT (default ./gpu-out): smoke.log,
# tests.log, bench_{bf16,fp32,compiled}.{md,json}.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
PY="${PY:-python3}"
mkdir -p "$OUT"
# NORMKIT_NO_BUILD: the CPU kernels are not compiled there (the oracles run the reference path).
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NORMKIT_NO_BUILD=1
t0=$SECONDS
stage() { echo "== $1 (at ${SECONDS}s, $((SECONDS - t0))s in)"; }
status=0

stage "0. smoke"
timeout 90 "$PY" benchmarks/gpu_smoke.py 2>&1 | tee "$OUT/smoke.log" || status=1

stage "1. tests"
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
NORMKIT_TEST_DEVICE=cuda timeout 150 "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" \
  -W ignore::DeprecationWarning -o addopts="--import-mode=importlib" tests/kernels/test_triton.py > "$OUT/tests.log" 2>&1 || status=1
tail -n 15 "$OUT/tests.log"

stage "2. bench"
for dt in bf16 fp32; do
  timeout 110 "$PY" -m normkit.cli bench --device cuda --no-e2e --dtypes "$dt" --backends reference,triton \
    --repeats 2 --min-time 0.05 --quiet --json "$OUT/bench_$dt.json" --md "$OUT/bench_$dt.md" \
    > /dev/null 2> "$OUT/bench_$dt.err" || { status=1; tail -n 20 "$OUT/bench_$dt.err"; }
done

stage "3. compiled"
timeout 100 "$PY" -m normkit.cli bench --device cuda --no-e2e --compile --backends triton --repeats 2 \
  --min-time 0.05 --quiet --ops group_norm,batch_norm,proxy --shapes 64x256x56x56 --dtypes bf16 \
  --json "$OUT/bench_compiled.json" --md "$OUT/bench_compiled.md" \
  > /dev/null 2> "$OUT/bench_compiled.err" || { status=1; tail -n 20 "$OUT/bench_compiled.err"; }

stage "done, status $status"
for f in "$OUT"/bench_*.md; do [ -f "$f" ] && { echo "### $f"; grep -v '^$' "$f" | head -n 80; }; done
exit $status
