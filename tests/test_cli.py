"""The ``clq`` command line, verb by verb, on a one-block shapes-DiT checkpoint written
here (the committed one works the same, only slower)."""

import json
import subprocess
import sys

import pytest
import torch

# imported at collection: what its dependencies print on import (a torchao built for
# another Python) is then not in the stderr a test reads
import clq_compile.eval  # noqa: F401
from clq_compile.cli import main

VERBS = ["quantize", "inspect", "export-onnx", "sample", "eval"]


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help_of_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"] if verb is None else [verb, "--help"])
    assert e.value.code == 0
    assert "usage: clq" in capsys.readouterr().out


def test_python_dash_m_and_console_script_are_the_same_cli():
    res = subprocess.run([sys.executable, "-m", "clq_compile", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "export-onnx" in res.stdout
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "clq"]
    assert script.value == "clq_compile.cli:main"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from clq_compile.eval import CaptionEncoder, build_transformer
    from clq_compile.eval.shapes_model import save_shapes_dit

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    transformer = build_transformer(num_layers=1, num_attention_heads=2, attention_head_dim=32,
                                    cross_attention_dim=64, caption_channels=32)
    save_shapes_dit(path, transformer, CaptionEncoder(caption_channels=32), {"note": "test"})
    return path


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "model"
    code = main(["--threads", "2", "quantize", "--checkpoint", str(checkpoint), "--out", str(out),
                 "--budget", "fast", "--calib-prompts", "2", "--calib-steps", "2", "--steps", "4",
                 "-o", "window=1"])
    assert code == 0
    return out


def test_quantize_saves_a_loadable_model(quantized, checkpoint, capsys):
    import clq_compile as clq

    qm = clq.load(quantized)
    assert qm.plan.recipe == "clq" and qm.plan.spec.name == "w4a4"
    assert qm.source["checkpoint"] == str(checkpoint)


def test_inspect(quantized, capsys):
    assert main(["inspect", str(quantized)]) == 0
    out = capsys.readouterr().out
    assert "transformer_blocks.0.attn1.to_q" in out and "linears quantized" in out


def test_export_onnx(quantized, tmp_path, capsys):
    assert main(["export-onnx", str(quantized), str(tmp_path / "m.onnx"), "--target",
                 "ort-cpu"]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert "target ort-cpu" in capsys.readouterr().out


def test_sample_writes_fp_beside_quantized(quantized, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "grid.png"
    assert main(["sample", str(quantized), "--prompt", "red circle top-left", "--seeds", "2",
                 "--steps", "4", "--out", str(png)]) == 0
    assert Image.open(png).size[1] > 2 * 96  # two rows of samples under the header
    assert "FP beside clq w4a4" in capsys.readouterr().out


def test_eval_reports_the_harness_metrics(quantized, tmp_path, capsys):
    assert main(["eval", str(quantized), "--samples", "4", "--steps", "4", "--out",
                 str(tmp_path / "ev")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == {"shapeeval", "fp_agreement", "psnr_db", "sqnr_db"}
    assert (tmp_path / "ev" / "results.json").exists()


def refused(argv, capsys) -> str:
    """Run the CLI in process: a user mistake exits 2 (returned, or argparse's SystemExit)
    with one line on stderr, and no exception escapes (that would be a traceback)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("argv", "expect"), [
    (["quantize", "--out", "q", "--calib-prompts", "0"], "--calib-prompts: 0 is not a count"),
    (["quantize", "--out", "q", "--calib-prompts", "-1"], "--calib-prompts: -1 is not a count"),
    (["quantize", "--out", "q", "--calib-steps", "0"], "argument --calib-steps: 0 is not a count"),
    (["quantize", "--out", "q", "--steps", "0"], "argument --steps: 0 is not a count"),
    (["quantize", "--out", "q", "--seed", "-1"], "argument --seed: -1 is not a seed"),
    (["eval", "q", "--samples", "0"], "argument --samples: 0 is not a count"),
    (["eval", "q", "--samples", "-5"], "argument --samples: -5 is not a count"),
    (["eval", "q", "--samples", "many"], "argument --samples: 'many' is not an integer"),
    (["eval", "q", "--steps", "0"], "argument --steps: 0 is not a count"),
    (["sample", "q", "--prompt", "red circle top-left", "--seeds", "0"], "--seeds: 0 is not"),
    (["sample", "q", "--prompt", "red circle top-left", "--steps", "0"], "--steps: 0 is not"),
    (["sample", "q", "--prompt", "zzz circle top-left"],
     "argument --prompt: unknown colour 'zzz' in caption 'zzz circle top-left'; known: "),
    (["sample", "q", "--prompt", "red circle"], "--prompt: caption must be 'colour shape"),
    (["sample", "q", "--prompt", "red circle top-left", "--out", "grid"],
     "argument --out: 'grid' has no image suffix"),
    (["sample", "q", "--prompt", "red circle top-left", "--out", "no/such/dir/g.png"],
     "directory 'no/such/dir' not found"),
    (["--threads", "0", "inspect", "q"], "argument --threads: 0 is not a count"),
    ([], "the following arguments are required: COMMAND"),
])
def test_a_user_mistake_is_one_line_and_exit_code_2(argv, expect, capsys):
    """The option, the value and what is wrong, from argparse's types, before any model
    is loaded (the directory ``q`` does not exist)."""
    err = refused(argv, capsys)
    assert err.startswith("clq") and ": error: " in err and expect in err


def test_eval_out_that_is_a_file_is_refused_before_sampling(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    err = refused(["eval", str(tmp_path), "--out", str(tmp_path / "f")], capsys)
    assert f"argument --out: '{tmp_path / 'f'}' is a file, not a directory" in err


def test_bad_option_is_a_clear_error(checkpoint, tmp_path, capsys):
    err = refused(["quantize", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"),
                   "-o", "window=-2", "--calib-prompts", "1", "--calib-steps", "1",
                   "--steps", "2"], capsys)
    assert "option window=-2 is not allowed" in err


def test_sample_of_a_model_not_from_a_shapes_checkpoint(tmp_path, capsys):
    import clq_compile as clq
    from clq_compile.testing import tiny_pixart

    model, inputs = tiny_pixart()
    clq.quantize(model, [inputs(0)], bits="w8a8", extra_shapes=None).save(tmp_path / "p")
    err = refused(["sample", str(tmp_path / "p"), "--prompt", "red circle top-left"], capsys)
    assert "was not quantized from a shapes-DiT checkpoint" in err


def test_quantize_under_torchrun_splits_the_work_and_saves_once(checkpoint, tmp_path):
    """The README's command: two gloo ranks, each doing half of CLPS's probes; rank 0
    saves. (That the plan equals one process's is tests/test_shard.py.)"""
    out = tmp_path / "q"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "clq_compile", "--threads", "1", "quantize", "--checkpoint", str(checkpoint),
         "--out", str(out), "--budget", "fast", "--calib-prompts", "2", "--calib-steps", "2",
         "--steps", "4", "-o", "window=1"],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("saved") == 1
    import clq_compile as clq

    meta = clq.load(out).plan.meta
    assert meta["ranks"] == 2
    assert meta["clps_probes_per_rank"][0] == meta["clps_probes_per_rank"][1] > 0
