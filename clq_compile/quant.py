"""Reference quantization math: the numerical ground truth every kernel is tested against.

Conventions (DESIGN.md §4): symmetric integers in [-2^(b-1), 2^(b-1)-1]; the scale of a
group is ``max(clip * absmax, EPS) / qmax`` computed in float32; values are divided by the
scale and rounded half-to-even (as ONNX QuantizeLinear does); int4 is packed two per int8
byte along K, element 2i in the low nibble, 2i+1 in the high nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clq_compile.errors import QuantizationError

EPS = 1e-8
PER_TENSOR = -1  # group value meaning "one scale for the whole tensor"


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range for ``bits`` (4 -> [-8, 7], 8 -> [-128, 127])."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class QTensor:
    """Integer values with float32 scales (and zero points when asymmetric)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.group, self.zero_point)


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """View the last dim as (n_groups, group); group 0 = whole row, -1 = whole tensor."""
    if group == PER_TENSOR:
        return x.reshape(1, -1)
    k = x.shape[-1]
    g = k if group == 0 else group
    if k % g:
        raise QuantizationError(f"group size {g} does not divide the last dimension {k}")
    return x.reshape(*x.shape[:-1], k // g, g)


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise QuantizationError("cannot quantize a tensor holding NaN or Inf values")


def symmetric_scale(x: torch.Tensor, bits: int, group: int = 0, clip: float = 1.0) -> torch.Tensor:
    """Per-group float32 scales, shape (..., n_groups) (or (1,) per tensor)."""
    if not 0.0 < clip <= 1.0:
        raise QuantizationError(f"clip ratio must be in (0, 1], got {clip}")
    amax = _grouped(x.float(), group).abs().amax(dim=-1)
    _, qmax = qrange(bits)
    scale = torch.clamp(amax * clip, min=EPS) / qmax
    return scale.reshape(1) if group == PER_TENSOR else scale


def quantize_with_scale(
    x: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    group: int = 0,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer values (int8 container) of ``x`` under given scales."""
    qmin, qmax = qrange(bits)
    xg = _grouped(x.float(), group)
    s = scale.reshape(1, 1) if group == PER_TENSOR else scale.unsqueeze(-1)
    q = torch.round(xg / s)
    if zero_point is not None:
        zp = zero_point.reshape(1, 1) if group == PER_TENSOR else zero_point.unsqueeze(-1)
        q = q + zp
    return torch.clamp(q, qmin, qmax).to(torch.int8).reshape(x.shape)


def quantize(
    x: torch.Tensor,
    bits: int,
    group: int = 0,
    clip: float = 1.0,
    symmetric: bool = True,
    check: bool = True,
) -> QTensor:
    """Quantize along the last dim: group 0 per row (token / output channel), >0 per group,
    -1 per tensor. Asymmetric uses min/max with an integer zero point."""
    if check:
        _check_finite(x)
    if symmetric:
        scale = symmetric_scale(x, bits, group, clip)
        return QTensor(quantize_with_scale(x, scale, bits, group), scale, None, bits, group)
    qmin, qmax = qrange(bits)
    xg = _grouped(x.float(), group)
    lo = torch.clamp(xg.amin(dim=-1) * clip, max=0.0)
    hi = torch.clamp(xg.amax(dim=-1) * clip, min=0.0)
    scale = torch.clamp(hi - lo, min=EPS) / (qmax - qmin)
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    if group == PER_TENSOR:
        scale, zp = scale.reshape(1), zp.reshape(1)
    return QTensor(quantize_with_scale(x, scale, bits, group, zp), scale, zp, bits, group)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, group: int = 0, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 values of integer ``q`` (unpacked) under per-group scales."""
    qg = _grouped(q.float(), group)
    s = scale.reshape(1, 1) if group == PER_TENSOR else scale.unsqueeze(-1)
    if zero_point is not None:
        zp = zero_point.reshape(1, 1) if group == PER_TENSOR else zero_point.unsqueeze(-1)
        qg = qg - zp
    return (qg * s).reshape(q.shape)


def fake_quantize(x: torch.Tensor, bits: int, group: int = 0, clip: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize in one step (symmetric), returned in float32."""
    scale = symmetric_scale(x, bits, group, clip)
    return dequantize(quantize_with_scale(x, scale, bits, group), scale, group)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two int4 values per int8 along the last dim: element 2i low nibble, 2i+1 high."""
    if q.shape[-1] % 2:
        raise QuantizationError(f"int4 packing needs an even last dimension, got {q.shape[-1]}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise QuantizationError("values outside the int4 range [-8, 7] cannot be packed")
    u = q.to(torch.int16) & 0xF
    byte = u[..., 0::2] | (u[..., 1::2] << 4)
    return byte.to(torch.uint8).view(torch.int8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`; sign-extends each nibble (arithmetic shifts)."""
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(p, 4), 4)
    hi = torch.bitwise_right_shift(p, 4)
    return torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def quantize_weight(
    w: torch.Tensor, bits: int, group: int = 0, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (int8 values, packed two per byte when 4-bit; float32 scales
    of shape (N, K/group) or (N, 1)), the layout ``torch.ops.clq.quant_linear`` takes."""
    qt = quantize(w, bits, group, clip)
    scale = qt.scale.reshape(w.shape[0], -1).contiguous()
    return (pack_int4(qt.q) if bits == 4 else qt.q), scale
