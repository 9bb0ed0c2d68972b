"""The low-rank branch (option ``lowrank=r``): the split against its SVD definition, the
branch in the graph, calibration and graph computing the same thing, composition with GPTQ,
save/load, inspect."""

import pytest
import torch

import clq_compile as clq
from clq_compile.annotations import layer_names
from clq_compile.lowrank import lowrank_split
from clq_compile.ops import quant_linear_reference
from clq_compile.passes.rewrite import LINEAR, QUANT_LINEAR
from clq_compile.plan import LayerPlan
from clq_compile.qlinear import pack_weight, quantized_linear, sqnr
from clq_compile.spec import parse_bits
from clq_compile.testing import held_out_sqnr, tiny_pixart


def test_split_is_the_truncated_svd():
    """Eckart–Young: the residual's Frobenius norm is that of the dropped singular values."""
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    up, down = lowrank_split(w, 8)
    assert up.shape == (40, 8) and down.shape == (8, 64)
    s = torch.linalg.svdvals(w.double())
    torch.testing.assert_close(torch.linalg.norm((w - up @ down).double()),
                               s[8:].pow(2).sum().sqrt(), rtol=1e-5, atol=1e-5)


def test_branch_absorbs_a_planted_low_rank_outlier_structure():
    """A weight = a few huge rank-1 directions + small noise (what rotation leaves behind
    when a few directions dominate): quantizing only the residual is far better."""
    g = torch.Generator().manual_seed(1)
    w = 0.05 * torch.randn(64, 128, generator=g)
    w += 3 * torch.randn(64, 2, generator=g) @ torch.randn(2, 128, generator=g)
    x = torch.randn(256, 128, generator=g)
    ref = x @ w.T
    lp = LayerPlan("l", "mlp_up", 0, 128, 64, 0, parse_bits("w4a8"))
    plain = quantized_linear(x, pack_weight(w, lp, None), None, lp)
    lp.rank = 4
    packed = pack_weight(w, lp, None)
    low = quantized_linear(x, packed, None, lp)
    # the quantized part is the residual; the branch is exactly (x·downᵀ)·upᵀ
    torch.testing.assert_close(
        low, quant_linear_reference(x, packed.w_q, packed.w_scale, None, 4, 8, 0, 1.0)
        + x @ packed.down.float().T @ packed.up.float().T, rtol=1e-5, atol=1e-5)
    assert sqnr(ref, low) > sqnr(ref, plain) + 10  # measured +38 dB (18.5 -> 56.8)
    assert packed.up.dtype == packed.down.dtype == torch.float16  # 16-bit branch


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart()



def test_lowrank_in_the_graph_inspect_and_save_load(pixart, tmp_path):
    model, inputs = pixart
    calib = [inputs(i) for i in range(3)]
    kw = dict(recipe="quarot", bits="w4a4", extra_shapes=None)
    base = clq.quantize(model, calib, measure=False, **kw)
    qm = clq.quantize(model, calib, lowrank=8, **kw)
    n_q = len(qm.plan.quantized_layers())
    nodes = list(qm.graph_module.graph.nodes)
    assert sum(len(layer_names(n)) for n in nodes if n.target == QUANT_LINEAR) == n_q
    assert sum(n.target == LINEAR for n in nodes) == 2 * n_q + (
        sum(n.target == LINEAR for n in base.graph_module.graph.nodes))
    assert all(lp.rank == 8 for lp in qm.plan.quantized_layers())
    # calibration measured what the graph runs: per-layer SQNR is finite and the model
    # output gains on held-out calls (measured +2.5 dB on this random-weight model)
    assert all(lp.sqnr_db is not None for lp in qm.plan.quantized_layers())
    assert held_out_sqnr(model, qm, inputs) > held_out_sqnr(model, base, inputs) + 1
    text = clq.inspect(qm)
    assert "lowrank r=8" in text
    assert qm.weight_bytes() > base.weight_bytes()
    qm.save(tmp_path / "q")
    loaded = clq.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(qm(**inputs(5))[0], loaded(**inputs(5))[0])


def test_lowrank_composes_with_gptq(pixart):
    model, inputs = pixart
    calib = [inputs(i) for i in range(3)]
    kw = dict(recipe="quarot", bits="w4a8", measure=False, extra_shapes=None, lowrank=8)
    low = clq.quantize(model, calib, **kw)
    both = clq.quantize(model, calib, weights="gptq", **kw)
    assert all(pw.up is not None for pw in both.plan.weights.values())
    assert held_out_sqnr(model, both, inputs) > held_out_sqnr(model, low, inputs) + 1


def test_lowrank_is_validated_and_refused_by_the_backend(pixart):
    model, inputs = pixart
    with pytest.raises(clq.ConfigError, match=r"lowrank=-1"):
        clq.quantize(model, [inputs(0)], lowrank=-1)
    compiled = torch.compile(model, backend="clq", options={"lowrank": 4})
    with pytest.raises(Exception, match=r"lowrank=4.*clq.quantize"):
        compiled(**inputs(0))
