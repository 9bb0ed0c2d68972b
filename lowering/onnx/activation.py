"""Run-time activation quantization built from ONNX ops, op for op like the reference.

``clq_compile.quant.symmetric_scale`` computes ``max(clip * absmax, EPS) / qmax`` in
float32 and ``quantize_with_scale`` rounds ``x / scale`` half to even. Every step here is
one IEEE float32 operation in the same order (absmax, Mul, Max, Div), and ORT's
QuantizeLinear divides by the scale (it does not multiply by a reciprocal; checked in
tests), so on equal inputs the integers are bit-identical to the reference.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset21 as op

from clq_compile.quant import EPS, qrange

INT_DTYPES = {4: ir.DataType.INT4, 8: ir.DataType.INT8}
U8_ZERO = 128  # unsigned carrier for signed codes: u = q + 128


def const(value: float | int | list, dtype: type = np.float32) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))


def rank_of(x: ir.Value) -> int:
    if x.shape is None:
        raise ValueError(f"value {x.name!r} has no static rank")
    return len(x.shape)


def to_float(x: ir.Value) -> ir.Value:
    return x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)


def cast_like(y: ir.Value, x: ir.Value) -> ir.Value:
    return y if x.dtype == ir.DataType.FLOAT else op.Cast(y, to=x.dtype)


def split_last(x: ir.Value, rank: int, outer: int, inner: int) -> ir.Value:
    """View the last dim (outer·inner) as (outer, inner); 0 copies the leading dims, so
    dynamic batch/token sizes pass through."""
    return op.Reshape(x, const([0] * (rank - 1) + [outer, inner], np.int64))


def merge_last(x: ir.Value, rank: int, k: int) -> ir.Value:
    """Inverse of :func:`split_last` for an input of rank ``rank`` + 1."""
    return op.Reshape(x, const([0] * (rank - 1) + [k], np.int64))


def block_of(k: int, group: int) -> int:
    return k if group == 0 else group


def runtime_scale(x: ir.Value, rank: int, k: int, bits: int, group: int, clip: float) -> ir.Value:
    """Scales of shape (..., K/block): one per token (group 0) or per K-group.

    absmax is max(max x, −min x): the same float (max and negation are exact) without
    writing |x| out, which makes it about twice as fast in ORT as ReduceMax(Abs(x)).
    """
    xg = x if group == 0 else split_last(x, rank, k // group, group)
    axes, keep = const([-1], np.int64), int(group == 0)
    amax = op.Max(op.ReduceMax(xg, axes, keepdims=keep),
                  op.Neg(op.ReduceMin(xg, axes, keepdims=keep)))
    _, qmax = qrange(bits)
    scaled = op.Mul(amax, const(clip))
    return op.Div(op.Max(scaled, const(EPS)), const(float(qmax)))


def fake_quantize(x: ir.Value, rank: int, k: int, bits: int, group: int, clip: float) -> ir.Value:
    """Q/DQ pair with the run-time scale: blocked along the last axis (block = K for
    per-token), so the integer type is the real INT4/INT8 with its own saturation."""
    s = runtime_scale(x, rank, k, bits, group, clip)
    block = block_of(k, group)
    q = op.QuantizeLinear(x, s, axis=rank - 1, block_size=block, output_dtype=INT_DTYPES[bits])
    return op.DequantizeLinear(q, s, axis=rank - 1, block_size=block)


def quantize_u8(
    x: ir.Value, rank: int, k: int, bits: int, group: int, clip: float
) -> tuple[ir.Value, ir.Value]:
    """(u, scale) with u = clamp(round(x / scale), qmin, qmax) + 128 as UINT8.

    The signed code is carried as uint8 with zero point 128 because ORT's fast integer
    GEMM is u8×s8 (its s8×s8 path is several times slower than fp32 on x86); the zero
    point is exact integer arithmetic, so the product is unchanged.
    """
    s = runtime_scale(x, rank, k, bits, group, clip)
    block = block_of(k, group)
    zp = op.Expand(const(U8_ZERO, np.uint8), op.Shape(s))
    u = op.QuantizeLinear(x, s, zp, axis=rank - 1, block_size=block)
    if bits < 8:
        qmin, qmax = qrange(bits)
        u = op.Clip(u, const(U8_ZERO + qmin, np.uint8), const(U8_ZERO + qmax, np.uint8))
    return u, s


def lzs_fake_quantize(x: ir.Value, rank: int, k: int, group: int, clip: float) -> ir.Value:
    """QuaRTZ leading-zero suppression (``clq_compile.lzs``) in float ops, exact: int8
    codes per token clamped to ±127, then per group of ``group`` the magnitudes lose their
    low FLAG bits. 2^FLAG is summed from the nested thresholds (1 + [m≥8] + 2[m≥16] +
    4[m≥32] + 8[m≥64]) and ``Floor(|q| / 2^FLAG)`` is the right shift; every value is a
    small integer, so each op is exact and the result equals the reference's
    ``(code << FLAG) · scale`` bit for bit."""
    s = runtime_scale(x, rank, k, 8, 0, clip)
    q = op.Clip(op.Round(op.Div(x, s)), const(-127.0), const(127.0))
    mag = split_last(op.Abs(q), rank, k // group, group)
    m = op.ReduceMax(mag, const([-1], np.int64), keepdims=1)
    p = const(1.0)
    for bit, weight in ((8, 1.0), (16, 2.0), (32, 4.0), (64, 8.0)):
        hit = op.Cast(op.GreaterOrEqual(m, const(float(bit))), to=ir.DataType.FLOAT)
        p = op.Add(p, op.Mul(hit, const(weight)))
    kept = merge_last(op.Mul(op.Floor(op.Div(mag, p)), p), rank, k)
    return op.Mul(op.Mul(op.Sign(q), kept), s)
