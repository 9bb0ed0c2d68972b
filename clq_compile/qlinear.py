"""One quantized linear, computed exactly as the rewritten graph computes it.

Calibration, CLPS search, the rewrite pass and the torch.compile backend all call these,
so what calibration measures is what the deployed graph runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import clq_compile.ops  # noqa: F401 - registers torch.ops.clq
from clq_compile.lowrank import lowrank_reference, lowrank_split, storage_dtype
from clq_compile.ops import (
    reference_activation,
    reference_product,
    reference_weight,
    transform_reference,
)
from clq_compile.plan import LayerPlan, PackedWeight, Plan, TransformPlan
from clq_compile.quant import quantize_weight
from clq_compile.twinlog import twinlog_weight

__all__ = ["LinearMemo", "PackedWeight", "apply_transform", "fold_weight", "pack_weight",
           "planned_weight", "quantized_linear", "split_weight", "sqnr", "sqnr_db"]


def fold_weight(w: torch.Tensor, tp: TransformPlan | None) -> torch.Tensor:
    """W ↦ ((W[:, perm] / smooth) · blockdiag(rot)) so that T(x) · W'ᵀ = x · Wᵀ."""
    w = w.detach().float()
    if tp is None:
        return w
    tp = tp.on(w.device)
    inv = None if tp.smooth is None else 1.0 / tp.smooth.float()
    return transform_reference(w, tp.perm, inv, tp.rot)


def split_weight(
    w: torch.Tensor, lp: LayerPlan, tp: TransformPlan | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(the part to quantize, up, down): the folded weight, less its rank-``lp.rank``
    branch when the layer has one (up/down stored in 16 bits; the residual is taken
    against the stored factors, so it absorbs their rounding)."""
    folded = fold_weight(w, tp)
    if not lp.rank:
        return folded, None, None
    up, down = lowrank_split(folded, lp.rank)
    up, down = up.to(storage_dtype(w.dtype)), down.to(storage_dtype(w.dtype))
    return folded - up.float() @ down.float(), up, down


def pack_weight(
    w: torch.Tensor, lp: LayerPlan, tp: TransformPlan | None, w_clip: float | None = None
) -> PackedWeight:
    """``w`` folded, split and quantized as ``lp.spec`` says (twin-log weights choose
    their own ranges, so ``w_clip`` does not apply to them)."""
    spec = lp.spec
    residual, up, down = split_weight(w, lp, tp)
    if spec.w_format == "twinlog":
        return PackedWeight(*twinlog_weight(residual), up, down)
    w_q, w_scale = quantize_weight(
        residual, spec.w_bits, spec.w_group, lp.w_clip if w_clip is None else w_clip
    )
    return PackedWeight(w_q, w_scale, up, down)


def planned_weight(plan: Plan, lp: LayerPlan, w: torch.Tensor,
                   w_clip: float | None = None) -> PackedWeight:
    """The packed weight the graph runs for ``lp``: the plan's solved weight (GPTQ) when it
    has one for these clips, else ``w`` rounded to nearest. The one place both the
    calibration overrides and the rewrite get a layer's weight from."""
    clip = lp.w_clip if w_clip is None else w_clip
    solved = plan.weights.get(lp.name)
    if solved is not None and clip == lp.w_clip:
        return solved
    return pack_weight(w, lp, plan.transform_of(lp), w_clip=clip)


class LinearMemo:
    """The parts of one layer's quantized linear that a clip search recomputes from the
    same tensors: each input's transform and each packed weight's float values (12-16% of
    CLPS at width 1152, measured; keeping each clip's quantized input too saved under 1%
    more for +440 MiB, so it is not kept).

    Entries are keyed by tensor identity and ``_version``, and hold their key tensors so
    an id is not reused while the memo lives; it serves CPU tensors only, where the op
    runs the very reference pieces it keeps (bit-identical; other devices run their own
    kernels). Past ``max_bytes`` new values are computed but not kept."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: dict[tuple, tuple[tuple, tuple[int, ...], torch.Tensor]] = {}

    def serves(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu"

    def get(self, tag: str, keys: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, kept under ``(tag, keys)``: tensors (and None) by identity and
        version, numbers by value."""
        key = (tag, *(k if isinstance(k, (int, float)) else id(k) for k in keys))
        versions = tuple(k._version for k in keys if isinstance(k, torch.Tensor))
        hit = self._entries.get(key)
        if hit is not None and hit[1] == versions:
            return hit[2]
        value = make()
        size = value.numel() * value.element_size()
        if hit is None and self.bytes + size <= self.max_bytes:
            self._entries[key] = (keys, versions, value)
            self.bytes += size
        return value


def apply_transform(x: torch.Tensor, tp: TransformPlan | None,
                    memo: LinearMemo | None = None) -> torch.Tensor:
    if tp is None:
        return x
    if memo is not None and memo.serves(x):
        return memo.get("transform", (x, tp.perm, tp.smooth, tp.rot),
                        lambda: transform_reference(x, tp.perm, tp.smooth, tp.rot))
    return torch.ops.clq.transform(x, tp.perm, tp.smooth, tp.rot)


def quantized_linear(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None,
    lp: LayerPlan,
    a_clip: float | None = None,
    a8_rows: torch.Tensor | None = None,
    memo: LinearMemo | None = None,
) -> torch.Tensor:
    """``x`` must already be transformed (see :func:`apply_transform`). ``a8_rows``: the
    samples a timestep policy runs at 8-bit activations (``clq.quant_linear``'s)."""
    spec = lp.spec
    clip = float(lp.a_clip if a_clip is None else a_clip)
    if memo is not None and memo.serves(x) and a8_rows is None:
        w = memo.get("weight", (packed.w_q, packed.w_scale), lambda: reference_weight(
            packed.w_q, packed.w_scale, spec.w_bits, spec.w_format, x.shape[-1]))
        xf = reference_activation(x, spec.a_bits, spec.a_group, clip, spec.a_format)
        out = reference_product(xf, w, bias, x.dtype)
    else:
        rows = {} if a8_rows is None else {"a8_rows": a8_rows}
        out = torch.ops.clq.quant_linear(
            x, packed.w_q, packed.w_scale, bias, spec.w_bits, spec.a_bits, spec.a_group,
            clip, **spec.op_kwargs, **rows,
        )
    if packed.up is not None:
        out = out + lowrank_reference(x, packed.up, packed.down)
    return out


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    if noise_energy <= 0.0:
        return float("inf")
    if signal_energy <= 0.0:
        return float("-inf")
    return 10.0 * float(torch.log10(torch.tensor(signal_energy / noise_energy)))


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB of ``out`` against ``ref``."""
    ref, out = ref.double(), out.double()
    return sqnr_db(float(ref.pow(2).sum()), float((ref - out).pow(2).sum()))
