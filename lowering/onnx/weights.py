"""Packed clq weights as ONNX constants in the layouts each ORT form wants.

The translation functions only see symbolic values, so the weight bytes are looked up by
the exported program's placeholder name (``WeightTable``) and re-laid out here: ONNX
MatMul wants B as (K, N), so the int values are transposed and stored as INT4/INT8
tensors (ONNX packs INT4 two per byte, first element in the low nibble, exactly like
``clq_compile.quant.pack_int4`` but along N instead of K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset21 as op

from clq_compile.ops import DEFAULT_NORM_EPS, unpack_weight, weight_group
from clq_compile.spec import A_FORMATS, W_FORMATS

from .activation import (
    cast_like,
    const,
    fake_quantize,
    lzs_fake_quantize,
    rank_of,
    to_float,
)
from .errors import OnnxExportError
from .transform import apply_prologue, transform

_INT_TYPES = {4: ml_dtypes.int4, 8: np.int8}


@dataclass(frozen=True)
class PackedWeight:
    """One quant_linear weight: integer values (N, K) and float32 scales (N, n_groups)."""

    name: str
    q: np.ndarray  # int8 container, values in the w_bits range
    scale: np.ndarray  # float32 (N, n_groups)
    bits: int

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def k(self) -> int:
        return self.q.shape[1]

    @property
    def group(self) -> int:
        """Group size along K (0 = one scale per output channel)."""
        return weight_group(self.k, torch.from_numpy(self.scale))

    def int_tensor(self, shape: tuple[int, ...] | None = None, suffix: str = "kn",
                   offset: int = 0) -> ir.Tensor:
        """Transposed (K, N) integer values (or reshaped to ``shape``) as INT4/INT8, or
        shifted by ``offset`` into UINT8 (int8 codes + 128)."""
        kn = np.ascontiguousarray(self.q.T)
        if shape is not None:
            kn = kn.reshape(shape)
        if offset:
            u = (kn.astype(np.int16) + offset).astype(np.uint8)
            return ir.Tensor(u, name=f"{self.name}_{suffix}_u8")
        return ir.Tensor(kn.astype(_INT_TYPES[self.bits]), name=f"{self.name}_{suffix}")

    def scale_tensor(self, value: np.ndarray, suffix: str) -> ir.Tensor:
        value = np.ascontiguousarray(value, dtype=np.float32)
        return ir.Tensor(value, name=f"{self.name}_{suffix}")


@dataclass(frozen=True)
class TableWeight:
    """Twin-log weight: codes (N, K) in [0, 16) and each row's table (N, 16), widened to
    float32 (exact) for the file."""

    name: str
    codes: np.ndarray  # uint8
    table: np.ndarray

    @property
    def k(self) -> int:
        return self.codes.shape[1]

    def code_tensor(self) -> ir.Tensor:
        """(K, N) codes as UINT4: packed two per byte in the file, like int4 weights."""
        return ir.Tensor(np.ascontiguousarray(self.codes.T).astype(ml_dtypes.uint4),
                         name=f"{self.name}_codes_kn")

    def table_tensor(self) -> ir.Tensor:
        """(16, N): GatherElements along axis 0 reads table[code[k, n], n]."""
        return ir.Tensor(np.ascontiguousarray(self.table.T, dtype=np.float32),
                         name=f"{self.name}_table")


class WeightTable:
    """Placeholder name → constant tensor of an exported program (parameters, buffers and
    lifted constants), so translations can read the packed weights they are handed."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    @classmethod
    def from_exported_program(cls, ep: torch.export.ExportedProgram) -> WeightTable:
        tensors: dict[str, torch.Tensor] = {}
        for spec in ep.graph_signature.input_specs:
            if spec.target is None:
                continue
            if spec.target in ep.state_dict:
                tensors[spec.arg.name] = ep.state_dict[spec.target]
            elif spec.target in ep.constants:
                tensors[spec.arg.name] = ep.constants[spec.target]
        return cls(tensors)

    def tensor(self, value: ir.Value, what: str) -> torch.Tensor:
        t = self._tensors.get(value.name or "")
        if not isinstance(t, torch.Tensor):
            raise OnnxExportError(
                f"clq.quant_linear {what} {value.name!r} is not a constant of the graph; the "
                "ONNX lowering needs packed weights as buffers reached by get_attr",
                op="clq.quant_linear",
            )
        return t.detach().cpu()

    def weight(self, w_q: ir.Value, w_scale: ir.Value, w_bits: int) -> PackedWeight:
        q = unpack_weight(self.tensor(w_q, "weight"), w_bits)
        scale = self.tensor(w_scale, "weight scale").float()
        if scale.dim() != 2 or scale.shape[0] != q.shape[0] or q.shape[1] % scale.shape[1]:
            raise OnnxExportError(
                f"weight scale {tuple(scale.shape)} does not fit weight {tuple(q.shape)}",
                op="clq.quant_linear",
            )
        return PackedWeight(w_q.name or "w", q.numpy(), scale.numpy(), w_bits)

    def table_weight(self, w_q: ir.Value, table: ir.Value) -> TableWeight:
        q = unpack_weight(self.tensor(w_q, "weight"), 4)
        t = self.tensor(table, "weight table").float()
        if t.dim() != 2 or t.shape != (q.shape[0], 16):
            raise OnnxExportError(
                f"twin-log table {tuple(t.shape)} does not fit weight {tuple(q.shape)}: "
                "expected (N, 16)", op="clq.quant_linear")
        return TableWeight(w_q.name or "w", (q + 8).to(torch.uint8).numpy(), t.numpy())


