"""LRQ-DiT's twin-log weight quantizer (arXiv 2508.03485, TLQ), the reference math: per
output row, the positive and the negative weights each on their own log2 grid, the sign
as the code's top bit.

For one half of a row: ``u = log2(|w| + η)``, levels uniform in u between the half's
minimum and its ``pct`` quantile, a weight decoded as ``2^û − η``. η and the two
percentiles are grid-searched per row on the weight's squared error (the paper's grids).

Readings chosen where the paper and its code disagree or are loose (methods.md §3):
- each half has 2^(b−1) levels, so sign + level index is exactly b bits (the released
  code clamps negatives to one level more, which b bits cannot store);
- the levels span [min, quantile] (step = range / (levels − 1)), so the top level is the
  clip point rather than one step below it;
- zeros belong to the positive half and do not enter its range.
A row decodes through a table of its 2^b values, which is how a lowering runs it (an
ONNX ``Gather``, a kernel's lookup).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from clq_compile.digest import content_key
from clq_compile.errors import QuantizationError
from clq_compile.quant import pack_int4, unpack_int4

# Tables are stored in float16 (32 bytes a row instead of 64): its 2^-11 relative rounding
# is far below a 4-bit grid step, and the search rounds the levels it tries to what the
# table will hold, so the codes are the nearest of the stored values. A weight with a
# level beyond float16's range keeps a float32 table (the whole layer's).
TABLE_DTYPE = torch.float16
ETAS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
PERCENTILES = (0.98, 0.99, 0.999, 0.9999, 0.99999)
OP_BITS = 4  # what clq.quant_linear's w_format "twinlog" stores


@dataclass(frozen=True)
class TwinLog:
    """Codes (N, K) uint8 in [0, 2^bits) (top bit: negative) and the per-row table
    (N, 2^bits) of the values they decode to; the chosen η and percentiles per row."""

    codes: torch.Tensor
    table: torch.Tensor
    eta: torch.Tensor
    pct_pos: torch.Tensor
    pct_neg: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.table.float().gather(1, self.codes.long())


@dataclass
class _Half:
    """One sign half of every row under one choice: error, levels, indices, η, pct."""

    err: torch.Tensor  # (N,)
    levels: torch.Tensor  # (N, n)
    idx: torch.Tensor  # (N, K)
    eta: torch.Tensor  # (N,)
    pct: torch.Tensor  # (N,)

    def keep_better(self, other: _Half, better: torch.Tensor) -> None:
        """Rows where ``better``: take ``other``'s choice."""
        for name in ("err", "levels", "idx", "eta", "pct"):
            mine = getattr(self, name)
            mask = better.reshape(-1, *[1] * (mine.dim() - 1))
            setattr(self, name, torch.where(mask, getattr(other, name), mine))


@dataclass(frozen=True)
class _Magnitudes:
    """One half's magnitudes, prepared once for every (η, pct) trial: in place (0 outside
    the half, with its mask) and sorted per row (NaN outside the half, last); log2(· + η)
    keeps the order, so every η's minimum and quantiles read from the sorted values."""

    filled: torch.Tensor  # (N, K)
    valid: torch.Tensor  # (N, K) bool
    values: torch.Tensor  # (N, K) sorted
    count: torch.Tensor  # (N,) magnitudes in the half
    zeros: torch.Tensor  # (N,) of them zero (leave the range when η = 0: log2(0))

    @classmethod
    def of(cls, mag: torch.Tensor) -> _Magnitudes:
        """``mag``: NaN outside the half."""
        valid = ~torch.isnan(mag)
        return cls(torch.nan_to_num(mag, nan=0.0), valid, torch.sort(mag, dim=1).values,
                   valid.sum(dim=1), (mag == 0).sum(dim=1))


def _levels(half: _Magnitudes, eta: float, pct: float, n: int) -> torch.Tensor:
    """(rows, n) ascending level values of one half: the range is [min, pct quantile] of
    u = log2(mag + η) over the finite u, the quantile interpolated linearly as
    ``torch.nanquantile`` does."""
    start = half.zeros if eta == 0.0 else torch.zeros_like(half.zeros)
    count = half.count - start
    empty = count <= 0  # a row without (finite) weights in this half
    last = half.values.shape[1] - 1
    pos = pct * (count - 1).clamp(min=0).to(half.values.dtype)
    below = pos.floor()
    i0 = (start + below.long()).clamp(0, last)
    i1 = (start + torch.minimum(below.long() + 1, (count - 1).clamp(min=0))).clamp(0, last)

    def u_at(i: torch.Tensor) -> torch.Tensor:
        return torch.log2(half.values.gather(1, i[:, None])[:, 0] + eta)

    lo = u_at(start.clamp(0, last))
    hi = torch.lerp(u_at(i0), u_at(i1), pos - below)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    step = (hi - lo).clamp(min=0.0) / (n - 1)
    idx = torch.arange(n, dtype=half.values.dtype)
    return _stored(torch.exp2(lo[:, None] + idx * step[:, None]) - eta).to(half.values.dtype)


