"""The low-rank branch (SVDQuant's form, option ``lowrank=r``): after the layer's
transform, W' = L_up·L_down + R, with L_up·L_down the best rank-r approximation of W' (its
truncated SVD) kept in float and only the residual R quantized. The graph computes
``quant_linear(T(x), R) + (T(x)·L_downᵀ)·L_upᵀ``: the few large singular directions
that outlive the rotation never meet the 4-bit grid."""

from __future__ import annotations

import torch


def lowrank_split(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (N, r), down (r, K)) with up·down the truncated SVD of ``w`` (float32; the SVD
    in float64, so the split does not depend on float32 LAPACK paths)."""
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).float().contiguous(), vh[:r].float().contiguous()


def lowrank_reference(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The branch as the graph computes it: two float linears (no bias)."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
