#!/usr/bin/env bash
# The GPU run of issue #13 as one prepared script, in two modes that fit one 15-minute device lease
# (at most 600 s a call, the machine's start of 1-2 minutes included in the 15) as two calls:
#
#   bash benchmarks/gpu_check.sh check   # stages 0-1, correctness only: the device tool's `run` with
#                                        # timeout_s 400 (the stages' caps: 330 s; BUDGET_S 390)
#   BUDGET_S=<status's budget_left_s - 60> bash benchmarks/gpu_check.sh bench
#                                        # stages 1b-5, the measurements: `run` with timeout_s
#                                        # BUDGET_S + 15 (at most 595: BUDGET_S defaults to 580), on
#                                        # the same warm machine (Triton's cache of compiled kernels
#                                        # carries over from check)
#   bash benchmarks/gpu_check.sh         # (or `all`) check, then the bench stages while BUDGET_S lasts
#
# (the mode may also be given as MODE=check|bench|all). The stages:
#   0. versions, and every op once through the Triton kernels against torch on the GPU (smoke);
#   1. the Triton kernels' tests (the same module as CI's interpreter run) compiled for the GPU;
#   1b. where the time goes: torch.profiler per kernel, then registers and spills
#      (benchmarks/gpu_profile.py, each case's lines printed as it is measured; PROFILE=0 skips it);
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
# (src/ goes on PYTHONPATH; nothing is installed). Writes to $OUT (default ./gpu-out), at most 8
# files (what a device lease returns): check: smoke.log, tests.log; bench: profile.txt, bench_cuda.md
# and bench_compiled.md (+ their rows as they landed, *_rows.jsonl), e2e.md (stages 4 and 5, and
# stage 4's stderr where it wrote any).
# Time: each stage has a cap in seconds, SMOKE_S 150, TESTS_S 180 (cold Triton caches: the smoke
# compiles ~50 kernel variants, 77 s on the H200 run with fewer; the tests ~725), PROFILE_S 40,
# BENCH_S 140, COMPILED_S 100, E2E_S 40, CROSSOVER_S 90; and the call a budget, BUDGET_S (default 390
# for check, 580 for bench and all): a stage runs for the smaller of its cap and what is left of the
# budget less 10 s, and is skipped (said at the end) when that is under 20 s. SMOKE=0 skips stage 0.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-${MODE:-all}}"
case "$MODE" in
  check) BUDGET="${BUDGET_S:-390}" ;;
  bench | all) BUDGET="${BUDGET_S:-580}" ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh [check|bench|all]  (got '$MODE')" >&2
    exit 2
    ;;
esac
OUT="${OUT:-gpu-out}"
PY="${PY:-python3}"
mkdir -p "$OUT"
# NORMKIT_NO_BUILD: the CPU kernels are not compiled there (the oracles run the reference path).
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NORMKIT_NO_BUILD=1
t0=$SECONDS
status=0
skipped=()

# stage NAME CAP: the stage's header; CAP becomes the seconds it may run (its own cap, or what is left
# of the budget less 10 s), in $c; returns 1 (the stage is skipped) when that is under 20 s.
stage() {
  local left=$((BUDGET - (SECONDS - t0) - 10))
  c=$2
  ((left < c)) && c=$left
  if ((c < 20)); then
    echo "== $1: skipped, $((BUDGET - (SECONDS - t0))) s left of BUDGET_S=$BUDGET"
    skipped+=("$1")
    return 1
  fi
  echo "== $1 (at ${SECONDS}s, $((SECONDS - t0))s in, up to ${c}s)"
}

check() {
  if [ "${SMOKE:-1}" = 1 ] && stage "0. smoke" "${SMOKE_S:-150}"; then
    timeout -k 5 "$c" "$PY" benchmarks/gpu_smoke.py 2>&1 | tee "$OUT/smoke.log" || status=1
  fi

  if stage "1. tests" "${TESTS_S:-180}"; then
    xdist=()
    "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8 -p no:benchmark)
    NORMKIT_TEST_DEVICE=cuda timeout -k 5 "$c" "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" \
      -W ignore::DeprecationWarning -o addopts="--import-mode=importlib" tests/kernels/test_triton.py \
      > "$OUT/tests.log" 2>&1 || status=1
    tail -n 15 "$OUT/tests.log"
  fi
}

bench() {
  if [ "${PROFILE:-1}" = 1 ] && stage "1b. where the time goes (torch.profiler per kernel, registers and spills)" "${PROFILE_S:-40}"; then
    timeout -k 5 "$c" "$PY" benchmarks/gpu_profile.py > "$OUT/profile.txt" 2>&1 || status=1
    tail -n 25 "$OUT/profile.txt"
  fi

  if stage "2. bench" "${BENCH_S:-140}"; then  # a row per case as it lands; no new case after the deadline
    timeout -k 5 "$c" "$PY" benchmarks/gpu_bench.py --out "$OUT" --backends auto,reference,triton \
      --deadline "$((c > 40 ? c - 30 : 10))" 2>&1 || status=1
  fi

  if stage "3. compiled" "${COMPILED_S:-100}"; then
    timeout -k 5 "$c" "$PY" benchmarks/gpu_bench.py --out "$OUT" --name bench_compiled --compile \
      --backends auto,triton --ops group_norm,proxy,batch_norm --shapes 64x256x56x56 --dtypes bf16 \
      --deadline "$((c > 70 ? c - 60 : 10))" 2>&1 || status=1
  fi

  if stage "4. whole training steps (ResNet-18-style and CNN-4, torch.nn's norms vs normkit's, quick)" "${E2E_S:-40}"; then
    # (stderr goes into e2e.md, not a file of its own: a device lease returns at most 8 files)
    err="$(mktemp)"
    timeout -k 5 "$c" "$PY" -m normkit.cli bench --device cuda --no-ops --quick --quiet --backends auto,triton \
      --md "$OUT/e2e.md" > /dev/null 2> "$err" || { status=1; tail -n 20 "$err"; }
    if [ -s "$err" ]; then
      { printf '\n### stage 4: stderr (last 60 lines)\n\n```\n'; tail -n 60 "$err"; printf '```\n'; } >> "$OUT/e2e.md"
    fi
    rm -f "$err"
    grep '^|' "$OUT/e2e.md" 2>/dev/null | head -n 12
  fi

  if stage "5. Inductor: its own code for a norm (Welford's moments or two passes), or normkit's kernels (GroupNorm + ReLU, fwd + bwd)" "${CROSSOVER_S:-90}"; then
    # (fp32 first: the open question; the errors' last lines on the console)
    timeout -k 5 "$c" "$PY" benchmarks/inductor_crossover.py --device cuda --quick \
      --shapes 64x256x56x56 --dtypes fp32,bf16 --moments both 2> >(tail -n 15 >&2) | grep '^|\|^torch' \
      | tee -a "$OUT/e2e.md" || status=1
  fi
}

echo "== gpu_check.sh $MODE: budget ${BUDGET}s"
case "$MODE" in
  check) check ;;
  bench) bench ;;
  all) check; bench ;;
esac

nfiles=$(find "$OUT" -type f | wc -l)
((nfiles <= 8)) || echo "warning: $nfiles files under $OUT; a device lease returns at most 8"
((${#skipped[@]} == 0)) || printf 'skipped for time: %s\n' "${skipped[@]}"
echo "== done ($MODE), status $status, $((SECONDS - t0))s"
exit $status
