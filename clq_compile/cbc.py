"""CBC (cross-block calibration): the driver that walks blocks in order.

For block b it (1) runs b in float on the current calibration inputs, collecting
statistics of every planned linear's input, (2) lets the recipe decide b's layers, then
(3) advances the calibration inputs through b *quantized with its final plan*, so block
b+1 is calibrated on what the quantized prefix really produces. ``prefix``:
- "all": the whole quantized prefix feeds block b (default);
- "last": only block b-1 is quantized, on full-precision inputs (the paper's reading);
- "none": plain PTQ, statistics from the full-precision model (ablation).
Only the values live at a block boundary are held, per calibration call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from clq_compile.annotations import linear_info
from clq_compile.gptq import Hessian
from clq_compile.overrides import PlanOverride
from clq_compile.plan import Plan
from clq_compile.runner import PlanContext

log = logging.getLogger(__name__)

PREFIXES = ("all", "last", "none")


@dataclass
class GroupStats:
    """Per-channel statistics of one shared input, over all calibration tokens."""

    absmax: torch.Tensor
    samples: list[torch.Tensor] = field(default_factory=list)  # token subsample (percentile)

    def score(self, percentile: float | None) -> torch.Tensor:
        if percentile is None or not self.samples:
            return self.absmax
        return torch.quantile(torch.cat(self.samples).abs(), percentile, dim=0)


@dataclass
class BlockData:
    seg: int
    envs: list[dict[fx.Node, Any]]  # calibration inputs of this block (quantized prefix)
    stats: dict[int, GroupStats]  # by group id, for groups with a layer in this block
    layers: list[str]  # planned layers of this block, in graph order
    # Σ xᵀx of the raw (untransformed) input, when asked: by group id, or by layer name
    # when weighted per layer (``hessian_key``)
    hessians: dict[int | str, Hessian] = field(default_factory=dict)

    def hessian_key(self, name: str, group: int) -> int | str:
        return name if name in self.hessians else group


def _collect(ctx: PlanContext, plan: Plan, seg: int, envs, keep_tokens: int,
             hessians: bool | dict[str, torch.Tensor]):
    stats: dict[int, GroupStats] = {}
    layers: list[str] = []
    sums: dict[int | str, Hessian] = {}
    gram: dict[tuple[int, int], torch.Tensor] = {}  # the latest (group, call)'s xᵀx
    gen = torch.Generator().manual_seed(seg + 1)

    visited: set[tuple[int, int]] = set()

    def override(node: fx.Node, args: tuple, kwargs: dict, i: int) -> Any:
        info = linear_info(node)
        lp = plan.layers.get(info.name) if info is not None else None
        if lp is None or not lp.quantized:
            return NotImplemented
        if lp.name not in layers:
            layers.append(lp.name)
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        if isinstance(hessians, dict):  # weighted per layer and call: each layer its own
            if (lp.group, i) not in gram:  # one xᵀx per shared input and call
                gram.clear()
                x64 = x.double()
                gram[(lp.group, i)] = x64.T @ x64
            sums.setdefault(lp.name, Hessian.empty(x.shape[-1])).add_weighted(
                gram[(lp.group, i)], x.shape[0], float(hessians[lp.name][i]))
        if (lp.group, i) in visited:  # q/k/v read the same tensor: count it once
            return NotImplemented
        visited.add((lp.group, i))
        if hessians is True:
            sums.setdefault(lp.group, Hessian.empty(x.shape[-1])).add(x)
        am = x.abs().amax(dim=0)
        st = stats.get(lp.group)
        if st is None:
            st = stats[lp.group] = GroupStats(am)
        else:
            st.absmax = torch.maximum(st.absmax, am)
        if keep_tokens:
            idx = torch.randint(0, x.shape[0], (min(keep_tokens, x.shape[0]),), generator=gen)
            st.samples.append(x[idx])
        return NotImplemented

    ctx.runner.run_segment(seg, envs, override, commit=False)
    return stats, layers, sums


def calibrate_blockwise(
    ctx: PlanContext,
    plan: Plan,
    decide: Callable[[BlockData], None],
    prefix: str = "all",
    keep_tokens: int = 0,
    desc: str = "CBC",
    hessians: bool | dict[str, torch.Tensor] = False,
) -> None:
    """Walk the blocks; ``decide`` fills in the plan of each block's layers in place.
    ``hessians``: also accumulate each shared input's ``Σ xᵀx`` (for GPTQ); a dict of
    per-call weights by layer name accumulates each layer's own ``Σ α_c·x_cᵀx_c``."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown CBC prefix {prefix!r}; choose from {PREFIXES}")
    runner = ctx.runner
    fp = runner.start(ctx.flat_calib)
    cal = fp if prefix == "none" else runner.start(ctx.flat_calib)
    segments = runner.order
    for seg in tqdm(segments, desc=desc, leave=False, disable=len(segments) < 4):
        stats, layers, sums = _collect(ctx, plan, seg, cal, keep_tokens, hessians)
        if layers:
            decide(BlockData(seg, cal, stats, layers, sums))
        quantized = PlanOverride(ctx, plan)  # packed weights of this block only
        if prefix == "all":
            runner.run_segment(seg, cal, quantized)
        elif prefix == "last":
            cal = [dict(e) for e in fp]
            runner.run_segment(seg, cal, quantized)
            runner.run_segment(seg, fp, None)
        else:
            runner.run_segment(seg, fp, None)
