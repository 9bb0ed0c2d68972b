"""Hadamard matrices, generated (Sylvester construction), never pasted as tables."""

from __future__ import annotations

import functools

import torch

from clq_compile.errors import ConfigError


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=32)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def hadamard(n: int, normalized: bool = True) -> torch.Tensor:
    """The n×n Sylvester Hadamard matrix (float32); orthonormal when ``normalized``."""
    if not is_pow2(n):
        raise ConfigError(f"Sylvester Hadamard size must be a power of two, got {n}")
    h = _sylvester(n).clone()
    return h / n**0.5 if normalized else h


def choose_block(k: int, preferred: int) -> tuple[int, str]:
    """Largest usable Hadamard block for width ``k``: ``preferred`` when it divides k,
    else the largest power of two that does. Returns (block, reason or "")."""
    if preferred > 0 and is_pow2(preferred) and k % preferred == 0:
        return preferred, ""
    b = k & -k  # largest power of two dividing k
    if preferred > 0:
        b = min(b, 1 << (preferred.bit_length() - 1))
    reason = f"block {preferred} does not divide K={k}; using {b}"
    return b, reason


def block_hadamard(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Multiply each length-B block of the last dim of ``x`` by ``rot``: one B×B matrix
    for every block, or (K/B, B, B), block j by its own ``rot[j]``."""
    b = rot.shape[-1]
    k = x.shape[-1]
    blocks = x.reshape(*x.shape[:-1], k // b, b)
    if rot.dim() == 3:
        y = torch.einsum("...nb,nbc->...nc", blocks, rot.to(x.dtype))
    else:
        y = blocks @ rot.to(x.dtype)
    return y.reshape(x.shape)


def block_diag(rot: torch.Tensor, k: int) -> torch.Tensor:
    """The full K×K block-diagonal matrix: ``rot`` repeated, or its K/B own blocks."""
    if rot.dim() == 3:
        return torch.block_diag(*rot.unbind(0))
    return torch.block_diag(*([rot] * (k // rot.shape[0])))
