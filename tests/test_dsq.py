"""D²Quant's dual-scale quantizer (clq_compile/dsq.py): never worse than RTN, better where
input channels differ in scale, deterministic."""

from __future__ import annotations

import pytest
import torch

from clq_compile.dsq import dual_scale_quantize
from clq_compile.errors import QuantizationError
from clq_compile.qlinear import sqnr
from clq_compile.quant import quantize


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
