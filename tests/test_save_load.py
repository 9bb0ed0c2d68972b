"""``qm.save`` / ``clq.load``: a fresh process without the model class, the calibration
data or any recalibration gets the saved model's outputs bit for bit; a missing, corrupt,
truncated or newer directory is a clear error; writes are atomic."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.utils._pytree as pytree
from safetensors.torch import save_file

import clq_compile as clq
from clq_compile.testing import TINY_MODELS, tiny_pixart

RECIPES = ["rtn", "smoothquant", "quarot", "clq"]
BITS = ["w8a8", "w4a8", "w4a4", "w4a16"]
CLQ_BUDGET = {"w_grid": (1.0, 0.9), "a_grid": (1.0, 0.9), "clps_samples": 1}


def _options(recipe):
    return CLQ_BUDGET if recipe == "clq" else {}


# On PixArt: rtn at every bits setting (every weight/activation layout), and each
# transform recipe at one 8-bit and one 4-bit activation setting (every transform kind
# with both weight widths; the full 16-pair matrix cost a minute more of CI for layouts
# already covered); clq W4A4 on every architecture (with its graphs for other sizes
# where the model specializes); clq W4A4 on the trained shapes DiT.
PAIRS = {"rtn": BITS, "smoothquant": ["w8a8", "w4a4"], "quarot": ["w4a8", "w4a16"],
         "clq": ["w4a4", "w8a8"]}
assert set(PAIRS) == set(RECIPES)
CASES = [("pixart", r, b) for r in RECIPES for b in PAIRS[r]] + [
    (m, "clq", "w4a4") for m in TINY_MODELS if m != "pixart"] + [("shapes", "clq", "w4a4")]


def _shapes_dit():
    from clq_compile.eval import calibration_calls, load_shapes_dit

    transformer, encoder = load_shapes_dit()
    calib = calibration_calls(transformer, encoder, n_prompts=2, steps=4, at_steps=[0, 3],
                              batch_size=2)
    tests = [calib[1], {**calib[0], "hidden_states": torch.randn(4, 3, 32, 32)}]
    return transformer, calib, tests


def _build(name, recipe, bits):
    extra = "auto" if (recipe, bits) == ("clq", "w4a4") else None
    if name == "shapes":
        model, calib, tests = _shapes_dit()
    else:
        # one block of PixArt for the recipe x bits matrix: what differs between the
        # cases is the plan (transforms, specs), not the depth
        model, inputs = tiny_pixart(layers=1) if name == "pixart" else TINY_MODELS[name]()
        calib = [inputs(0), inputs(1)]
        tests = [inputs(5), inputs(6, b=3)]
        if name == "pixart" and extra:  # another resolution: the second graph
            tests.append({**inputs(7), "hidden_states": torch.randn(2, 4, 12, 12)})
    qm = clq.quantize(model, calib, recipe=recipe, bits=bits, extra_shapes=extra,
                      measure=False, **_options(recipe))
    return qm, tests


def _write_calls(path, calls):
    """Calls as safetensors + JSON (tensors and the structure), no pickle."""
    tensors, meta = {}, []
    for j, call in enumerate(calls):
        leaves, spec = pytree.tree_flatten(call)
        kinds = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                tensors[f"{j}.{i}"] = leaf.contiguous()
                kinds.append(None)
            else:
                kinds.append([leaf])
        meta.append({"spec": pytree.treespec_dumps(spec), "leaves": kinds})
    save_file(tensors, str(path / "calls.safetensors"))
    (path / "calls.json").write_text(json.dumps(meta))


LOADER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    import torch.utils._pytree as pytree
    from safetensors.torch import load_file
    import clq_compile as clq

    results = {}
    for case in sorted(Path(sys.argv[1]).iterdir()):
        tensors = load_file(str(case / "calls.safetensors"))
        expect = load_file(str(case / "expect.safetensors"))
        qm = clq.load(case / "model")
        same = []
        for j, entry in enumerate(json.loads((case / "calls.json").read_text())):
            # clone: safetensors hands out tensors at unaligned addresses, and a CPU
            # kernel may then vectorize a reduction differently (1 ulp on Flux's RoPE)
            leaves = [tensors[f"{j}.{i}"].clone() if k is None else k[0]
                      for i, k in enumerate(entry["leaves"])]
            call = pytree.tree_unflatten(leaves, pytree.treespec_loads(entry["spec"]))
            with torch.no_grad():
                same.append(torch.equal(qm(**call)[0], expect[str(j)]))
        results[case.name] = {"bitexact": same, "graphs": len(qm.graphs),
                              "inspect": clq.inspect(qm).splitlines()[-1]}
    model_classes = [m for m in sys.modules if m.startswith("diffusers.models.transformers.")
                     and not m.endswith("__init__")]
    print(json.dumps({"results": results, "model_classes": model_classes}))
""")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Quantize and save every case here, load them all in one fresh process."""
    root = tmp_path_factory.mktemp("saved")
    summaries = {}
    for name, recipe, bits in CASES:
        case = root / f"{name}-{recipe}-{bits}"
        case.mkdir()
        qm, tests = _build(name, recipe, bits)
        qm.save(case / "model")
        _write_calls(case, tests)
        with torch.no_grad():
            save_file({str(j): qm(**c)[0].contiguous() for j, c in enumerate(tests)},
                      str(case / "expect.safetensors"))
        summaries[case.name] = (len(qm.graphs), clq.inspect(qm).splitlines()[-1])
    res = subprocess.run([sys.executable, "-c", LOADER, str(root)], capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out, summaries


@pytest.mark.parametrize("name,recipe,bits", CASES, ids=["-".join(c) for c in CASES])
def test_load_in_a_fresh_process_is_bit_exact(loaded, name, recipe, bits):
    out, summaries = loaded
    key = f"{name}-{recipe}-{bits}"
    got = out["results"][key]
    assert got["bitexact"] and all(got["bitexact"]), got
    graphs, summary = summaries[key]
    assert got["graphs"] == graphs
    assert got["inspect"] == summary  # inspect reads the same plan and sizes back


def test_loading_needs_no_model_class(loaded):
    out, _ = loaded
    assert out["model_classes"] == []  # no diffusers transformer module was imported


# -- inspect / export_onnx on a loaded model -----------------------------------------


@pytest.fixture(scope="module")
def saved_pixart(tmp_path_factory):
    model, inputs = tiny_pixart()
    qm = clq.quantize(model, [inputs(0)], recipe="clq", bits="w4a4", extra_shapes=None,
                      **CLQ_BUDGET)
    path = qm.save(tmp_path_factory.mktemp("pixart") / "q")
    return qm, path, inputs


def test_export_onnx_of_a_loaded_model(saved_pixart, tmp_path):
    """A loaded model exports, and its qdq file computes the loaded model as every export
    must (``onnx_probes.assert_exact``, derivation in test_onnx_models' docstring): local
    activation codes only ±1 at a rounding tie, the reference run on ORT's own codes
    within FP32_TOL. (The plain output's SQNR, which a fixed 40 dB floor checked, falls
    with each tie that upstream float drift, different on each CPU's kernels, flips.)"""
    from tests.onnx.conftest import Case
    from tests.onnx.onnx_probes import assert_exact

    _, path, inputs = saved_pixart
    loaded = clq.load(path)
    onnx_path = clq.export_onnx(loaded, tmp_path / "m.onnx")
    model, _ = tiny_pixart()  # the float model saved_pixart quantized: the same seed
    assert_exact(Case("pixart", "w4a4", "qdq", loaded, model, inputs, onnx_path), seed=4)


# -- bad directories -------------------------------------------------------------------


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(clq.LoadError, match="is not a directory"):
        clq.load(tmp_path / "nowhere")


def test_directory_without_index(tmp_path):
    with pytest.raises(clq.LoadError, match="holds no clq.json"):
        clq.load(tmp_path)


def test_corrupt_index(saved_pixart, tmp_path):
    d = _copy(saved_pixart[1], tmp_path)
    (d / "clq.json").write_text("{not json")
    with pytest.raises(clq.LoadError, match="clq.json is corrupt"):
        clq.load(d)


def test_truncated_weights(saved_pixart, tmp_path):
    d = _copy(saved_pixart[1], tmp_path)
    w = d / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(clq.LoadError, match="weights.safetensors does not match the checksum"):
        clq.load(d)


def test_missing_graph_file(saved_pixart, tmp_path):
    d = _copy(saved_pixart[1], tmp_path)
    (d / "graph_0.json").unlink()
    with pytest.raises(clq.LoadError, match="incomplete: graph_0.json is missing"):
        clq.load(d)


def test_newer_format_version(saved_pixart, tmp_path):
    d = _copy(saved_pixart[1], tmp_path)
    index = json.loads((d / "clq.json").read_text())
    index["version"] = 99
    (d / "clq.json").write_text(json.dumps(index))
    with pytest.raises(clq.LoadError, match="format version 99.*upgrade clq_compile"):
        clq.load(d)


def test_failed_save_keeps_the_previous_directory(saved_pixart, tmp_path, monkeypatch):
    import clq_compile.serialize as ser

    qm, path, inputs = saved_pixart
    d = _copy(path, tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def disk_full(tensors, filename, **kw):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ser, "save_file", disk_full)
    with pytest.raises(clq.SaveError, match=r"could not write .*copy.*No space"):
        qm.save(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary left
    with torch.no_grad():
        assert torch.equal(clq.load(d)(**inputs(2))[0], qm(**inputs(2))[0])


def test_save_over_a_previous_save(saved_pixart, tmp_path):
    qm, path, inputs = saved_pixart
    d = _copy(path, tmp_path)
    (d / "stale_extra_file").write_text("left by an older save")
    qm.save(d)
    assert not (d / "stale_extra_file").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
