"""Baselines that share the machinery: SmoothQuant (α-smoothing, online) and QuaRot
(randomized Hadamard, online + folded, data-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from clq_compile.cbc import BlockData, calibrate_blockwise
from clq_compile.options import integer, option, power_of_two, real
from clq_compile.passes.obs import quarot_transform, smoothquant_transform
from clq_compile.plan import Plan
from clq_compile.recipes import register_recipe
from clq_compile.recipes.base import RecipeConfig
from clq_compile.runner import PlanContext


@dataclass(frozen=True)
class SmoothQuantConfig(RecipeConfig):
    name: ClassVar[str] = "smoothquant"
    needs_calibration: ClassVar[bool] = True
    alpha: float = option(0.5, real(0.0, 1.0))  # migration strength


@dataclass(frozen=True)
class QuaRotConfig(RecipeConfig):
    name: ClassVar[str] = "quarot"
    seed: int = option(0, integer(0))
    max_block: int = option(1 << 14, power_of_two(2))


def _group_weight_absmax(ctx: PlanContext, plan: Plan, group: int) -> torch.Tensor:
    ws = [ctx.weight(lp.name).detach().float().abs().amax(dim=0)
          for lp in plan.quantized_layers() if lp.group == group]
    return torch.stack(ws).amax(dim=0)


@register_recipe(SmoothQuantConfig)
def plan_smoothquant(ctx: PlanContext, config: SmoothQuantConfig) -> Plan:
    plan = ctx.base_plan(config.name)

    def decide(block: BlockData) -> None:
        for g, st in block.stats.items():
            if g not in plan.transforms:
                plan.transforms[g] = smoothquant_transform(
                    st.absmax, _group_weight_absmax(ctx, plan, g), config.alpha
                )
        for name in block.layers:
            lp = plan.layers[name]
            lp.outlier_score = float(block.stats[lp.group].absmax.max())

    calibrate_blockwise(ctx, plan, decide, prefix="none", desc="smoothquant")
    return plan


@register_recipe(QuaRotConfig)
def plan_quarot(ctx: PlanContext, config: QuaRotConfig) -> Plan:
    plan = ctx.base_plan(config.name)
    for lp in plan.quantized_layers():
        if lp.group not in plan.transforms:
            plan.transforms[lp.group] = quarot_transform(
                lp.in_features, config.max_block, config.seed + lp.group
            )
        if plan.transforms[lp.group].note:
            lp.notes.append(plan.transforms[lp.group].note)
    return plan
