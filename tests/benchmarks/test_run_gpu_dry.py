"""benchmarks/run_gpu.sh --dry-run: every GPU benchmark stage runs on CPU (interpreter,
toy shapes, one timed call) and writes its JSON, so a GPU session never spends device
time on a broken script. The numbers are not measurements and go to a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_run_gpu_dry_run_writes_every_stage(tmp_path) -> None:
    env = {**os.environ, "CLQ_BENCH_DRY_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"gemm_dry-run.json", "kernels_dry-run.json", "act_quant_dry-run.json",
            "e2e_dry-run.json"} <= names, names
    gemm = json.loads((tmp_path / "gemm_dry-run.json").read_text())
    methods = {r["method"] for r in gemm["rows"]}
    for route in ("packed", "int8", "fp8"):
        assert f"ours W4A4 linear (act-quant + gemm) route={route}" in methods
    assert not [r for r in gemm["rows"] if "error" in r], gemm["rows"]
    # the exactness checks ran: integer GEMMs against fp64 sums, routes against W4A4
    errs = {r["method"]: r["max_rel_err"] for r in gemm["rows"] if r.get("max_rel_err")}
    assert errs and all(isinstance(e, float) and e < 1e-2 for e in errs.values()), errs
    act = json.loads((tmp_path / "act_quant_dry-run.json").read_text())
    assert not [r for r in act["rows"] if "error" in r], act["rows"]
    (fused,) = [r for r in act["rows"] if r["variant"].endswith("LayerNorm + adaLN, fused")]
    assert fused["byte_mismatch_vs_ref"] <= 0.01 and fused["speedup_vs_unfused"] > 0
    e2e = json.loads((tmp_path / "e2e_dry-run.json").read_text())
    rows = {r["method"]: r for r in e2e["rows"]}
    assert "bf16 eager" in rows and not [r for r in e2e["rows"] if "error" in r], e2e["rows"]
    for name in ("rtn", "quarot", "clq (search off)"):
        assert rows[f"clq_compile W4A4 {name}"]["sqnr_db_vs_bf16"] > 10
        assert rows[f"clq_compile W4A4 {name}"]["not_lowered"] == {}  # all on the kernels
    assert "not a measurement" in e2e["environment"]["device"]
