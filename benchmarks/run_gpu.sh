#!/usr/bin/env bash
# Everything the GPU path needs a GPU for, in one bounded run (sized for one H100/H200
# inside 8 minutes, kernels compiled and warmed inside each stage):
#  1. the kernel tests compiled on the GPU (the same tests CI runs under the interpreter);
#  2. benchmarks/gemm.py (+ kernels_<gpu>.json: what each launch compiled),
#     act_quant.py, e2e.py -> benchmarks/results/<name>_<gpu>.json.
# Each stage has its own time limit, so one slow stage cannot eat the others'. Benchmarks
# run even if a test fails (their rows carry their own error checks), but the script then
# exits non-zero: numbers from a kernel that failed its tests are suspect.
#   bash benchmarks/run_gpu.sh            # on the GPU machine
#   bash benchmarks/run_gpu.sh --dry-run  # CPU: every stage's plumbing on tiny shapes
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=(--dry-run)
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET
fi
export TRITON_DEFAULT_FP_FUSION=0

status=0
stage() {  # stage LIMIT_S CMD...: run with a time limit, report rc and seconds
  local limit=$1
  shift
  echo "=== $* (limit ${limit} s)"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@"
  local rc=$?
  echo "=== rc=$rc in $((SECONDS - t0)) s: $1 $2"
  [[ $rc -eq 0 ]] || status=1
}

if [[ ${#DRY[@]} -eq 0 ]]; then
  # One tile per kernel (CLQ_TRITON_SINGLE_CONFIG): correctness does not depend on it, and
  # autotuning every parametrized test would spend minutes compiling.
  # test_lower.py first: it holds the only checks of Inductor compiling the kernels
  # (torch.compile of a lowered model, default and reduce-overhead), unrun so far.
  stage "${TEST_LIMIT_S:-120}" env CLQ_TRITON_TEST_DEVICE=cuda CLQ_TRITON_SINGLE_CONFIG=1 \
    python -m pytest tests/triton/test_lower.py tests/triton/test_routes.py \
    tests/triton/test_qgemm.py tests/triton/test_dispatch.py tests/triton/test_act_quant.py \
    -q -p no:cacheprovider --maxfail=10
fi
# shellcheck disable=SC2086
stage "${GEMM_LIMIT_S:-130}" python benchmarks/gemm.py ${GEMM_ARGS:---m 8192 --small-m} "${DRY[@]}"
# shellcheck disable=SC2086
stage "${ACT_LIMIT_S:-60}" python benchmarks/act_quant.py ${ACT_ARGS:---m 8192 --k 1152 4608} "${DRY[@]}"
# shellcheck disable=SC2086
# The compiled rows run last inside it (cut first if the limit is reached; rows before
# them are written as they come).
stage "${E2E_LIMIT_S:-170}" python benchmarks/e2e.py ${E2E_ARGS:---rep-ms 1000} "${DRY[@]}"
exit $status
