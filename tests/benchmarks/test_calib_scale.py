"""benchmarks/calib_scale.py's plumbing on a toy size: a planned row with its floor
beside, and a floor-only row, each from its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_calib_scale_rows_and_floors(tmp_path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "calib_scale.py"), "--configs", "2x2", "--floors", "3x2",
         "--tokens-side", "4", "--calls", "2", "--threads", "1", "-o", "clps_samples=1",
         "-o", "w_grid=1.0,0.9", "-o", "a_grid=1.0,0.9", "--out", str(out)],
        cwd=BENCH, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    (row,), (floor,) = res["rows"], res["floors"]
    assert row["quantized"] == 2 * row["linears_per_block"] == 20
    # one block after the first within the window, 10 linears, 1 probed call
    assert row["probe_block_runs"] == 10
    assert 0 < row["window_floor_s"] <= row["clps_s"]  # a floor under what CLPS spent
    assert row["clps_probes"] == 20 * 4  # (1, 1) and the three other grid points
    # three blocks: 2 + 1 + 0 blocks after each within the window of 3
    assert floor["probe_block_runs"] == 3 * 10 and "clps_s" not in floor
    runs_s = floor["probe_block_runs"] * floor["block_forward_s"]
    assert abs(floor["window_floor_s"] - runs_s) < 0.1  # block_forward_s is rounded
