"""RTN: round-to-nearest, no transform, no search; the baseline every recipe must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clq_compile.options import option, ratio
from clq_compile.plan import Plan
from clq_compile.recipes import register_recipe
from clq_compile.recipes.base import RecipeConfig
from clq_compile.runner import PlanContext


@dataclass(frozen=True)
class RTNConfig(RecipeConfig):
    name: ClassVar[str] = "rtn"
    w_clip: float = option(1.0, ratio)
    a_clip: float = option(1.0, ratio)


@register_recipe(RTNConfig)
def plan_rtn(ctx: PlanContext, config: RTNConfig) -> Plan:
    plan = ctx.base_plan(config.name)
    for lp in plan.quantized_layers():
        lp.w_clip, lp.a_clip = config.w_clip, config.a_clip
    return plan
