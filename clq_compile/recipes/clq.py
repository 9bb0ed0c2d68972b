"""CLQ: CBC + OBS + CLPS (DESIGN.md §6). Every component is an option, so each can be
ablated: ``cbc="none"``, ``obs=False``, ``order="sorted"``, ``clps=False``, ``a_group=128``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from clq_compile.cbc import BlockData, calibrate_blockwise
from clq_compile.errors import ConfigError
from clq_compile.passes.clps import candidates, search_layer
from clq_compile.passes.obs import ORDERS, obs_transform
from clq_compile.plan import Plan
from clq_compile.recipes import register_recipe
from clq_compile.recipes.base import PlanContext, RecipeConfig


@dataclass(frozen=True)
class CLQConfig(RecipeConfig):
    """Budget knobs of the search: ``w_grid`` × ``a_grid`` probes per layer, on
    ``clps_samples`` calibration calls, over ``window`` blocks downstream."""

    name: ClassVar[str] = "clq"
    needs_calibration: ClassVar[bool] = True
    cbc: str = "all"  # "all" | "last" | "none"
    obs: bool = True
    order: str = "auto"  # "auto" (zigzag per token, sorted per group) | ORDERS
    block: int = 128
    percentile: float | None = None  # outlier score: None = max |x|, else this quantile
    clps: bool = True
    w_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)
    a_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
    clps_samples: int = 4

    def __post_init__(self) -> None:
        if self.order != "auto" and self.order not in ORDERS:
            raise ConfigError(f"order must be 'auto' or one of {ORDERS}, got {self.order!r}")
        if self.cbc not in ("all", "last", "none"):
            raise ConfigError(f"cbc must be 'all', 'last' or 'none', got {self.cbc!r}")

    def resolved_order(self) -> str:
        if self.order != "auto":
            return self.order
        return "sorted" if self.a_group else "zigzag"


@register_recipe(CLQConfig)
def plan_clq(ctx: PlanContext, config: CLQConfig) -> Plan:
    plan = ctx.base_plan(config.name)
    cache: dict = {}
    clps_time = [0.0, 0]

    def decide(block: BlockData) -> None:
        for g, st in block.stats.items():
            if config.obs and g not in plan.transforms:
                plan.transforms[g] = obs_transform(
                    st.score(config.percentile), config.resolved_order(), config.block
                )
        for name in block.layers:
            lp = plan.layers[name]
            lp.outlier_score = float(block.stats[lp.group].absmax.max())
            tp = plan.transform_of(lp)
            if tp is not None and tp.note and tp.note not in lp.notes:
                lp.notes.append(tp.note)
        if not config.clps:
            return
        t0 = time.perf_counter()
        envs = block.envs[: config.clps_samples]
        watch = {n for name in block.layers for n in candidates(ctx, name)}
        fp_refs = ctx.runner.probe(envs, block.seg, watch)
        reuse = ctx.runner.run_segment(block.seg, envs, commit=False)
        for name in block.layers:
            r = search_layer(ctx, plan, name, block.seg, envs, fp_refs, config.w_grid,
                             config.a_grid, cache, reuse)
            lp = plan.layers[name]
            lp.target, lp.err_before, lp.err_after = r.target, r.err_before, r.err_after
            lp.w_clip, lp.a_clip = r.w_clip, r.a_clip
            clps_time[1] += r.probes
        clps_time[0] += time.perf_counter() - t0

    calibrate_blockwise(ctx, plan, decide, prefix=config.cbc, desc="clq", keep_tokens=(
        256 if config.percentile is not None else 0))
    plan.meta.update(clps_s=round(clps_time[0], 3), clps_probes=clps_time[1])
    return plan
