"""Which calls the Triton kernels take, and the tile plan for each (no Triton import).

A call the kernels cannot take raises :class:`Unsupported` with the reason; the dispatch
layer turns that into a reference fallback logged once per shape. Keeping these rules
apart from the kernels lets tests and the dispatcher ask without compiling anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clq_compile.hadamard import is_pow2
from clq_compile.lowering.triton import configs
from clq_compile.lzs import GROUPS as LZS_GROUPS
from clq_compile.ops import PROLOGUES, modulation_rows

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# How the quantizer stores integers, one per GEMM route (routes.ROUTES): int4 pairs / int8,
# one int8 per element, float8 e4m3.
CONTAINERS = ("packed", "int8", "fp8")


class Unsupported(ValueError):
    """A shape, dtype or layout the kernels do not take; ``str(e)`` is the reason."""


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class RowPlan:
    """Activation quantize / transform launch plan. ``bits`` 0 means transform only;
    ``group`` 0 means one scale per token."""

    k: int
    bits: int
    group: int
    rot_block: int  # 0: no rotation
    block_k: int


def plan_rows(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    smooth: torch.Tensor | None,
    rot: torch.Tensor | tuple[int, ...] | None,
    bits: int,
    group: int,
    interpret: bool | None = None,
) -> RowPlan:
    """Check a transform / activation-quantize call and pick its K tile. ``rot``: the
    rotation or only its shape (a traced call has the factored tile, not the matrix)."""
    if x.dtype not in FLOAT_DTYPES:
        raise Unsupported(f"activation dtype {x.dtype} (kernels take fp32/bf16/fp16)")
    k = x.shape[-1] if x.ndim else 0
    if k == 0:
        raise Unsupported("empty channel dimension")
    if bits not in (0, 4, 8):
        raise Unsupported(f"{bits}-bit activations (kernels quantize to 4 or 8 bits)")
    if bits == 4 and k % 2:
        raise Unsupported(f"int4 packing needs an even K, got {k}")
    if perm is not None and (perm.dtype.is_floating_point or perm.shape != (k,)):
        raise Unsupported(f"permutation must be an integer vector of length {k}")
    if smooth is not None and smooth.shape != (k,):
        raise Unsupported(f"smooth must be a vector of length {k}, got {tuple(smooth.shape)}")
    b = 0
    if rot is not None:
        shape = tuple(rot.shape) if isinstance(rot, torch.Tensor) else tuple(rot)
        if len(shape) == 3:
            raise Unsupported(
                f"per-block rotation {shape} (rotation='adaptive'): the kernels "
                "load one B×B tile for every block of K")
        b = shape[0]
        if len(shape) != 2 or shape[1] != b:
            raise Unsupported(f"rotation must be a square block, got {shape}")
        if not (is_pow2(b) and configs.MIN_ROT_BLOCK <= b <= configs.MAX_ROT_BLOCK):
            raise Unsupported(
                f"rotation block {b} (kernel takes powers of two in "
                f"[{configs.MIN_ROT_BLOCK}, {configs.MAX_ROT_BLOCK}]: tl.dot needs >= 16)"
            )
        if k % b:
            raise Unsupported(f"rotation block {b} does not divide K={k}")
    if group == k:
        group = 0  # one group spanning the row is per-token (same scale, same shape)
    if group:
        if bits == 0:
            raise Unsupported("a group only applies when quantizing")
        if group < 0 or not is_pow2(group) or group < 2 or k % group:
            raise Unsupported(
                f"activation group {group} (needs a power of two >= 2 dividing K={k})"
            )
    pref = configs.preferred_row_block_k(interpret)
    block_k = max(b, group, 2, min(pref, _next_pow2(k)))
    if block_k > configs.MAX_ROW_BLOCK_K:
        raise Unsupported(f"K tile {block_k} (group/rotation) exceeds {configs.MAX_ROW_BLOCK_K}")
    return RowPlan(k=k, bits=bits, group=group, rot_block=b, block_k=block_k)


def plan_modulation(t: torch.Tensor | None, x_shape: tuple[int, ...] | torch.Size,
                    x_dtype: torch.dtype) -> int | None:
    """Rows of a prologue's ``pro_mul``/``pro_add`` in kernel form (None when absent):
    it must broadcast against x per sample or per token and have x's dtype. Shapes and
    dtypes only (a fake tensor will do). Raises :class:`Unsupported`."""
    if t is None:
        return None
    found = modulation_rows(tuple(t.shape), tuple(x_shape))
    if found is None:
        raise Unsupported(f"modulation operand {tuple(t.shape)} is not one row per sample or "
                          f"token of x {tuple(x_shape)}")
    if t.dtype != x_dtype:
        raise Unsupported(f"modulation operand is {t.dtype}, x {x_dtype}")
    return found[0]


def modulation_operand(t: torch.Tensor | None, x_shape: tuple[int, ...] | torch.Size,
                       x_dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` as the kernel reads it: (rows, K) contiguous, each row serving M / rows
    consecutive rows of x (:func:`plan_modulation`)."""
    rows = plan_modulation(t, x_shape, x_dtype)
    return None if t is None else t.reshape(rows, x_shape[-1]).contiguous()


