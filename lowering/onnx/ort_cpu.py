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

Why u8×s8 and where it is exact: ORT's s8×s8 GEMM runs ~5× slower than fp32 on x86,
u8×s8 ~4× faster. On x86 CPUs without VNNI, ORT's u8×s8 kernel (vpmaddubsw) saturates a
pair of products at int16 (ORT's own quantization docs). With int4 weights a pair is at
most 2·255·8 = 4080, so W4A4/W4A8 are exact everywhere; W8A8 pairs reach 65280, so W8A8
is exact on VNNI/AMX x86 (checked here) and ARM, and may saturate on AVX2-only x86.
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
    [("A", "T1"), ("B", "T2"), ("a_scale", "T3"), ("b_scale", "T3"), ("a_zero_point", "T1")],
    {"T1": ["tensor(uint8)"], "T2": ["tensor(int8)"], "T3": ["tensor(float)"]},
)


def int8_weight(
    w: PackedWeight, shape: tuple[int, ...] | None = None, suffix: str = "kn"
) -> ir.Value:
    q = op.Constant(value=w.int_tensor(shape, suffix))
    return q if w.bits == 8 else op.Cast(q, to=ir.DataType.INT8)


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
        y = MATMUL_INTEGER_TO_FLOAT(u, int8_weight(w), const(1.0), w_scale, zp)
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
    part = op.Cast(op.MatMulInteger(u3, int8_weight(w, (n_g, g, n), "gkn"), zp),
                   to=ir.DataType.FLOAT)  # (G, M, N)
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
