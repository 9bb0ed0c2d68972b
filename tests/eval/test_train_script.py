"""The DiT training script end to end on a one-block model for a few steps: it writes a
loadable checkpoint, records the run in config.json, and ``--init`` continues a run (the
weights change and the previous record nests under ``resumed_from``)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from clq_compile.eval.shapes_model import load_shapes_dit

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_shapes_dit.py"
TINY = ["--batch", "4", "--layers", "1", "--heads", "1", "--warmup", "1", "--threads", "1"]


def train(out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "config.json").read_text())


def test_train_then_resume(tmp_path):
    first = train(tmp_path / "a", "--steps", "3", "--seed", "1", "--snr-gamma", "0")
    run = first["training"]
    assert run["steps"] == 3 and run["resumed_from"] is None
    assert run["snr_gamma"] == 0 and "min-SNR" not in run["objective"]
    assert first["transformer"]["num_layers"] == 1

    second = train(tmp_path / "b", "--init", str(tmp_path / "a"), "--steps", "4",
                   "--save-every", "2", "--lr", "1e-2")
    assert second["training"]["steps"] == 4
    assert second["training"]["resumed_from"] == run
    assert "min-SNR-5 weighted" in second["training"]["objective"]

    (ta, _), (tb, _) = load_shapes_dit(tmp_path / "a"), load_shapes_dit(tmp_path / "b")
    wa, wb = ta.state_dict(), tb.state_dict()
    assert wa.keys() == wb.keys()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa), "resumed training changed nothing"
