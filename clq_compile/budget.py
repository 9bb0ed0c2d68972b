"""Mixed precision by sensitivity (option ``budget``): after the recipe's plan, rank the
quantized layers by the error their quantization alone causes downstream — CLPS's
measure: the largest relative output error over the layer's cross-layer chain, with only
that layer quantized at its planned clips, on the quantized prefix — and promote the worst
to ``budget_bits`` until a ``budget`` fraction of the quantized weights is spent."""

from __future__ import annotations

import logging
import time

from clq_compile.cbc import BlockData, calibrate_blockwise
from clq_compile.clps import block_references, chain_errors
from clq_compile.plan import Plan
from clq_compile.runner import PlanContext
from clq_compile.spec import QuantSpec

log = logging.getLogger(__name__)

BUDGET_BITS = ("w8a8", "w4a8", "fp")


def sensitivities(ctx: PlanContext, plan: Plan) -> dict[str, float]:
    """Layer name -> downstream relative error with only that layer quantized. When CLPS
    ran, it already measured exactly this at the clips it chose (its target error), and
    that is reused instead of probing again."""
    layers = plan.quantized_layers()
    if layers and all(lp.err_after is not None for lp in layers):
        return {lp.name: lp.err_after for lp in layers}
    out: dict[str, float] = {}
    cache: dict = {}

    def decide(block: BlockData) -> None:
        fp_refs, reuse = block_references(ctx, block.seg, block.layers, block.envs)
        out.update(ctx.shard.map(lambda name: max(chain_errors(
            ctx, plan, name, block.seg, block.envs, fp_refs, cache, reuse).values()),
            block.layers))

    calibrate_blockwise(ctx, plan, decide, prefix="all", desc="sensitivity")
    return out


def promote(ctx: PlanContext, plan: Plan, budget: float, to: QuantSpec | None) -> None:
    """Promote the most sensitive layers to ``to`` (None: full precision), worst first,
    while their weights fit in ``budget`` × the quantized layers' weights; a layer that
    does not fit is passed over for smaller ones below it."""
    t0 = time.perf_counter()
    sens = sensitivities(ctx, plan)
    layers = sorted(plan.quantized_layers(), key=lambda lp: sens[lp.name], reverse=True)
    total = sum(lp.in_features * lp.out_features for lp in layers)
    allowed = budget * total
    spent, promoted = 0, []
    for rank, lp in enumerate(layers, 1):
        size = lp.in_features * lp.out_features
        if spent + size > allowed:
            continue
        spent += size
        why = f"budget: #{rank} of {len(layers)} by downstream error {sens[lp.name]:.3g}"
        if to is None:
            lp.spec, lp.skip_reason, lp.rank = None, f"kept in full precision ({why})", 0
        else:
            # an LZS group is the coding's, not a quantization group the user asked for
            keep = to.a_bits < 16 and to.a_format == lp.spec.a_format
            lp.spec = to.with_groups(lp.spec.w_group, lp.spec.a_group if keep else 0)
            lp.w_clip = lp.a_clip = 1.0  # the recipe's clips were chosen for the lower bits
            lp.notes.append(f"promoted to {to.name} ({why})")
        promoted.append(lp.name)
    plan.meta["budget"] = {
        "fraction": budget, "to": "fp" if to is None else to.name, "promoted": promoted,
        "sensitivity": sens, "spent": round(spent / max(total, 1), 4),
        "seconds": round(time.perf_counter() - t0, 3)}
    log.info("budget %.3g: %d layers promoted to %s", budget, len(promoted),
             "fp" if to is None else to.name)
