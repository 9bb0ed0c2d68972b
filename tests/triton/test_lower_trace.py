"""What Inductor receives from a lowered graph: the kernels themselves, not opaque ops.

Runs ``trace_lowered.py`` in its own process, because the kernels must be the compiled
(JIT) ones, not the interpreter's: this suite sets ``TRITON_INTERPRET=1`` before anything
imports Triton, and a trace cannot pass fake tensors through the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_inductor_sees_user_defined_triton_kernels_for_every_gemm():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    script = Path(__file__).with_name("trace_lowered.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    fp8 = "aten._scaled_mm.default"
    for what, gemm in (("sm_80", "triton:_qgemm_kernel"), ("sm_90", fp8),
                       ("quantized_model", fp8)):
        # Every clq.quant_linear (q/k/v merged) becomes one quantizer launch + one GEMM;
        # on Hopper in bf16 that GEMM is the fp8 route's aten._scaled_mm (Inductor's own).
        # The clq backend's graph (sm_80, sm_90) and torch.compile of a QuantizedModel.
        n = report[what]["clq_before"]["clq.quant_linear.default"]
        assert n > 0 and report[what]["declined"] == {}
        assert report[what]["inductor_sees"] == {"triton:_rows_kernel": n, gemm: n}, report
