"""Target "qdq": the portable, exact opset-21 form of ``clq.quant_linear``.

Weight: INT4/INT8 (K, N) initializer → DequantizeLinear (per output channel: axis 1;
grouped along K: blocked, axis 0). Activation: run-time scale → QuantizeLinear →
DequantizeLinear (skipped for weight-only a_bits=16). Then a float32 MatMul (+ bias).
Every dequantized value equals the reference's ``q * scale`` bit for bit; only the
MatMul's summation order differs from torch.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset21 as op

from .activation import cast_like, fake_quantize, rank_of, to_float
from .weights import PackedWeight, TableWeight


def dequantized_weight(w: PackedWeight | TableWeight) -> ir.Value:
    """Float (K, N) weight from its integer constant and scales, or from its twin-log
    codes and table: codes widened exactly (DequantizeLinear with scale 1), then
    ``GatherElements`` picks table[code, n], the reference's own values."""
    if isinstance(w, TableWeight):
        codes = op.DequantizeLinear(op.Constant(value=w.code_tensor()), op.Constant(
            value=ir.tensor(np.array(1.0, dtype=np.float32))))
        idx = op.Cast(codes, to=ir.DataType.INT64)
        return op.GatherElements(op.Constant(value=w.table_tensor()), idx, axis=0)
    q = op.Constant(value=w.int_tensor())
    if w.group == 0:
        s = op.Constant(value=w.scale_tensor(w.scale[:, 0], "scale"))
        return op.DequantizeLinear(q, s, axis=1)
    s = op.Constant(value=w.scale_tensor(w.scale.T, "scale"))
    return op.DequantizeLinear(q, s, axis=0, block_size=w.group)


def qdq_linear(
    x: ir.Value, w: PackedWeight | TableWeight, bias: ir.Value | None, a_bits: int,
    a_group: int, a_clip: float,
) -> ir.Value:
    rank = rank_of(x)
    xf = to_float(x)
    if a_bits < 16:
        xf = fake_quantize(xf, rank, w.k, a_bits, a_group, a_clip)
    y = op.MatMul(xf, dequantized_weight(w))
    if bias is not None:
        y = op.Add(y, to_float(bias))
    return cast_like(y, x)
