"""OBS (orthogonal-based smoothing) decisions: outlier scores → permutation → block
Hadamard. Pure functions of calibration statistics; the rewrite applies the result."""

from __future__ import annotations

import torch

from clq_compile.hadamard import choose_block, hadamard
from clq_compile.plan import TransformPlan

ORDERS = ("none", "sorted", "zigzag")


def permutation(scores: torch.Tensor, order: str, block: int) -> torch.Tensor | None:
    """Channel order for outlier ``scores`` (K,).

    "sorted": descending score, so high-score channels share the first Hadamard blocks
    (pays off when activation groups line up with blocks). "zigzag": deal channels in
    score order across the K/B blocks in a snake (0..n-1, n-1..0, ...), so every block
    gets an even share of outliers (pays off with one scale per token).
    """
    if order == "none":
        return None
    ranked = torch.argsort(scores, descending=True, stable=True)
    if order == "sorted":
        return ranked
    if order != "zigzag":
        raise ValueError(f"unknown permutation order {order!r}; choose from {ORDERS}")
    nb = scores.numel() // block
    slots: list[list[int]] = [[] for _ in range(nb)]
    for i, ch in enumerate(ranked.tolist()):
        rnd, pos = divmod(i, nb)
        slots[pos if rnd % 2 == 0 else nb - 1 - pos].append(ch)
    return torch.tensor([c for s in slots for c in s], dtype=torch.int64)


def obs_transform(scores: torch.Tensor, order: str, block: int) -> TransformPlan:
    """G = P·H for one shared input: permutation by score, block Hadamard of size B."""
    k = scores.numel()
    b, note = choose_block(k, block)
    return TransformPlan(
        perm=permutation(scores, order, b), rot=hadamard(b), kind="obs", order=order, note=note
    )


def smoothquant_transform(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> TransformPlan:
    """SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1-α); online x/s, weights W·s."""
    s = act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)
    s = s.clamp(min=1e-5)
    return TransformPlan(smooth=(1.0 / s).float(), kind="smooth")


def quarot_transform(k: int, max_block: int, seed: int) -> TransformPlan:
    """QuaRot: random ±1 signs then the widest Hadamard (full width when K is a power of
    two); no permutation, no statistics."""
    b = min(k & -k, max_block)  # largest power of two dividing K
    note = "" if b == k else f"K={k}: full-width Hadamard impossible, blocks of {b}"
    signs = torch.randint(0, 2, (k,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return TransformPlan(smooth=signs.float(), rot=hadamard(b), kind="random_hadamard",
                         note=note)
