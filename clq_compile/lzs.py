"""QuaRTZ's leading-zero suppression (arXiv 2509.26436), the reference math: 8-bit
activation codes become 4-bit codes (sign + 3-bit magnitude) with one 3-bit shift per
group of ``group`` consecutive values along K.

Readings chosen where the paper is loose (methods.md §2):
- stage 1 is this project's symmetric per-token int8 (scale = clip · absmax / 127),
  clamped to [-127, 127] so every magnitude fits 7 bits (a clipped -128 would need 8);
- the shift is ``FLAG = max(bitlen(m) - 3, 0)`` with ``m`` the bitwise OR of the group's
  magnitudes; the OR and the maximum have the same highest set bit, so the maximum is
  used (torch has no OR reduction);
- low bits are truncated (``mag >> FLAG``), as the paper specifies, not rounded.

A value is ``scale · sign · (mag >> FLAG) · 2^FLAG``; a GEMM sums each group's integer
partial dot product shifted left by its FLAG, so it stays exact in int32.
"""

from __future__ import annotations

import torch

from clq_compile.errors import QuantizationError
from clq_compile.quant import quantize

GROUPS = (16, 32)
MAX_FLAG = 4  # 7-bit magnitudes less the 3 a code keeps


def _check_group(k: int, group: int) -> None:
    if group not in GROUPS:
        raise QuantizationError(f"LZS group {group} is not one of {GROUPS}")
    if k % group:
        raise QuantizationError(f"LZS group {group} does not divide K = {k}")


def lzs_encode(x8: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes in [-127, 127] (..., K) → (int8 codes in [-7, 7], uint8 flags in
    [0, 4] of shape (..., K / group))."""
    k = x8.shape[-1]
    _check_group(k, group)
    mag = x8.to(torch.int32).abs()
    if mag.numel() and int(mag.max()) > 127:
        raise QuantizationError("LZS takes 8-bit codes in [-127, 127]")
    grouped = mag.reshape(*mag.shape[:-1], k // group, group)
    m = grouped.amax(dim=-1)
    flag = (m >= 8).int() + (m >= 16).int() + (m >= 32).int() + (m >= 64).int()
    kept = grouped >> flag.unsqueeze(-1)
    codes = torch.where(x8 < 0, -kept.reshape(mag.shape), kept.reshape(mag.shape))
    return codes.to(torch.int8), flag.to(torch.uint8)


def lzs_decode(codes: torch.Tensor, flags: torch.Tensor, group: int) -> torch.Tensor:
    """The int32 values the codes stand for: ``code · 2^flag``."""
    k = codes.shape[-1]
    _check_group(k, group)
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], k // group, group)
    return (grouped << flags.to(torch.int32).unsqueeze(-1)).reshape(codes.shape)


def lzs_quantize(x: torch.Tensor, group: int, clip: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float activations (..., K) → (codes, flags, per-token float32 scale (..., 1))."""
    qt = quantize(x, 8, 0, clip)
    x8 = qt.q.clamp(-127, 127)
    codes, flags = lzs_encode(x8, group)
    return codes, flags, qt.scale


def lzs_fake_quantize(x: torch.Tensor, group: int, clip: float = 1.0) -> torch.Tensor:
    """What the activation becomes after LZS, in float32."""
    codes, flags, scale = lzs_quantize(x, group, clip)
    return lzs_decode(codes, flags, group).float() * scale


def lzs_matmul(codes: torch.Tensor, flags: torch.Tensor, x_scale: torch.Tensor,
               w_q: torch.Tensor, w_scale: torch.Tensor, group: int) -> torch.Tensor:
    """(M, K) LZS activations × (N, K) int weights (per-channel scales (N, 1)) → (M, N)
    float32, as a kernel computes it: per group, an integer dot product of the 4-bit
    codes shifted left by the group's flag, summed in int32, then scaled."""
    m, k = codes.shape
    _check_group(k, group)
    n_groups = k // group
    a = codes.to(torch.int64).reshape(m, n_groups, group)
    w = w_q.to(torch.int64).reshape(w_q.shape[0], n_groups, group)
    partial = torch.einsum("mgk,ngk->mgn", a, w)  # exact: int64
    acc = (partial << flags.to(torch.int64).unsqueeze(-1)).sum(dim=1)
    if acc.numel() and int(acc.abs().max()) >= 2**31:
        raise QuantizationError("LZS accumulator overflows int32")
    return acc.to(torch.float64).mul(x_scale.double()).mul(w_scale.double().reshape(1, -1)
                                                           ).float()
