"""Target "ort-cpu": the same quantized arithmetic in forms ORT's CPU kernels run fast.

- W4A4 / W4A8 / W8A8: the activation code is computed in-graph exactly as the reference
  does (run-time scale, QuantizeLinear's divide-and-round-half-even, clamp), carried as
  uint8 with zero point 128, and multiplied by an int8 weight with
  ``com.microsoft.MatMulIntegerToFloat`` (u8×s8 → exact int32, then · s_channel); the
  per-token scale is one Mul after it. ``acc · s_channel · s_token`` is the reference's
  sum of dequantized products up to float32 rounding.
  Per-group scales (weight or activation) use a batched ``MatMulInteger`` over the K
  groups, then scale each group's partial sum and reduce.
- W4A16: ``com.microsoft.MatMulNBits`` (accuracy_level 0: A stays float32) with our int4
  values stored as q + 8 (its implicit zero point is 8), so dequantization is exact.
- Anything else (W8A16, MatMulNBits-incompatible K) falls back to the "qdq" form.

Integer weights are stored as INT4 initializers and ``Cast`` to INT8: the file stays
4-bit and ORT folds the Cast once at session creation.

Why u8×s8 for int4 weights, u8×u8 for int8: ORT's s8×s8 GEMM runs ~5× slower than fp32
on x86, u8×s8 ~4× faster. On x86 CPUs without VNNI, ORT's u8×s8 kernel (vpmaddubsw)
saturates a pair of products at int16 (ORT's own quantization docs). With int4 weights a
pair is at most 2·255·8 = 4080, so W4A4/W4A8 are exact everywhere. Int8 weight pairs reach
65280 and did saturate on an AVX2-only AMD EPYC (errors of 1.8e5 in int32 sums), so int8
weights are stored as u8 (q + 128, zero point 128): ORT's u8×u8 kernel widens to 16 bits
before multiplying and is exact on every CPU (1.6× slower than u8×s8 there, still faster
than fp32).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset21 as op

from .activation import U8_ZERO, cast_like, const, quantize_u8, rank_of, to_float
from .qdq import qdq_linear
from .weights import PackedWeight, nbits_block, nbits_tensors

MS_DOMAIN = "com.microsoft"


def _contrib_op(name: str, inputs: list[tuple[str, str]], types: dict[str, list[str]],
                attrs: tuple[str, ...] = ()) -> onnxscript.values.Op:
    """An onnxscript handle on an ORT contrib op (its schema lives in ORT, not onnx)."""
    fp = OpSchema.FormalParameter
    schema = OpSchema(
        name, MS_DOMAIN, 1,
        inputs=[fp(n, t) for n, t in inputs],
        outputs=[fp("Y", "T1" if "T3" not in types else "T3")],
        type_constraints=[(t, allowed, "") for t, allowed in types.items()],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "", required=False)
                    for a in attrs],
    )
    return onnxscript.values.Op(onnxscript.values.Opset(MS_DOMAIN, 1), name, schema)


MATMUL_NBITS = _contrib_op(
    "MatMulNBits", [("A", "T1"), ("B", "T2"), ("scales", "T1")],
    {"T1": ["tensor(float)"], "T2": ["tensor(uint8)"]},
    ("K", "N", "bits", "block_size", "accuracy_level"),
)
# Y = (A − a_zp)·(B − b_zp) · a_scale · b_scale[col], the int32→float cast and the
# per-channel weight scale fused into the integer GEMM's output stage.
MATMUL_INTEGER_TO_FLOAT = _contrib_op(
    "MatMulIntegerToFloat",
    [("A", "T1"), ("B", "T2"), ("a_scale", "T3"), ("b_scale", "T3"), ("a_zero_point", "T1"),
     ("b_zero_point", "T2")],
    {"T1": ["tensor(uint8)"], "T2": ["tensor(int8)", "tensor(uint8)"], "T3": ["tensor(float)"]},
)


def integer_weight(
    w: PackedWeight, shape: tuple[int, ...] | None = None, suffix: str = "kn"
) -> tuple[ir.Value, ir.Value]:
    """(B, its zero point) for ORT's u8×B integer GEMMs: int4 codes as int8 (zero point
    0), int8 codes as u8 with zero point 128 (exact without VNNI, see the module doc)."""
    if w.bits == 8:
        u = op.Constant(value=w.int_tensor(shape, suffix, offset=U8_ZERO))
        return u, const(U8_ZERO, np.uint8)
    q = op.Cast(op.Constant(value=w.int_tensor(shape, suffix)), to=ir.DataType.INT8)
    return q, const(0, np.int8)


def _group_scales(scale: np.ndarray, g: int, k: int) -> np.ndarray:
    """Weight scales (N, K/gw) repeated to (K/g, 1, N) for g-sized groups."""
    rep = (k // g) // scale.shape[1]
    return np.repeat(scale, rep, axis=1).T[:, None, :]


def integer_linear(
    x: ir.Value, w: PackedWeight, bias: ir.Value | None, a_bits: int, a_group: int, a_clip: float
) -> ir.Value:
    rank, k = rank_of(x), w.k
    u, s_a = quantize_u8(to_float(x), rank, k, a_bits, a_group, a_clip)
    zp = const(U8_ZERO, np.uint8)
    g = math.gcd(w.group or k, a_group or k)
    if g == k:  # per token × per channel: one integer GEMM, weight scale fused
        w_scale = op.Constant(value=w.scale_tensor(w.scale[:, 0], "scale"))
        b, b_zp = integer_weight(w)
        y = MATMUL_INTEGER_TO_FLOAT(u, b, const(1.0), w_scale, zp, b_zp)
        y = op.Mul(y, s_a)  # the per-token scale varies by row: ORT's kernel cannot fuse it
    else:
        y = _grouped_integer_linear(x, u, s_a, w, a_group, g, zp)
    if bias is not None:
        y = op.Add(y, to_float(bias))
    return cast_like(y, x)


def _grouped_integer_linear(
    x: ir.Value, u: ir.Value, s_a: ir.Value, w: PackedWeight, a_group: int, g: int,
    zp: ir.Value,
) -> ir.Value:
    """Σ over K-groups of (int32 group dot product · group scales), batched over groups."""
    k, n, n_g = w.k, w.n, w.k // g
    u3 = op.Transpose(op.Reshape(u, const([-1, n_g, g], np.int64)), perm=[1, 0, 2])
    b, b_zp = integer_weight(w, (n_g, g, n), "gkn")
    part = op.Cast(op.MatMulInteger(u3, b, zp, b_zp), to=ir.DataType.FLOAT)  # (G, M, N)
    if a_group:
        sa = op.Reshape(s_a, const([-1, k // a_group, 1], np.int64))
        sa = op.Expand(sa, const([1, k // a_group, a_group // g], np.int64))
        sa = op.Transpose(op.Reshape(sa, const([-1, n_g], np.int64)), perm=[1, 0])
        part = op.Mul(part, op.Unsqueeze(sa, const([2], np.int64)))
    if w.group:
        ws = w.scale_tensor(_group_scales(w.scale, g, k), "gscale")
        part = op.Mul(part, op.Constant(value=ws))
    y = op.ReduceSum(part, const([0], np.int64), keepdims=0)  # (M, N)
    if not a_group:
        y = op.Mul(y, op.Reshape(s_a, const([-1, 1], np.int64)))
    if not w.group:
        y = op.Mul(y, op.Constant(value=w.scale_tensor(w.scale[:, 0], "scale")))
    out_shape = op.Concat(op.Shape(x, start=0, end=-1), const([n], np.int64), axis=0)
    return op.Reshape(y, out_shape)


def nbits_linear(x: ir.Value, w: PackedWeight, bias: ir.Value | None, block: int) -> ir.Value:
    b, scales = nbits_tensors(w, block)
    y = MATMUL_NBITS(
        to_float(x), op.Constant(value=b), op.Constant(value=scales),
        K=w.k, N=w.n, bits=4, block_size=block, accuracy_level=0,
    )
    if bias is not None:
        y = op.Add(y, to_float(bias))
    return cast_like(y, x)


def form_of(w_bits: int, a_bits: int, k: int, group: int) -> str:
    """Which ORT form a layer lowers to under target "ort-cpu"."""
    if a_bits < 16:
        return "int"
    if w_bits == 4 and nbits_block(k, group):
        return "nbits"
    return "qdq"


def ort_cpu_linear(
    x: ir.Value, w: PackedWeight, bias: ir.Value | None, a_bits: int, a_group: int, a_clip: float
) -> ir.Value:
    form = form_of(w.bits, a_bits, w.k, w.group)
    if form == "int":
        return integer_linear(x, w, bias, a_bits, a_group, a_clip)
    if form == "nbits":
        return nbits_linear(x, w, bias, nbits_block(w.k, w.group))
    return qdq_linear(x, w, bias, a_bits, a_group, a_clip)