def nbits_block(k: int, group: int, max_block: int = 256) -> int:
    """MatMulNBits block size for a weight: its group when that is a power of two ≥ 16,
    else (per channel) the largest power of two ≤ ``max_block`` dividing K; 0 if none.

    A per-channel scale repeated over every block of a row is the same dequantization,
    so per-channel weights lose nothing by being stored blockwise.
    """
    if group:
        return group if group >= 16 and group & (group - 1) == 0 else 0
    b = k & -k
    b = min(b, max_block)
    return b if b >= 16 else 0


def nbits_tensors(w: PackedWeight, block: int) -> tuple[ir.Tensor, ir.Tensor]:
    """MatMulNBits B (N, K/block, block/2) uint8 and scales (N·K/block,) float32.

    MatMulNBits stores unsigned nibbles with an implicit zero point of 8, so the signed
    value q is stored as q + 8: (q + 8 - 8) · scale is the same product, bit for bit.
    """
    u = (w.q.astype(np.int16) + 8).astype(np.uint8)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    n_blocks = w.k // block
    b = packed.reshape(w.n, n_blocks, block // 2)
    per_block = np.repeat(w.scale, n_blocks // w.scale.shape[1], axis=1)
    return (
        ir.Tensor(np.ascontiguousarray(b), name=f"{w.name}_nbits"),
        w.scale_tensor(per_block.reshape(-1), "nbits_scale"),
    )


# One target's lowering of one layer: (x, weight, bias, a_bits, a_group, a_clip) -> y.
LowerLinear = Callable[[ir.Value, PackedWeight, "ir.Value | None", int, int, float], ir.Value]


def _like(y: ir.Value, x: ir.Value) -> ir.Value:
    """``y`` typed as x (elementwise or transform of it): tracing loses symbolic shapes
    through Reshape, and the lowering needs x's rank."""
    y.shape, y.dtype = y.shape or x.shape, y.dtype or x.dtype
    return y


def quant_linear_translation(weights: WeightTable, lower: LowerLinear,
                             table_lower: LowerLinear) -> Callable[..., ir.Value]:
    """The torch.onnx translation of ``clq.quant_linear`` (the op's own signature, which
    torch.onnx reads): look up the packed weight, then hand the layer to ``lower``
    (``table_lower`` for twin-log weights, which only a float form can run)."""

    def quant_linear(
        x: ir.Value,
        w_q: ir.Value,
        w_scale: ir.Value,
        bias: ir.Value | None,
        w_bits: int,
        a_bits: int,
        a_group: int,
        a_clip: float,
        perm: ir.Value | None = None,
        smooth: ir.Value | None = None,
        rot: ir.Value | None = None,
        prologue: str | None = None,
        a_format: str = "int",
        w_format: str = "int",
        a8_rows: ir.Value | None = None,
        pro_mul: ir.Value | None = None,
        pro_add: ir.Value | None = None,
        norm_eps: float = DEFAULT_NORM_EPS,
        pro_fp32: bool = False,
    ) -> ir.Value:
        x = _like(apply_prologue(x, prologue, pro_mul, pro_add, norm_eps, pro_fp32), x)
        if perm is not None or smooth is not None or rot is not None:
            x = _like(transform(x, perm, smooth, rot), x)  # the op's fused input transform
        if a_format not in A_FORMATS or w_format not in W_FORMATS:
            raise OnnxExportError(f"clq.quant_linear formats a_format={a_format!r}, "
                                  f"w_format={w_format!r} have no ONNX lowering",
                                  op="clq.quant_linear")
        if w_format == "twinlog":  # a per-row table: only the float (Q/DQ) form takes it
            w, target = weights.table_weight(w_q, w_scale), table_lower
        else:
            w, target = weights.weight(w_q, w_scale, w_bits), lower
        if a_format == "lzs":  # coded in float ops, then the target's weight-only form
            rank = rank_of(x)
            xq = cast_like(lzs_fake_quantize(to_float(x), rank, w.k, a_group, a_clip), x)
            return target(_like(xq, x), w, bias, 16, 0, 1.0)
        if a8_rows is not None:  # per-sample width: both quantizers, Where, weight-only form
            rank, xf = rank_of(x), to_float(x)
            mask = op.Reshape(a8_rows, const([-1] + [1] * (rank - 1), np.int64))
            xq = op.Where(mask, fake_quantize(xf, rank, w.k, 8, a_group, 1.0),
                          fake_quantize(xf, rank, w.k, a_bits, a_group, a_clip))
            return target(_like(cast_like(xq, x), x), w, bias, 16, 0, 1.0)
        return target(x, w, bias, a_bits, a_group, a_clip)

    return quant_linear
