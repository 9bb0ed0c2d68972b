"""``clq.transform`` as ONNX: permutation as Gather, smoothing as Mul, block Hadamard as
Reshape + MatMul against the one B×B block, or a batched MatMul against the K/B blocks of
a per-block rotation (never a dense K×K matrix)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset21 as op

from clq_compile.ops import DEFAULT_NORM_EPS, GELU_PROLOGUES

from .activation import cast_like, const, merge_last, rank_of, split_last, to_float
from .errors import OnnxExportError


def apply_prologue(x: ir.Value, prologue: str | None, pro_mul: ir.Value | None,
                   pro_add: ir.Value | None, norm_eps: float, pro_fp32: bool = False
                   ) -> ir.Value:
    """``clq_compile.ops.apply_prologue`` in ONNX: the producer fused into the op, each
    step in x's dtype (the norm computed in float, as torch computes it, then cast), or,
    ``pro_fp32``, all in float and cast to x's dtype once."""
    y = to_float(x) if pro_fp32 else x
    if prologue in GELU_PROLOGUES:
        y = op.Gelu(y, approximate=GELU_PROLOGUES[prologue])
    elif prologue == "layer_norm":
        yf = y if pro_fp32 else to_float(x)
        ones = op.ConstantOfShape(op.Shape(yf, start=-1),
                                  value=ir.tensor(np.array([1.0], np.float32)))
        y, _, _ = op.LayerNormalization(yf, ones, axis=-1, epsilon=norm_eps)  # Y, mean, 1/std
        if not pro_fp32:
            y = cast_like(y, x)
    elif prologue is not None:
        raise OnnxExportError(f"prologue {prologue!r} has no ONNX lowering", op="clq")
    if pro_mul is not None:
        y = op.Mul(y, pro_mul)
    if pro_add is not None:
        y = op.Add(y, pro_add)
    return cast_like(y, x) if pro_fp32 else y


def transform(
    x: ir.Value, perm: ir.Value | None, smooth: ir.Value | None, rot: ir.Value | None,
    prologue: str | None = None, pro_mul: ir.Value | None = None,
    pro_add: ir.Value | None = None, norm_eps: float = DEFAULT_NORM_EPS,
    pro_fp32: bool = False,
) -> ir.Value:
    """Same order as ``clq_compile.ops.transform``: the prologue, then float32, gather,
    scale, rotate each length-B block of the last dim, cast back to x's dtype."""
    rank = rank_of(x)
    y = to_float(apply_prologue(x, prologue, pro_mul, pro_add, norm_eps, pro_fp32))
    if perm is not None:
        y = op.Gather(y, perm, axis=rank - 1)
    if smooth is not None:
        y = op.Mul(y, to_float(smooth))
    if rot is not None and len(rot.shape) == 3:  # (..., K/B, 1, B) @ (K/B, B, B)
        nb, b = rot.shape[0], rot.shape[-1]
        blocks = op.Unsqueeze(split_last(y, rank, nb, b), const([-2], np.int64))
        y = merge_last(op.MatMul(blocks, to_float(rot)), rank, -1)
    elif rot is not None:
        b = rot.shape[0]  # K may be symbolic in the graph: let Reshape infer K/B and K
        y = op.MatMul(split_last(y, rank, -1, b), to_float(rot))
        y = merge_last(y, rank, -1)
    return cast_like(y, x)
