"""Smoke test of the quality harness on 2 samples: FP, a bf16 row, and RTN W8A8 through
clq_compile.quantize. Floors: bf16 and W8A8 keep the transformer output above 20 dB SQNR
(each is ~35-45 dB on this model; a broken quantizer or wrong calibration wiring gives
near 0 dB). ShapeEval over 2 samples is too noisy to gate, so only its range is checked.
The FP model itself, run as a method, must agree with FP on every sample; the noise control
row must hit the SQNR it was set to."""

import json

import pytest
import torch

import clq_compile as clq
from clq_compile.eval import (
    CastTransformer,
    NoisyTransformer,
    evaluate,
    load_judge,
    load_shapes_dit,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    transformer, encoder = load_shapes_dit()
    methods = {
        ("bf16", "bf16"): lambda calib: CastTransformer(transformer, torch.bfloat16),
        ("rtn", "w8a8"): lambda calib: clq.quantize(transformer, calib, recipe="rtn",
                                                    bits="w8a8", extra_shapes=None),
        ("noise", "control"): lambda calib: NoisyTransformer(transformer, 25.0),
        ("fp again", "fp32"): lambda calib: transformer,
    }
    out = tmp_path_factory.mktemp("quality")
    rep = evaluate(transformer, encoder, load_judge(), methods, n_samples=2, steps=4,
                   n_calib_prompts=2, calib_steps=[0, 3], out_dir=out, progress=False)
    return rep, out


def test_rows_and_metrics(report):
    rep, _ = report
    assert [(r.method, r.bits) for r in rep.results] == [
        ("fp32", "fp32"), ("bf16", "bf16"), ("rtn", "w8a8"), ("noise", "control"),
        ("fp again", "fp32")]
    fp, same = rep.results[0], rep.results[-1]
    assert same.fp_agreement == 1.0 and same.shapeeval == fp.shapeeval
    assert same.fp_disagree == [] and same.disagree_psnr_db == []
    assert same.disagree_fp_margin == [] and same.disagree_fp_rank == []
    noise = rep.results[-2]  # white noise scaled per call: the set SQNR, to sampling error
    assert abs(noise.sqnr_db - 25.0) < 0.2 and abs(noise.sqnr_calib_db - 25.0) < 0.2, noise
    assert same.sqnr_db is None and same.psnr_db == 100.0  # identical: SQNR inf, PSNR capped
    assert fp.psnr_db is None and fp.sqnr_db is None and fp.fp_agreement is None
    for r in rep.results:
        assert 0.0 <= r.shapeeval <= 1.0
    for r in rep.results[1:-1]:
        assert r.sqnr_db is not None and r.sqnr_db > 20.0, r
        assert r.sqnr_calib_db is not None and r.sqnr_calib_db > 20.0, r
        assert r.psnr_db is not None and r.psnr_db > 15.0, r
        assert r.fp_agreement is not None and 0.0 <= r.fp_agreement <= 1.0, r
        flips = round((1 - r.fp_agreement) * 2)  # 2 samples
        assert len(r.fp_disagree) == len(r.disagree_psnr_db) == flips, r
        assert len(r.disagree_fp_margin) == len(r.disagree_fp_rank) == flips, r
        assert all(0.0 <= m <= 1.0 for m in r.disagree_fp_margin), r
        assert all(0 <= k < 2 for k in r.disagree_fp_rank), r
    assert rep.config["calib_calls"] == 2 and rep.config["held_out_calls"] == 2


def test_outputs_written(report):
    rep, out = report
    data = json.loads((out / "results.json").read_text())
    assert len(data["results"]) == 5
    table = (out / "table.md").read_text()
    assert "rtn" in table and "w8a8 ShapeEval" in table
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.width > 3 * 96 and grid.height > 2 * 96
