#!/usr/bin/env bash
# Everything issue 5 needs a GPU for, in one go (written for an H100; other GPUs: pass
# their dense peaks to gemm.py, e.g. GEMM_ARGS="--int8-peak-tops 1513 --bf16-peak-tflops 756").
#  1. the kernel tests compiled on the GPU (same tests CI runs under the interpreter);
#  2. benchmarks/gemm.py, act_quant.py, e2e.py -> benchmarks/results/<name>_<gpu>.json.
# Benchmarks run even if a test fails (their rows carry their own error checks), but the
# script then exits non-zero: numbers from a kernel that failed its tests are suspect.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=0

status=0
CLQ_TRITON_TEST_DEVICE=cuda python -m pytest tests/triton -q -p no:cacheprovider || status=1
# shellcheck disable=SC2086
python benchmarks/gemm.py ${GEMM_ARGS:-} || status=1
python benchmarks/act_quant.py || status=1
python benchmarks/e2e.py || status=1
exit $status
