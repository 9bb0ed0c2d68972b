"""CLQ: CBC + OBS + CLPS (DESIGN.md §6). Every component is an option, so each can be
ablated: ``cbc="none"``, ``obs=False``, ``order="sorted"``, ``clps=False``, ``a_group=128``.
``rotation="adaptive"`` lets each shared input take LRQ-DiT's outlier-aware rotation
instead of the Hadamard where it measures better (clq_compile.adaptive).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from clq_compile.adaptive import choose_rotation
from clq_compile.cbc import PREFIXES, BlockData, calibrate_blockwise
from clq_compile.clps import SEARCHES, block_references, search_layer
from clq_compile.errors import ConfigError
from clq_compile.options import (
    boolean,
    choice,
    grid,
    integer,
    option,
    optional,
    power_of_two,
    ratio,
)
from clq_compile.passes.obs import ORDERS, ROTATIONS, obs_transform
from clq_compile.plan import Plan
from clq_compile.recipes import register_recipe
from clq_compile.recipes.base import RecipeConfig
from clq_compile.runner import PlanContext


@dataclass(frozen=True)
class CLQConfig(RecipeConfig):
    """Budget knobs of the search: ``w_grid`` × ``a_grid`` probes per layer, on
    ``clps_samples`` calibration calls, over ``window`` blocks downstream."""

    name: ClassVar[str] = "clq"
    needs_calibration: ClassVar[bool] = True
    cbc: str = option("all", choice(*PREFIXES))
    obs: bool = option(True, boolean)
    order: str = option("auto", choice("auto", *ORDERS))  # auto: zigzag per token, sorted per group
    block: int = option(128, power_of_two(2))  # Hadamard block B
    # "adaptive": per shared input, the Hadamard or the outlier-aware rotation (greedy,
    # ``rotation_steps`` steps a block), by measured output SQNR (clq_compile.adaptive)
    rotation: str = option("hadamard", choice(*ROTATIONS))
    rotation_steps: int = option(32, integer(1))
    percentile: float | None = option(None, optional(ratio))  # outlier score: None = max |x|
    clps: bool = option(True, boolean)
    w_grid: tuple[float, ...] = option((1.0, 0.95, 0.9, 0.85, 0.8), grid)
    a_grid: tuple[float, ...] = option((1.0, 0.95, 0.9, 0.85, 0.8, 0.7), grid)
    clps_samples: int = option(4, integer(1))
    clps_search: str = option("exact", choice(*SEARCHES))  # see clps.search_layer

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotation != "hadamard" and not self.obs:
            raise ConfigError(f"option rotation={self.rotation!r} chooses OBS's rotation; "
                              "it needs obs=True, got obs=False")

    @property
    def keep_tokens(self) -> int:
        """Calibration tokens kept per call (the percentile score and the adaptive
        rotation read them)."""
        return 256 if self.percentile is not None or self.rotation == "adaptive" else 0

    def resolved_order(self, a_group: int) -> str:
        if self.order != "auto":
            return self.order
        return "sorted" if a_group else "zigzag"


@register_recipe(CLQConfig)
def plan_clq(ctx: PlanContext, config: CLQConfig) -> Plan:
    plan = ctx.base_plan(config.name)
    cache: dict = {}
    clps_time = [0.0]
    rotation_time = [0.0]
    probes: dict[str, int] = {}
    calls: dict[str, int] = {}  # calibration calls the probes ran

    def decide(block: BlockData) -> None:
        for g, st in block.stats.items():
            if config.obs and g not in plan.transforms:
                order = config.resolved_order(ctx.spec.a_group)
                scores = st.score(config.percentile)
                if config.rotation == "adaptive":
                    t0 = time.perf_counter()
                    plan.transforms[g] = choose_rotation(ctx, plan, g, st, scores, order,
                                                         config.block, config.rotation_steps)
                    rotation_time[0] += time.perf_counter() - t0
                else:
                    plan.transforms[g] = obs_transform(scores, order, config.block)
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
        fp_refs, reuse = block_references(ctx, block.seg, block.layers, envs)
        found = ctx.shard.map(lambda name: search_layer(
            ctx, plan, name, block.seg, envs, fp_refs, config.w_grid, config.a_grid, cache,
            reuse, config.clps_search), block.layers)
        for name, r in found.items():
            lp = plan.layers[name]
            lp.target, lp.err_before, lp.err_after = r.target, r.err_before, r.err_after
            lp.w_clip, lp.a_clip = r.w_clip, r.a_clip
            probes[name], calls[name] = r.probes, r.calls
        clps_time[0] += time.perf_counter() - t0

    calibrate_blockwise(ctx, plan, decide, prefix=config.cbc, desc="clq",
                        keep_tokens=config.keep_tokens)
    if config.rotation == "adaptive":
        kinds = [tp.kind for tp in plan.transforms.values()]
        plan.meta["rotations"] = {k: kinds.count(k) for k in sorted(set(kinds))}
        plan.meta["rotation_s"] = round(rotation_time[0], 3)
    plan.meta.update(clps_s=round(clps_time[0], 3), clps_probes=sum(probes.values()),
                     clps_probe_calls=sum(calls.values()))
    if ctx.shard.world > 1:
        plan.meta["clps_probes_per_rank"] = ctx.shard.per_rank(probes)
        plan.meta["clps_probe_calls_per_rank"] = ctx.shard.per_rank(calls)
    return plan