def plan_prologue(x: torch.Tensor, prologue: str | None, pro_rows: tuple[int, ...] = ()
                  ) -> None:
    """Check a fused prologue: its name, and the row counts of its modulation operands in
    kernel form (:func:`modulation_operand`), which must divide x's rows."""
    if prologue is not None and prologue not in PROLOGUES:
        raise ValueError(f"prologue {prologue!r} not in {(None, *PROLOGUES)}")
    m = x.numel() // max(x.shape[-1], 1) if x.ndim else 0
    if any(r < 1 or m % r for r in pro_rows):
        raise Unsupported(f"modulation rows {pro_rows} do not divide the {m} rows of x")


def plan_quantize(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    smooth: torch.Tensor | None,
    rot: torch.Tensor | tuple[int, ...] | None,
    bits: int,
    group: int,
    clip: float,
    container: str,
    prologue: str | None,
    lzs_group: int,
    pro_rows: tuple[int, ...] = (),
) -> RowPlan:
    """:func:`plan_rows` plus the quantizer's own checks (clip, container, prologue, LZS,
    ``pro_rows``: the row counts of the modulation operands in kernel form):
    every reason the activation-quantize kernel refuses a call, asked without launching.
    Raises ValueError for an argument no call may have, :class:`Unsupported` otherwise."""
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio must be in (0, 1], got {clip}")
    if container not in CONTAINERS:
        raise ValueError(f"container {container!r} not in {CONTAINERS}")
    if container == "fp8" and bits != 4:
        raise Unsupported(f"fp8 container holds 4-bit values exactly, not {bits}-bit")
    if lzs_group:
        if bits != 8 or group or lzs_group not in LZS_GROUPS or x.shape[-1] % lzs_group:
            raise Unsupported(f"LZS group {lzs_group} needs 8-bit per-token codes and a "
                              f"group in {LZS_GROUPS} dividing K={x.shape[-1]}")
    plan_prologue(x, prologue, pro_rows)
    plan = plan_rows(x, perm, smooth, rot, bits, group)
    if lzs_group and plan.block_k % lzs_group:
        raise Unsupported(f"K tile {plan.block_k} does not hold whole LZS groups")
    return plan


A_KINDS = {4: "int4", 8: "int8", 16: "float"}


@dataclass(frozen=True)
class GemmPlan:
    """Quantized GEMM launch plan. Scales are constant over K segments of ``seg``
    elements; ``grouped`` is False when one segment spans K (per token x per channel)."""

    a_kind: str
    w_packed: bool
    k: int
    a_group: int
    w_group: int
    seg: int
    grouped: bool
    block_k: int


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def plan_gemm(
    a_bits: int,
    w_bits: int,
    k: int,
    a_scale_groups: int,
    w_scale_groups: int,
    out_dtype: torch.dtype,
    interpret: bool | None = None,
) -> GemmPlan:
    """Check a GEMM call. ``*_scale_groups`` is the number of scale columns (1 = per
    token / per channel; ignored for float activations)."""
    if a_bits not in A_KINDS:
        raise Unsupported(f"{a_bits}-bit activations (kernels take 4, 8 or 16)")
    if w_bits not in (4, 8):
        raise Unsupported(f"{w_bits}-bit weights (kernels take 4 or 8)")
    if out_dtype not in FLOAT_DTYPES:
        raise Unsupported(f"output dtype {out_dtype}")
    if k <= 0:
        raise Unsupported("empty reduction dimension")
    a_kind = A_KINDS[a_bits]
    if a_kind == "float":
        a_scale_groups = 1
    for name, n in (("activation", a_scale_groups), ("weight", w_scale_groups)):
        if n < 1 or k % n:
            raise Unsupported(f"{name} scale columns {n} do not divide K={k}")
    a_group, w_group = k // a_scale_groups, k // w_scale_groups
    seg, other = min(a_group, w_group), max(a_group, w_group)
    if other % seg:
        raise Unsupported(f"activation group {a_group} and weight group {w_group} do not nest")
    w_packed = w_bits == 4
    min_bk = configs.min_gemm_block_k(a_kind, w_packed)
    pref = configs.preferred_block_k(interpret)
    grouped = seg < k
    if grouped:
        block_k = min(pref, _largest_pow2_divisor(seg))
        if block_k < min_bk:
            raise Unsupported(
                f"scale group {seg} allows K tiles of at most {block_k}; "
                f"this variant needs >= {min_bk} (tl.dot depth)"
            )
    else:
        block_k = max(min_bk, min(pref, _next_pow2(k)))
    return GemmPlan(a_kind, w_packed, k, a_group, w_group, seg, grouped, block_k)
