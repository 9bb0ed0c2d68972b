"""LRQ-DiT's twin-log weight quantizer (clq_compile/twinlog.py): codes and table, the
grid search against brute force, determinism, and heavy-tailed weights against RTN."""

from __future__ import annotations

import itertools

import pytest
import torch

from clq_compile.errors import QuantizationError
from clq_compile.quant import quantize
from clq_compile.twinlog import ETAS, PERCENTILES, twinlog_quantize


def laplace(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=g) - 0.5
    return -0.02 * torch.sign(u) * torch.log1p(-2 * u.abs())


def test_codes_table_and_signs() -> None:
    w = laplace(6, 64)
    tl = twinlog_quantize(w, 4)
    assert tl.codes.dtype == torch.uint8 and int(tl.codes.max()) < 16
    assert tl.table.shape == (6, 16)
    # top bit = negative half; each half's table ascends in magnitude
    assert torch.equal(tl.codes >= 8, w < 0)
    assert (tl.table[:, :8] >= 0).all() and (tl.table[:, 8:] <= 0).all()
    assert (tl.table[:, :8].diff(dim=1) >= 0).all() and (tl.table[:, 8:].diff(dim=1) <= 0).all()
    deq = tl.dequantize()
    assert torch.equal(deq.sign()[w != 0], w.sign()[w != 0])
    assert torch.equal(twinlog_quantize(w, 4).codes, tl.codes)  # deterministic


def test_tables_are_float16_and_codes_pick_the_nearest_stored_value() -> None:
    """The table is kept in float16 and the search rounds its levels first, so each code
    decodes to the stored value of its half nearest to the weight (not a value that
    was nearest only before rounding)."""
    w = laplace(64, 1024, seed=3)  # enough weights that some sit by a rounded midpoint
    tl = twinlog_quantize(w, 4)
    assert tl.table.dtype == torch.float16
    table = tl.table.double()
    dist = (w.double()[:, :, None] - table[:, None, :]).abs()  # (N, K, 16)
    same_half = (torch.arange(16) >= 8)[None, None, :] == (w < 0)[:, :, None]
    nearest = torch.where(same_half, dist, torch.inf).amin(dim=2)
    chosen = dist.gather(2, tl.codes.long()[:, :, None])[:, :, 0]
    assert torch.equal(chosen, nearest)
    huge = torch.tensor([[7e4, -1.0, 3.0, -2e5]])  # beyond float16: float32 table
    assert twinlog_quantize(huge, 4).table.dtype == torch.float32


def test_search_is_the_grid_minimum() -> None:
    """Per row, no (η, pct_pos, pct_neg) of the grid gives a smaller squared error than
    the chosen one (brute force over all 325 combinations, through the public API)."""
    w = laplace(3, 48, seed=1)
    tl = twinlog_quantize(w, 3)
    chosen = ((tl.dequantize().double() - w.double()) ** 2).sum(dim=1)
    for eta, pp, pn in itertools.product(ETAS, PERCENTILES, PERCENTILES):
        pos = twinlog_quantize(w, 3, etas=(eta,), percentiles=(pp,))
        neg = twinlog_quantize(w, 3, etas=(eta,), percentiles=(pn,))
        mixed = torch.where(w < 0, neg.dequantize(), pos.dequantize()).double()
        err = ((mixed - w.double()) ** 2).sum(dim=1)
        assert (chosen <= err * (1 + 1e-5) + 1e-12).all(), (eta, pp, pn)


def test_beats_uniform_rtn_on_heavy_tailed_weights() -> None:
    """Laplace-distributed rows (the heavy tails of trained DiT weights): log levels
    spend their codes near zero, where most weights are. At 3 and 4 bits the twin-log
    error is below per-channel round-to-nearest's."""
    w = laplace(32, 256, seed=2)
    for bits in (3, 4):
        rtn = quantize(w, bits, 0).dequantize()
        tl = twinlog_quantize(w, bits).dequantize()
        assert ((tl - w) ** 2).sum() < ((rtn - w) ** 2).sum(), bits


def test_rows_without_one_half_and_errors() -> None:
    w = torch.tensor([[0.1, 0.2, 0.0, 0.4], [-0.1, -0.3, -0.2, -0.05]])
    tl = twinlog_quantize(w, 4)
    assert torch.allclose(tl.dequantize(), w, atol=0.06)
    with pytest.raises(QuantizationError, match="2-D"):
        twinlog_quantize(torch.zeros(4), 4)
    with pytest.raises(QuantizationError, match="NaN"):
        twinlog_quantize(torch.tensor([[float("nan"), 1.0]]), 4)
