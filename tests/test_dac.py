"""D²Quant's deviation-aware correction (``dac=True``, clq_compile/dac.py): sites found
from the graph, biases that make the quantized model's mean at each site the
full-precision model's on the calibration tokens, carried by save/load and ONNX."""

import inspect as pyinspect
import logging

import pytest
import torch

import clq_compile as clq
from clq_compile.build import resolve
from clq_compile.errors import ConfigError
from clq_compile.lowering.onnx import export_onnx
from clq_compile.passes.graph_utils import module_path
from clq_compile.testing import TINY_MODELS

# The post-attention norm of each diffusers block, read from its source: DiT's
# BasicTransformerBlock (ada_norm_zero, no cross-attention) feeds the MLP from norm3;
# PixArt's (ada_norm_single) applies no norm before its cross-attention, so norm2 follows
# attn2; SD3/Flux joint blocks norm both streams (SD3's last block keeps no context
# stream); Flux's single blocks have no norm after attention; Wan norms before its
# cross-attention (norm2) and before its FFN (norm3).
SITES = {
    "dit": {"transformer_blocks.0.norm3", "transformer_blocks.1.norm3"},
    "pixart": {"transformer_blocks.0.norm2", "transformer_blocks.1.norm2"},
    "sd3": {"transformer_blocks.0.norm2", "transformer_blocks.0.norm2_context",
            "transformer_blocks.1.norm2"},
    "flux": {"transformer_blocks.0.norm2", "transformer_blocks.0.norm2_context"},
    "wan": {"blocks.0.norm2", "blocks.0.norm3", "blocks.1.norm2", "blocks.1.norm3"},
}


def is_dac_add(n: torch.fx.Node) -> bool:
    """A norm's output plus its DAC bias, as AddNormBiases writes it."""
    bias = n.args[1] if n.op == "call_function" and len(n.args) > 1 else None
    return isinstance(bias, torch.fx.Node) and bias.op == "get_attr" and \
        str(bias.target).startswith("clq_dac")


def dac_site_paths(gm: torch.fx.GraphModule) -> set[str]:
    """Module paths of the norms a quantized graph adds a DAC bias after (tested on every
    architecture in tests/integration/test_diffusers_rtn.py)."""
    return {module_path(n) for n in gm.graph.nodes if is_dac_add(n)}


def _norm_means(model, calls, paths):
    """Per-channel mean over the calibration tokens of each norm module's output (hooks
    on the float model)."""
    sums = {p: [0.0, 0] for p in paths}

    def hook(path):
        def f(_, __, out):
            x = out.detach().double().reshape(-1, out.shape[-1])
            sums[path][0] = sums[path][0] + x.sum(0)
            sums[path][1] += x.shape[0]
        return f

    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    with torch.no_grad():
        for call in calls:
            model(**call)
    for h in handles:
        h.remove()
    return {p: s / n for p, (s, n) in sums.items()}


class _Sites(torch.fx.Interpreter):
    """Runs a quantized graph, summing the output of each DAC add (a norm plus its bias)."""

    def __init__(self, gm, sums):
        super().__init__(gm)
        self.sums = sums

    def run_node(self, n):
        out = super().run_node(n)
        if is_dac_add(n):
            x = out.detach().double().reshape(-1, out.shape[-1])
            s = self.sums.setdefault(module_path(n), [0.0, 0])
            s[0], s[1] = s[0] + x.sum(0), s[1] + x.shape[0]
        return out


def _graph_means(qm, calls):
    sums = {}
    gm = qm.graph_module
    names = list(pyinspect.signature(gm.forward).parameters)
    with torch.no_grad():
        for call in calls:
            normal, _ = qm.call_spec.normalize((), call)
            _Sites(gm, sums).run(*[normal[k] for k in names])
    return {p: s / n for p, (s, n) in sums.items()}


