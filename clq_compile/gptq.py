"""GPTQ weight rounding (Frantar et al., 2022): round one input column at a time and push
each column's rounding error onto the columns not yet rounded, weighted by the inverse
Hessian of the layer's inputs, so the *output* error x·(W - Q)ᵀ is small rather than the
weight error.

Scales are fixed before rounding from the clipped absmax of the (transformed) weight,
exactly as round-to-nearest computes them ("static groups"): the packed layout, the clip
ratios CLPS chose and every lowering stay as they are; only the integers change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clq_compile.errors import QuantizationError
from clq_compile.quant import pack_int4, qrange, symmetric_scale


@dataclass
class Hessian:
    """Running ``Σ w·xᵀx`` over calibration tokens (float64) of one input; ``w`` is 1
    except under Fisher weighting (clq_compile.fisher), one weight per call."""

    sum: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, k: int) -> Hessian:
        return cls(torch.zeros(k, k, dtype=torch.float64))

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def add_weighted(self, gram: torch.Tensor, tokens: int, weight: float) -> None:
        """Add ``weight·xᵀx`` from its precomputed ``gram`` = xᵀx (float64) of ``tokens``
        rows: layers reading one input share the product, each with its own weight."""
        self.sum.add_(gram, alpha=weight)
        self.tokens += tokens

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H⁻¹ after dampening; more dampening when H is singular."""
    mean_diag = float(h.diagonal().mean()) or 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for d in (damp, damp * 10, damp * 100, 1.0):
        l_, info = torch.linalg.cholesky_ex(h + d * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l_)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u, d
    raise QuantizationError("GPTQ: the calibration Hessian is not positive definite even "
                            "with dampening 1.0; the layer's inputs may be all zero")


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group: int = 0,
    clip: float = 1.0,
    damp: float = 0.01,
    act_order: bool = True,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(N, K) float weight and its (K, K) input Hessian -> (int values, packed when 4-bit;
    float32 scales (N, K/group) or (N, 1); the dampening used), the layout of
    :func:`clq_compile.quant.quantize_weight`. ``act_order`` rounds the columns with the
    largest Hessian diagonal (the busiest inputs) first, when the most error can still
    be compensated."""
    n, k = w.shape
    w = w.detach().float()
    scale = symmetric_scale(w, bits, group, clip).reshape(n, -1).contiguous()
    col_scale = scale.repeat_interleave(group, dim=1) if group else scale.expand(n, k)
    qmin, qmax = qrange(bits)
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    work = w.double().clone()
    work[:, dead] = 0.0
    order = (torch.argsort(h.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(k))
    work, s = work[:, order], col_scale.double()[:, order]
    u, used = _inverse_cholesky(h[order][:, order], damp)
    q = torch.empty_like(work)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        wb, err = work[:, i1:i2].clone(), torch.empty(n, i2 - i1, dtype=torch.float64)
        for j in range(i2 - i1):
            col, d = wb[:, j], u[i1 + j, i1 + j]
            qc = torch.clamp(torch.round(col / s[:, i1 + j]), qmin, qmax)
            q[:, i1 + j] = qc
            e = (col - qc * s[:, i1 + j]) / d
            wb[:, j:] -= e.unsqueeze(1) * u[i1 + j, i1 + j:i2].unsqueeze(0)
            err[:, j] = e
        work[:, i2:] -= err @ u[i1:i2, i2:]
    ints = torch.empty_like(q)
    ints[:, order] = q
    ints = ints.to(torch.int8)
    return (pack_int4(ints) if bits == 4 else ints), scale, used
