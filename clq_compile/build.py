"""The one path from a captured graph to a Plan, shared by ``clq.quantize`` and the
``clq`` torch.compile backend: resolve options → analysis passes → recipe (plan builder,
calibration) → per-layer measurement. The rewrite that follows is
``clq_compile.passes.rewrite.RewriteLinears``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import torch.fx as fx
from tqdm.auto import tqdm

from clq_compile.annotations import CHECKPOINT_KEY
from clq_compile.budget import promote
from clq_compile.dac import deviation_corrections
from clq_compile.dsq import dual_scale_transforms
from clq_compile.errors import ConfigError
from clq_compile.overrides import PlanOverride
from clq_compile.passes.blocks import AnnotateBlocks
from clq_compile.passes.chains import CrossLayerChains
from clq_compile.passes.find_linears import FindLinears
from clq_compile.passes.groups import SharedInputGroups
from clq_compile.passes.infra import PassManager
from clq_compile.passes.post_norms import MarkPostAttentionNorms
from clq_compile.passes.roles import AssignRoles
from clq_compile.passes.skip_policy import DEFAULT_SKIP_ROLES, SkipPolicy
from clq_compile.plan import Plan
from clq_compile.qlinear import sqnr_db
from clq_compile.recipes import handler, resolve_recipe
from clq_compile.recipes.base import RecipeConfig
from clq_compile.rounding import solve_gptq
from clq_compile.runner import GraphRunner, PlanContext
from clq_compile.shard import Shard
from clq_compile.spec import QuantSpec, parse_bits
from clq_compile.timestep_bits import assign_timestep_bits

log = logging.getLogger(__name__)


def resolve(recipe: str | RecipeConfig, bits: str | QuantSpec,
            **options: Any) -> tuple[RecipeConfig, QuantSpec]:
    """The recipe config and the spec it quantizes to; every option validated here."""
    config = resolve_recipe(recipe, **options)
    return config, config.spec_for(parse_bits(bits))


def skip_reasons(config: RecipeConfig) -> dict[str, str]:
    """Role -> reason for the roles the recipe keeps in full precision (asked for)."""
    return {r: DEFAULT_SKIP_ROLES.get(r, f"role {r} kept in full precision by the recipe")
            for r in config.skip_roles}


def analysis_passes(spec: QuantSpec, config: RecipeConfig) -> PassManager:
    return PassManager(
        [AnnotateBlocks(), FindLinears(), AssignRoles(), MarkPostAttentionNorms(),
         SharedInputGroups(), SkipPolicy(spec, skip_reasons(config)),
         CrossLayerChains(config.window)],
        lint=False,
    )


def analyze(gm: fx.GraphModule, spec: QuantSpec, config: RecipeConfig) -> fx.GraphModule:
    return analysis_passes(spec, config)(gm).gm


def measure_layers(ctx: PlanContext, plan: Plan) -> None:
    """Run the calibration set block by block through the planned quantized model and
    record each layer's output SQNR against its fp output on the same (quantized-prefix)
    input."""
    stats: dict[str, list[float]] = {}
    envs = ctx.runner.start(ctx.flat_calib)
    segments = ctx.runner.order
    for seg in tqdm(segments, desc="measure", leave=False, disable=len(segments) < 8):
        # one override per block, as CBC's: its packed weights serve that block only
        ctx.runner.run_segment(seg, envs, PlanOverride(ctx, plan, measure=stats))
    for name, (sig, noise) in stats.items():
        plan.layers[name].sqnr_db = sqnr_db(sig, noise)


def build_plan(gm: fx.GraphModule, spec: QuantSpec, config: RecipeConfig,
               flat_calib: list[list[Any]], measure: bool = True,
               shard: Shard | None = None) -> Plan:
    """Analyze ``gm`` (in place), run the recipe's plan builder on the calibration set and
    measure each planned layer. ``shard``: this process's share of the per-layer work
    (default: all of it)."""
    t0 = time.perf_counter()
    if config.hessian == "fisher" and CHECKPOINT_KEY in gm.meta:
        raise ConfigError(
            "option hessian='fisher' backpropagates through the whole model per call, which "
            "holds every block's weights: it cannot run from a checkpoint (drop checkpoint=, "
            "or use hessian='uniform')")
    gm = analyze(gm, spec, config)
    ctx = PlanContext(gm, spec, flat_calib, GraphRunner(gm), rank=config.lowrank,
                      shard=shard or Shard())
    t1 = time.perf_counter()
    plan = handler(config)(ctx, config)
    if config.dsq:
        dual_scale_transforms(ctx, plan, config.dsq_iters)
    if config.budget:
        promote(ctx, plan, config.budget, config.budget_spec(spec))
    if config.weights == "gptq":
        solve_gptq(ctx, plan, config.damp, config.act_order, config.hessian)
    if config.timestep_bits is not None:  # on the final weights; DAC then sees the policy
        assign_timestep_bits(ctx, plan, config.timestep_bits)
    if config.dac:
        deviation_corrections(ctx, plan)
    t2 = time.perf_counter()
    if measure:
        measure_layers(ctx, plan)
    plan.meta.update(
        calib_calls=len(flat_calib), calib_peak_bytes=ctx.runner.peak_bytes,
        analyze_s=round(t1 - t0, 3), plan_s=round(t2 - t1, 3),
        measure_s=round(time.perf_counter() - t2, 3) if measure else 0.0, config=repr(config),
    )
    if ctx.shard.world > 1:
        plan.meta["ranks"] = ctx.shard.world
    report_coverage(plan, set(skip_reasons(config).values()), budget=bool(config.budget))
    return plan


def coverage_note(plan: Plan, asked: set[str]) -> str:
    """"" when every linear the recipe meant to quantize is quantized; else what stayed in
    full precision beyond the skips asked for (``asked``), and why (counts per reason)."""
    extra = Counter(lp.skip_reason for lp in plan.layers.values()
                    if not lp.quantized and lp.skip_reason not in asked)
    if not plan.layers:
        return "the graph has no linear layer to quantize"
    if not plan.quantized_layers():
        why = "; ".join(f"{n}x {r}" for r, n in extra.most_common()) or "all skipped by policy"
        return f"no linear quantized ({why})"
    if extra:
        return "kept in full precision beyond the skip policy: " + "; ".join(
            f"{n}x {r}" for r, n in extra.most_common())
    return ""


def report_coverage(plan: Plan, asked: set[str], budget: bool = False) -> None:
    if budget:  # layers the budget kept in full precision were asked for too
        asked = asked | {lp.skip_reason for lp in plan.layers.values()
                         if lp.skip_reason.startswith("kept in full precision (budget")}
    note = coverage_note(plan, asked)
    plan.meta["coverage"] = note
    if note:
        log.warning("%s %s: %d/%d linears quantized; %s", plan.recipe, plan.spec.name,
                    len(plan.quantized_layers()), len(plan.layers), note)
