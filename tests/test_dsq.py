"""D²Quant's dual-scale quantizer (clq_compile/dsq.py): never worse than RTN, better where
input channels differ in scale, deterministic."""

from __future__ import annotations

import pytest
import torch

import clq_compile as clq
from clq_compile.build import resolve
from clq_compile.dsq import dual_scale_quantize, with_scale
from clq_compile.errors import ConfigError, QuantizationError
from clq_compile.hadamard import hadamard
from clq_compile.ops import quant_linear_reference
from clq_compile.plan import TransformPlan
from clq_compile.qlinear import fold_weight, sqnr
from clq_compile.quant import pack_int4, quantize
from clq_compile.testing import tiny_dit


def weight(seed: int = 0, spread: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g) * 0.02
    cols = torch.exp(spread * torch.randn(128, generator=g))  # per-input-channel magnitude
    return w * cols


@pytest.mark.parametrize("group", [0, 32])
def test_never_worse_than_rtn(group: int) -> None:
    """Round 0 is RTN and the best round is kept: the error is RTN's or less."""
    w = weight()
    rtn = quantize(w, 4, group).dequantize()
    dsq = dual_scale_quantize(w, 4, group)
    assert dsq.error <= float(((rtn - w).double() ** 2).sum()) * (1 + 1e-6)
    assert torch.allclose(dsq.dequantize(), dsq.qt.dequantize() * dsq.s_c)
    again = dual_scale_quantize(w, 4, group)
    assert torch.equal(again.qt.q, dsq.qt.q) and torch.equal(again.s_c, dsq.s_c)


def test_gains_where_input_channels_differ_in_scale() -> None:
    """Columns of very different magnitude (log-normal, σ = 1): per-row scales are set
    by the largest columns and the small ones round to few levels; s_c evens them out."""
    w = weight(1, spread=1.0)
    rtn = sqnr(w, quantize(w, 4, 0).dequantize())
    dsq = dual_scale_quantize(w, 4, 0)
    assert dsq.rounds > 0
    assert sqnr(w, dsq.dequantize()) > rtn + 1.0


def test_errors() -> None:
    with pytest.raises(QuantizationError, match="2-D"):
        dual_scale_quantize(torch.zeros(8), 4)
    with pytest.raises(QuantizationError, match="iterations"):
        dual_scale_quantize(torch.zeros(4, 8), 4, iters=-1)


def test_with_a_transform_the_graph_computes_the_weight_dsq_fitted() -> None:
    """s_c joins the smooth before the rotation: the layer as the graph runs it (weight-
    only quant_linear on the transformed input, fold and pack as the rewrite does) is
    x[perm] · weightᵀ with DSQ's weight, to float32 rounding (~1e-6 relative; 1e-5 leaves
    room for the K=128 sums), and that weight beats RTN of the same transform."""
    w = weight(2, spread=1.0)
    g = torch.Generator().manual_seed(3)
    tp = TransformPlan(perm=torch.randperm(128, generator=g),
                       smooth=torch.rand(128, generator=g) + 0.5, rot=hadamard(32), kind="t")
    d = dual_scale_quantize(w, 4, 0, 0.9, 8, tp)
    assert d.rounds > 0 and d.error < 0.97 * d.rtn_error
    rtn = quantize(fold_weight(w, tp), 4, 0, 0.9)
    assert d.rtn_error == pytest.approx(float(((rtn.dequantize() @ torch.block_diag(
        *[hadamard(32).T] * 4) * tp.smooth - w[:, tp.perm]).double() ** 2).sum()), rel=1e-4)
    t = with_scale(tp, d.s_c)
    assert t.kind == "t+dsq"
    q = quantize(fold_weight(w, t), 4, 0, 0.9)
    x = torch.randn(7, 128, generator=g)
    y = quant_linear_reference(x, pack_int4(q.q), q.scale, None, 4, 16, 0, 1.0,
                               t.perm, t.smooth, t.rot)
    ref = x[:, tp.perm] @ d.dequantize().T
    assert float((y - ref).norm() / ref.norm()) < 1e-5


def test_option_on_a_model_and_its_refusals(caplog) -> None:
    """Each MLP down-projection gets its own s_c (inspect shows it), nothing else does;
    twin-log weights choose their own grid and refuse it; a graph without a
    down-projection says so."""
    model, inputs = tiny_dit()
    qm = clq.quantize(model, [inputs(0)], recipe="rtn", bits="w4a16", extra_shapes=None,
                      dsq=True)
    downs = [lp.name for lp in qm.plan.quantized_layers() if lp.role == "mlp_down"]
    assert downs and qm.plan.meta["dsq"]["layers"] == downs
    assert {lp.name for lp in qm.plan.quantized_layers() if qm.plan.transform_of(lp)} == \
        set(downs)
    text = clq.inspect(qm)
    assert text.count("dsq: weight error") == len(downs)
    with pytest.raises(ConfigError, match="dsq=True"):
        resolve("rtn", "w4a4", dsq=True, weights="twinlog")
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with caplog.at_level("WARNING", logger="clq_compile"):
        clq.quantize(mlp, [(torch.randn(4, 32),)], bits="w4a4", skip_roles=(), dsq=True)
    assert any("found no MLP down-projection" in r.getMessage() for r in caplog.records)