def _stored(table: torch.Tensor) -> torch.Tensor:
    """``table`` in the dtype it is kept in (TABLE_DTYPE where every value fits)."""
    fits = bool(table.abs().max() <= torch.finfo(TABLE_DTYPE).max)
    return table.to(TABLE_DTYPE if fits else torch.float32)


def _nearest(mag: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the level nearest in value to each magnitude (the error the search
    minimizes; rounding in the log domain would pick a farther level for some)."""
    hi = torch.searchsorted(levels.contiguous(), mag.contiguous()).clamp(1, levels.shape[1] - 1)
    lo = hi - 1
    closer_lo = (mag - levels.gather(1, lo)).abs() <= (levels.gather(1, hi) - mag).abs()
    return torch.where(closer_lo, lo, hi)


def _half(mag: _Magnitudes, n: int, eta: float, percentiles) -> _Half:
    """The best percentile per row at this η, for one half."""
    best = None
    for pct in percentiles:
        levels = _levels(mag, eta, pct, n)
        idx = _nearest(mag.filled, levels)
        err = ((levels.gather(1, idx) - mag.filled) ** 2 * mag.valid).sum(dim=1)
        cand = _Half(err, levels, idx, torch.full_like(err, eta), torch.full_like(err, pct))
        if best is None:
            best = cand
        else:
            best.keep_better(cand, cand.err < best.err)
    return best


def twinlog_quantize(w: torch.Tensor, bits: int, etas=ETAS, percentiles=PERCENTILES
                     ) -> TwinLog:
    """(N, K) float weight → :class:`TwinLog` with the grid's best η and percentiles per
    row (ties: the first in grid order). η is shared by both halves of a row (the
    paper's search); the percentiles are chosen per half (the halves' errors add up)."""
    if w.dim() != 2 or not 2 <= bits <= 8:
        raise QuantizationError(f"twin-log takes a 2-D weight and 2-8 bits, got "
                                f"{tuple(w.shape)} at {bits} bits")
    if not torch.isfinite(w).all():
        raise QuantizationError("cannot quantize a weight holding NaN or Inf values")
    w = w.detach().double()
    n = 1 << (bits - 1)
    neg = w < 0
    pos_mag = _Magnitudes.of(torch.where(neg, torch.nan, w))
    neg_mag = _Magnitudes.of(torch.where(neg, -w, torch.nan))
    pos = neg_half = None
    for eta in etas:
        p, q = _half(pos_mag, n, eta, percentiles), _half(neg_mag, n, eta, percentiles)
        if pos is None:
            pos, neg_half = p, q
            continue
        better = p.err + q.err < pos.err + neg_half.err
        pos.keep_better(p, better)
        neg_half.keep_better(q, better)
    codes = torch.where(neg, neg_half.idx + n, pos.idx).to(torch.uint8)
    table = _stored(torch.cat([pos.levels, -neg_half.levels], dim=1))
    return TwinLog(codes, table, pos.eta.float(), pos.pct.float(), neg_half.pct.float(), bits)


_MEMO: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_MEMO_SIZE = 64  # layers; codes + table are about an eighth of a float32 weight's bytes


def twinlog_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight → the layout ``clq.quant_linear`` takes with ``w_format``
    "twinlog": the 4-bit codes less 8, packed as int4 (N, K/2) like integer weights,
    and the per-row table (N, 16) (float16, see TABLE_DTYPE) in the place of the scales.

    The search is the costly part of planning with twin-log weights, and calibration
    packs the same weight several times (CBC, CLPS probes, the rewrite), so results are
    memoized by the weight's content (a pure function: equal bytes, equal result)."""
    key = (*content_key(w), str(w.device))
    if key in _MEMO:
        _MEMO.move_to_end(key)
        w_q, table = _MEMO[key]
        return w_q.clone(), table.clone()
    tl = twinlog_quantize(w, OP_BITS)
    q = tl.codes.to(torch.int8) - (1 << (OP_BITS - 1))
    packed = pack_int4(q).to(w.device), tl.table.contiguous().to(w.device)
    _MEMO[key] = packed
    if len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return packed[0].clone(), packed[1].clone()


def twinlog_values(w_q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The float32 (N, K) weight that :func:`twinlog_weight`'s output stands for."""
    if table.dim() != 2 or table.shape[0] != w_q.shape[0] or table.shape[1] != 1 << OP_BITS:
        raise QuantizationError(f"a twin-log table is (N, {1 << OP_BITS}); got "
                                f"{tuple(table.shape)} for {w_q.shape[0]} rows")
    idx = unpack_int4(w_q).long() + (1 << (OP_BITS - 1))
    return table.float().gather(1, idx)
