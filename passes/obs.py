"""OBS (orthogonal-based smoothing) decisions: outlier scores → permutation → block
Hadamard. Pure functions of calibration statistics; the rewrite applies the result."""

from __future__ import annotations

import dataclasses

import torch

from clq_compile.hadamard import choose_block, hadamard
from clq_compile.plan import TransformPlan

ORDERS = ("none", "sorted", "zigzag")
ROTATIONS = ("hadamard", "adaptive")


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


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random n×n orthogonal matrix (float64): QR of a Gaussian, signs fixed."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def outlier_rotation(x: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """DuQuant's greedy rotation of one block, from its tokens ``x`` (T, B).

    Step i: E swaps the channel holding the current peak |x| to the head, the Hadamard
    (its first row is uniform) spreads that channel evenly over the block, and a seeded
    random orthogonal Q mixes the other B-1 outputs: R_i = E·H·diag(1, Q). A step is kept
    only if it lowers the block's peak |x·R|, so the result is never worse than the
    identity it starts from; all ``steps`` are tried (a rejected Q may be followed by a
    better one). float64 math, float32 result.
    """
    b = x.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    h = hadamard(b).double()
    y = x.double()
    r = torch.eye(b, dtype=torch.float64)
    peak = float(y.abs().max())
    for _ in range(steps):
        d = int(y.abs().amax(dim=0).argmax())
        swap = torch.eye(b, dtype=torch.float64)
        swap[[0, d]] = swap[[d, 0]]
        mix = torch.eye(b, dtype=torch.float64)
        mix[1:, 1:] = random_orthogonal(b - 1, gen)
        step = swap @ h @ mix
        cand = y @ step
        cand_peak = float(cand.abs().max())
        if cand_peak < peak:
            r, y, peak = r @ step, cand, cand_peak
    return r.float()


def outlier_transform(obs: TransformPlan, tokens: torch.Tensor, steps: int,
                      seed: int) -> TransformPlan:
    """``obs`` (OBS's transform) with its permutation and block size, each block of B
    channels rotated by its own outlier-aware rotation fitted to the calibration
    ``tokens`` (T, K) instead of the one Hadamard (LRQ-DiT's DuQuant branch)."""
    b = obs.block
    xs = tokens.float() if obs.perm is None else tokens.float().index_select(-1, obs.perm)
    blocks = xs.reshape(-1, xs.shape[-1] // b, b)
    rot = torch.stack([outlier_rotation(blocks[:, j], steps, seed * 65537 + j)
                       for j in range(blocks.shape[1])])
    return dataclasses.replace(obs, rot=rot, kind="obs-outlier")


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
