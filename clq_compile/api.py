"""The front door: ``quantize`` (capture → analyze → calibrate/plan → rewrite) and the
``QuantizedModel`` it returns."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from clq_compile.annotations import annotated_linears
from clq_compile.calibration import GraphRunner, flatten_calls, validate_calibration
from clq_compile.capture import capture
from clq_compile.overrides import PlanOverride
from clq_compile.passes.blocks import AnnotateBlocks
from clq_compile.passes.chains import CrossLayerChains
from clq_compile.passes.find_linears import FindLinears
from clq_compile.passes.groups import SharedInputGroups
from clq_compile.passes.infra import PassManager
from clq_compile.passes.rewrite import RewriteLinears
from clq_compile.passes.roles import AssignRoles
from clq_compile.passes.skip_policy import DEFAULT_SKIP_ROLES, SkipPolicy
from clq_compile.plan import Plan
from clq_compile.qlinear import sqnr_db
from clq_compile.recipes import handler, resolve_recipe
from clq_compile.recipes.base import PlanContext, RecipeConfig
from clq_compile.spec import QuantSpec, parse_bits

log = logging.getLogger(__name__)


class QuantizedModel(torch.nn.Module):
    """A rewritten graph with the original model's call signature and outputs."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        plan: Plan,
        example_inputs: tuple[tuple[Any, ...], dict[str, Any]],
        fp_weight_bytes: int = 0,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self.example_inputs = example_inputs
        self.dynamic_shapes = graph_module.meta.get("clq_dynamic_shapes")
        self.fp_weight_bytes = fp_weight_bytes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.graph_module(*args, **kwargs)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.graph_module.state_dict().values())


def analysis_passes(spec: QuantSpec, config: RecipeConfig) -> PassManager:
    skip = {r: DEFAULT_SKIP_ROLES.get(r, f"role {r} kept in full precision by the recipe")
            for r in config.skip_roles}
    return PassManager(
        [AnnotateBlocks(), FindLinears(), AssignRoles(), SharedInputGroups(),
         SkipPolicy(spec, skip), CrossLayerChains(config.window)],
        lint=False,
    )


def analyze(gm: fx.GraphModule, spec: QuantSpec, config: RecipeConfig) -> fx.GraphModule:
    return analysis_passes(spec, config)(gm).gm


def measure_layers(ctx: PlanContext, plan: Plan) -> None:
    """Run the calibration set block by block through the planned quantized model and
    record each layer's output SQNR against its fp output on the same (quantized-prefix)
    input."""
    stats: dict[str, list[float]] = {}
    override = PlanOverride(ctx, plan, measure=stats)
    envs = ctx.runner.start(ctx.flat_calib)
    segments = ctx.runner.order
    for seg in tqdm(segments, desc="measure", leave=False, disable=len(segments) < 8):
        ctx.runner.run_segment(seg, envs, override)
    for name, (sig, noise) in stats.items():
        plan.layers[name].sqnr_db = sqnr_db(sig, noise)


def plan_model(
    model: torch.nn.Module,
    calib: Sequence[Any],
    recipe: str | RecipeConfig = "rtn",
    bits: str | QuantSpec = "w4a4",
    dynamic_shapes: Any = None,
    **options: Any,
) -> tuple[fx.GraphModule, Plan]:
    """Capture, analyze and plan without rewriting: the analyzed graph and its Plan."""
    config = resolve_recipe(recipe, **options)
    spec = parse_bits(bits).with_groups(config.w_group or None, config.a_group or None)
    calls = validate_calibration(model, calib)
    model.eval()
    gm = analyze(capture(model, *calls[0], dynamic_shapes=dynamic_shapes), spec, config)
    ctx = PlanContext(gm, spec, flatten_calls(gm, calls), GraphRunner(gm))
    plan = handler(config)(ctx, config)
    plan.meta["calib_peak_bytes"] = ctx.runner.peak_bytes
    return gm, plan


def quantize(
    model: torch.nn.Module,
    calib: Sequence[Any],
    recipe: str | RecipeConfig = "rtn",
    bits: str | QuantSpec = "w4a4",
    dynamic_shapes: Any = None,
    measure: bool = True,
    **options: Any,
) -> QuantizedModel:
    """Quantize ``model`` through graph passes; ``calib`` is a list of forward calls
    (dicts of keyword arguments or tuples of positional ones)."""
    t0 = time.perf_counter()
    config = resolve_recipe(recipe, **options)
    spec = parse_bits(bits).with_groups(
        config.w_group or None, config.a_group or None
    )
    calls = validate_calibration(model, calib)
    model.eval()
    gm = capture(model, *calls[0], dynamic_shapes=dynamic_shapes)
    fp_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    gm = analyze(gm, spec, config)
    ctx = PlanContext(gm, spec, flatten_calls(gm, calls), GraphRunner(gm))
    t1 = time.perf_counter()
    plan = handler(config)(ctx, config)
    t2 = time.perf_counter()
    if measure:
        measure_layers(ctx, plan)
    plan.meta.update(
        calib_calls=len(calls), calib_peak_bytes=ctx.runner.peak_bytes,
        capture_s=round(t1 - t0, 3), plan_s=round(t2 - t1, 3),
        measure_s=round(time.perf_counter() - t2, 3), config=repr(config),
    )
    gm = PassManager([RewriteLinears(plan)])(gm).gm
    log.info("quantized %d/%d linears with %s %s", len(plan.quantized_layers()),
             len(plan.layers), config.name, spec.name)
    return QuantizedModel(gm, plan, calls[0], fp_bytes)


__all__ = ["QuantizedModel", "analyze", "quantize", "annotated_linears"]
