"""The kernels compile for real NVIDIA targets (sm_90 Hopper, sm_80 Ampere), checked on
this GPU-less machine: ``triton.compile`` runs the full pipeline down to a cubin through
the bundled ptxas and needs no driver. The interpreter tests cannot catch what only the
compiler rejects (dot shapes, layouts, constexpr misuse), so this closes that gap.

Runs in a subprocess because the kernel modules in this process were imported under
``TRITON_INTERPRET=1`` (interpreted functions cannot be compiled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_all_variants_compile_for_sm90_and_sm80(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    proc = subprocess.run(
        [sys.executable, "-m", "clq_compile.lowering.triton.compile_check", "--json",
         "--arch", "90", "80"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.stdout, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    results = report["results"]
    failed = [(r["name"], r["arch"], r["error"]) for r in results if not r["ok"]]
    assert not failed, failed
    assert {r["arch"] for r in results} == {90, 80}
    for r in results:
        if r["name"] in report["expect_int_dot"]:
            # the integer GEMMs must land on int8 tensor cores with int32 accumulation
            assert any("s32" in m and "s8.s8" in m for m in r["mma"]), (r["name"], r["mma"])
    assert proc.returncode == 0
