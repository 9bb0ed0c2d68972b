"""The low-rank branch (SVDQuant's form, option ``lowrank=r``): after the layer's
transform, W' = L_up·L_down + R, with L_up·L_down the best rank-r approximation of W' (its
truncated SVD) kept in float and only the residual R quantized. The graph computes
``quant_linear(T(x), R) + (T(x)·L_downᵀ)·L_upᵀ``: the few large singular directions
that outlive the rotation never meet the 4-bit grid.

The branch is stored in 16 bits (fp16 for a float32 model, else the model's own 16-bit
dtype), as SVDQuant keeps it: half the bytes of float32, and its rounding (~5e-4
relative) sits far below the 4-bit residual's error, which is computed against the
rounded factors and so absorbs them.

A branch as large as the weight it sits beside defeats the quantization, so ``check_rank``
refuses a rank whose branch outweighs some quantized layer's packed weight (a rank at or
above the layer's own, min(K, N), would hold the whole weight in 16 bits): a
``ConfigError`` before any calibration, naming the layers and the largest rank that fits
them all, instead of a silent clamp."""

from __future__ import annotations

import torch

from clq_compile.errors import ConfigError
from clq_compile.spec import QuantSpec
from clq_compile.twinlog import OP_BITS, TABLE_DTYPE


def lowrank_split(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (N, r), down (r, K)) with up·down the truncated SVD of ``w`` (float32; the SVD
    in float64, so the split does not depend on float32 LAPACK paths)."""
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).float().contiguous(), vh[:r].float().contiguous()


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the branch is stored in for a model computing in ``dtype``."""
    return dtype if dtype.itemsize <= 2 else torch.float16


def branch_bytes(rank: int, k: int, n: int, dtype: torch.dtype) -> int:
    """Bytes of the rank-``rank`` branch of an (n, k) weight of a model in ``dtype`` (a
    rank above the weight's own holds no more than the whole weight)."""
    return min(rank, k, n) * (k + n) * storage_dtype(dtype).itemsize


def packed_bytes(k: int, n: int, spec: QuantSpec) -> int:
    """Bytes of an (n, k) weight packed as ``spec`` says: its codes plus float32 scales
    per row or per group (twin-log: a float16 table of 2**OP_BITS entries per row)."""
    codes = n * k * spec.w_bits // 8
    if spec.w_format == "twinlog":
        return codes + n * (1 << OP_BITS) * TABLE_DTYPE.itemsize
    return codes + n * (k // spec.w_group if spec.w_group else 1) * 4


def largest_rank(k: int, n: int, spec: QuantSpec, dtype: torch.dtype) -> int:
    """The largest rank whose branch does not outweigh the packed weight."""
    return packed_bytes(k, n, spec) // branch_bytes(1, k, n, dtype)


def check_rank(rank: int, shapes: dict[str, tuple[int, int]], spec: QuantSpec,
               dtype: torch.dtype) -> None:
    """Raise a ``ConfigError`` when the rank-``rank`` branch outweighs the packed weight
    of a quantized layer (``shapes``: (K, N) by layer name)."""
    heavy = {name: (k, n) for name, (k, n) in shapes.items()
             if branch_bytes(rank, k, n, dtype) > packed_bytes(k, n, spec)}
    if not heavy:
        return
    full = {name: (k, n) for name, (k, n) in heavy.items() if rank >= min(k, n)}
    bits = 8 * storage_dtype(dtype).itemsize
    name, (k, n) = next(iter((full or heavy).items()))
    if full:
        why = (f"it is at or above the rank of {len(full)} of the {len(shapes)} quantized "
               f"layers (e.g. {name!r}, {k}x{n}), whose {bits}-bit branch would hold the "
               "whole weight and leave nothing quantized")
    else:
        why = (f"its {bits}-bit branch would outweigh the packed {spec.name} weight of "
               f"{len(heavy)} of the {len(shapes)} quantized layers (e.g. {name!r}, {k}x{n}: "
               f"{branch_bytes(rank, k, n, dtype):,} B against {packed_bytes(k, n, spec):,} B)")
    fit = min(largest_rank(k, n, spec, dtype) for k, n in shapes.values())
    fix = (f"use lowrank <= {fit}, the largest rank whose branch outweighs no quantized "
           "layer's packed weight" if fit else "these layers are too small for a branch: "
           "use lowrank=0")
    raise ConfigError(f"option lowrank={rank} is not allowed: {why}; {fix}")


def lowrank_reference(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The branch as the graph computes it: the factors cast to x's dtype, then two
    linears (no bias)."""
    f = torch.nn.functional.linear
    return f(f(x, down.to(x.dtype)), up.to(x.dtype))