@pytest.mark.parametrize("arch", ["dit", "wan"])
def test_corrected_means_equal_the_float_models(arch):
    """At every site the deployed graph's corrected norm output has the float model's
    per-channel mean on the calibration tokens (float64 sums of float32 values: equal to
    ~1e-6; the shift corrected is ~1e-3), and the earlier sites' biases are accounted for
    in the later ones (Wan has two per block). Without DAC the means differ."""
    model, inputs = TINY_MODELS[arch]()
    calls = [inputs(i) for i in range(3)]
    qm = clq.quantize(model, calls, recipe="rtn", bits="w4a4", extra_shapes=None, dac=True)
    assert len(qm.plan.dac) == len(SITES[arch]) and qm.plan.meta["dac"]["sites"] == len(SITES[arch])
    fp = _norm_means(model, calls, SITES[arch])
    got = _graph_means(qm, calls)
    assert set(got) == dac_site_paths(qm.graph_module) == SITES[arch]
    for p in SITES[arch]:
        assert (got[p] - fp[p]).abs().max() < 2e-6, p
    again = clq.quantize(model, calls, recipe="rtn", bits="w4a4", extra_shapes=None,
                         dac=True, measure=False)
    assert all(torch.equal(again.plan.dac[k], v) for k, v in qm.plan.dac.items())
    shift = max(float(v.abs().max()) for v in qm.plan.dac.values())
    assert shift > 1e-4  # the correction is not vacuous
    text = clq.inspect(qm)
    assert f"DAC biases after {len(SITES[arch])} norms" in text and "dac: bias" in text


def test_dac_round_trips_and_exports(tmp_path):
    """Saved and loaded, the DAC biases and outputs are bit for bit the same. Exported,
    every bias is an initializer of the file, and ORT computes the quantized model as
    ``onnx_probes.assert_exact`` checks every export (derivation in test_onnx_models'
    docstring): local activation codes only ±1 at a rounding tie, and the reference run
    on ORT's own codes within FP32_TOL. A fixed margin on the plain output (it was 10 dB
    past the quantization noise) holds only while no tie flips: upstream float drift,
    which differs with each CPU's kernels, can flip one, and the network carries it on
    by an amount no float tolerance bounds."""
    model, inputs = TINY_MODELS["dit"]()
    calls = [inputs(i) for i in range(2)]
    qm = clq.quantize(model, calls, recipe="rtn", bits="w4a4", extra_shapes=None, dac=True,
                      measure=False)
    plain = clq.quantize(model, calls, recipe="rtn", bits="w4a4", extra_shapes=None,
                         measure=False)
    x = inputs(7)
    with torch.no_grad():
        ref, base = qm(**x)[0], plain(**x)[0]
    assert not torch.equal(ref, base)
    back = clq.load(qm.save(tmp_path / "q"))
    assert set(back.plan.dac) == set(qm.plan.dac)
    assert all(torch.equal(back.plan.dac[k], v) for k, v in qm.plan.dac.items())
    assert torch.equal(back(**x)[0], ref)
    import onnx
    from onnx import numpy_helper

    from tests.onnx.conftest import Case
    from tests.onnx.onnx_probes import assert_exact

    path = export_onnx(qm, tmp_path / "dac.onnx", target="qdq")
    inits = [torch.from_numpy(numpy_helper.to_array(t).copy())
             for t in onnx.load(str(path)).graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT]
    for bias in qm.plan.dac.values():
        assert any(t.shape == bias.shape and torch.equal(t.float(), bias) for t in inits)
    assert_exact(Case("dit", "w4a4", "qdq", qm, model, inputs, path), seed=7)


def test_dac_option_is_checked_and_an_attention_free_graph_says_so(caplog):
    with pytest.raises(ConfigError, match="dac='yes'"):
        resolve("rtn", "w4a4", dac="yes")
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                              torch.nn.LayerNorm(64), torch.nn.Linear(64, 32))
    with caplog.at_level(logging.WARNING, logger="clq_compile"):
        qm = clq.quantize(mlp, [(torch.randn(4, 32),)], bits="w4a4", skip_roles=(), dac=True)
    assert not qm.plan.dac
    assert any("found no norm after an attention block" in r.getMessage()
               for r in caplog.records)
    assert "WARNING: dac=True found no norm" in clq.inspect(qm)
