"""D²Quant's dual-scale quantizer (arXiv 2602.02546, DSQ), the reference math: a weight
(N out, K in) as ``diag(s) · Q · diag(s_c)``, the usual per-row (or per-group) scales s
and an extra per-input-channel scale s_c, found by alternating updates.

Each round: with s_c fixed, Q and s are round-to-nearest of ``W · diag(1/s_c)``; with
Q and s fixed, each s_c[j] is the least-squares fit of column j (closed form). Rounding
is not the minimizer of its step, so the error need not fall every round: the best
round is kept, and round 0 is plain RTN (s_c = 1), so DSQ is never worse than RTN.

In a DiT MLP the down-projection reads GELU(up(x)), which is not linear in up's output,
so s_c cannot be folded into the up-projection as in SwiGLU LLMs (the paper's place);
it belongs in the activation quantizer's per-channel multiply, where it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clq_compile.errors import QuantizationError
from clq_compile.quant import QTensor, quantize

EPS = 1e-12


@dataclass(frozen=True)
class DualScale:
    """Q with its row/group scales (``qt``), the input-channel scales, the kept round."""

    qt: QTensor
    s_c: torch.Tensor  # (K,) float32
    rounds: int  # the round whose result is kept (0: plain RTN)
    error: float  # squared error of the kept round

    def dequantize(self) -> torch.Tensor:
        return self.qt.dequantize() * self.s_c


def dual_scale_quantize(w: torch.Tensor, bits: int, group: int = 0, clip: float = 1.0,
                        iters: int = 8) -> DualScale:
    if w.dim() != 2:
        raise QuantizationError(f"DSQ takes a 2-D weight, got shape {tuple(w.shape)}")
    if iters < 0:
        raise QuantizationError(f"DSQ iterations must be >= 0, got {iters}")
    w = w.detach().float()
    s_c = torch.ones(w.shape[1])
    best = None
    for r in range(iters + 1):
        qt = quantize(w / s_c, bits, group, clip)
        a = qt.dequantize()
        err = float(((a * s_c - w).double() ** 2).sum())
        if best is None or err < best.error:
            best = DualScale(qt, s_c, r, err)
        den = (a * a).sum(dim=0)
        fit = (w * a).sum(dim=0) / den.clamp(min=EPS)
        # a column the round quantized to all zeros has no fit: keep its scale
        s_c = torch.where((den > EPS) & (fit > 0), fit, s_c)
    return best
