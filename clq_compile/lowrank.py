"""The low-rank branch (SVDQuant's form, option ``lowrank=r``): after the layer's
transform, W' = L_up·L_down + R, with L_up·L_down the best rank-r approximation of W' (its
truncated SVD) kept in float and only the residual R quantized. The graph computes
``quant_linear(T(x), R) + (T(x)·L_downᵀ)·L_upᵀ``: the few large singular directions
that outlive the rotation never meet the 4-bit grid.

The branch is stored in 16 bits (fp16 for a float32 model, else the model's own 16-bit
dtype), as SVDQuant keeps it: half the bytes of float32, and its rounding (~5e-4
relative) sits far below the 4-bit residual's error, which is computed against the
rounded factors and so absorbs them."""

from __future__ import annotations

import torch


def lowrank_split(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (N, r), down (r, K)) with up·down the truncated SVD of ``w`` (float32; the SVD
    in float64, so the split does not depend on float32 LAPACK paths)."""
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).float().contiguous(), vh[:r].float().contiguous()


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the branch is stored in for a model computing in ``dtype``."""
    return dtype if dtype.itemsize <= 2 else torch.float16


def lowrank_reference(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The branch as the graph computes it: the factors cast to x's dtype, then two
    linears (no bias)."""
    f = torch.nn.functional.linear
    return f(f(x, down.to(x.dtype)), up.to(x.dtype))
