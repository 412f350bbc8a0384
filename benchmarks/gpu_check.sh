#!/usr/bin/env bash
# The GPU run of issue #13 as one prepared script (under 10 minutes on one GPU, each stage capped):
#   0. versions, and every op once through the Triton kernels against torch on the GPU (smoke);
#   1. the Triton kernels' tests (the same module as CI's interpreter run) compiled for the GPU;
#   2. `normkit bench --device cuda`'s measurement (benchmarks/gpu_bench.py, one op and shape at a
#      time under a deadline): torch native / cuDNN, normkit's Triton kernels and reference, on
#      PERFORMANCE.md's and ResNet-50's shapes, both layouts and dtypes, forward and forward + backward;
#   3. torch.compile of the composite next to them, on the ResNet-50 stage-1 activation;
#   4. whole training steps with torch.nn's norms and normkit's (`normkit bench --no-ops --quick`);
#   5. under torch.compile, Inductor's own code for a norm against a call of normkit's kernels, to check
#      normkit.ops._inductor.LIMITS["cuda"], and the generated code with Welford's moments against the
#      two-pass ones, in float32 and bfloat16, to check normkit.ops.core.two_pass_moments
#      (benchmarks/inductor_crossover.py; appended to e2e.md).
#
# Needs: a Python with a CUDA build of torch and triton (PY, default python3), run from a checkout
# (src/ goes on PYTHONPATH; nothing is installed). Writes to $OUT (default ./gpu-out): smoke.log,
# tests.log, bench_cuda.md and bench_compiled.md (+ their rows as they landed, *_rows.jsonl),
# profile.txt (stage 1b: benchmarks/gpu_profile.py), e2e.md (stages 4 and 5). The stages' caps in seconds
# (580 in all, so one `run` of the device tool with timeout_s 595 fits): SMOKE_S, TESTS_S, PROFILE_S,
# BENCH_S, COMPILED_S, E2E_S, CROSSOVER_S; SMOKE=0 skips stage 0, PROFILE=0 stage 1b.
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

if [ "${SMOKE:-1}" = 1 ]; then
  stage "0. smoke"
  timeout "${SMOKE_S:-60}" "$PY" benchmarks/gpu_smoke.py 2>&1 | tee "$OUT/smoke.log" || status=1
fi

stage "1. tests"
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8 -p no:benchmark)
NORMKIT_TEST_DEVICE=cuda timeout "${TESTS_S:-100}" "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" \
  -W ignore::DeprecationWarning -o addopts="--import-mode=importlib" tests/kernels/test_triton.py \
  > "$OUT/tests.log" 2>&1 || status=1
tail -n 15 "$OUT/tests.log"

if [ "${PROFILE:-1}" = 1 ]; then
  stage "1b. where the time goes (torch.profiler per kernel, registers and spills)"
  timeout "${PROFILE_S:-40}" "$PY" benchmarks/gpu_profile.py > "$OUT/profile.txt" 2>&1 || status=1
  tail -n 25 "$OUT/profile.txt"
fi

stage "2. bench"  # a row per case as it lands; no new case after the deadline
timeout "${BENCH_S:-140}" "$PY" benchmarks/gpu_bench.py --out "$OUT" --backends auto,reference,triton \
  --deadline "$(( ${BENCH_S:-140} - 30 ))" 2>&1 || status=1

stage "3. compiled"
timeout "${COMPILED_S:-100}" "$PY" benchmarks/gpu_bench.py --out "$OUT" --name bench_compiled --compile --backends auto,triton \
  --ops group_norm,proxy,batch_norm --shapes 64x256x56x56 --dtypes bf16 \
  --deadline "$(( ${COMPILED_S:-100} - 60 ))" 2>&1 || status=1

stage "4. whole training steps (ResNet-18-style and CNN-4, torch.nn's norms vs normkit's, quick)"
timeout "${E2E_S:-40}" "$PY" -m normkit.cli bench --device cuda --no-ops --quick --quiet --backends auto,triton \
  --md "$OUT/e2e.md" > /dev/null 2> "$OUT/e2e.err" || { status=1; tail -n 20 "$OUT/e2e.err"; }
[ -s "$OUT/e2e.err" ] || rm -f "$OUT/e2e.err"  # (a device lease returns at most 8 files)
grep '^|' "$OUT/e2e.md" 2>/dev/null | head -n 12

stage "5. Inductor: its own code for a norm (Welford's moments or two passes), or normkit's kernels (GroupNorm + ReLU, fwd + bwd)"
# (fp32 first: the open question; the errors' last lines on the console)
timeout "${CROSSOVER_S:-90}" "$PY" benchmarks/inductor_crossover.py --device cuda --quick \
  --shapes 64x256x56x56 --dtypes fp32,bf16 --moments both 2> >(tail -n 15 >&2) | grep '^|\|^torch' \
  | tee -a "$OUT/e2e.md" || status=1

stage "done, status $status"
exit $status
