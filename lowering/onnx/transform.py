"""``clq.transform`` as ONNX: permutation as Gather, smoothing as Mul, block Hadamard as
Reshape + MatMul against the one B×B block (never a dense K×K matrix)."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import opset21 as op

from .activation import cast_like, merge_last, rank_of, split_last, to_float


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
    if rot is not None:
        b = rot.shape[0]  # K may be symbolic in the graph: let Reshape infer K/B and K
        y = op.MatMul(split_last(y, rank, -1, b), to_float(rot))
        y = merge_last(y, rank, -1)
    return cast_like(y, x)
