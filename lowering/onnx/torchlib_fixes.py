"""Translations that replace buggy torchlib ones (onnxscript 0.7).

torchlib lowers ``aten.squeeze.dim`` to an unconditional ONNX ``Squeeze``, but torch's
squeeze of a dimension whose size is not 1 is a no-op; ONNX rejects it at load time
("Dimension of input 1 must be 1"). diffusers' PixArt output path does exactly that
(``hidden_states.squeeze(1)`` on (B, tokens, C)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset21 as op

from .activation import const


def _squeezable(x: ir.Value, dims: Sequence[int]) -> list[int]:
    """Dims of static size 1; symbolic dims were guarded by torch.export (a size-1
    example would have been specialized), so they are never squeezed."""
    rank = len(x.shape)
    return [d % rank for d in dims if rank and isinstance(x.shape[d % rank], int)
            and x.shape[d % rank] == 1]


def squeeze_dims(x: ir.Value, dims: Sequence[int]) -> ir.Value:
    keep = _squeezable(x, dims)
    return op.Squeeze(x, const(keep, np.int64)) if keep else op.Identity(x)


def squeeze_dim(x: ir.Value, dim: int) -> ir.Value:
    return squeeze_dims(x, [dim])


TRANSLATIONS = {
    torch.ops.aten.squeeze.dim: squeeze_dim,
    torch.ops.aten.squeeze.dims: squeeze_dims,
}
