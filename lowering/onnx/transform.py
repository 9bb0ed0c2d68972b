"""``clq.transform`` as ONNX: permutation as Gather, smoothing as Mul, block Hadamard as
Reshape + MatMul against the one B×B block, or a batched MatMul against the K/B blocks of
a per-block rotation (never a dense K×K matrix)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset21 as op

from .activation import cast_like, const, merge_last, rank_of, split_last, to_float


def transform(
    x: ir.Value, perm: ir.Value | None, smooth: ir.Value | None, rot: ir.Value | None
) -> ir.Value:
    """Same order as ``clq_compile.ops.transform_reference``: float32, gather, scale,
    rotate each length-B block of the last dim, cast back to x's dtype."""
    rank = rank_of(x)
    y = to_float(x)
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
