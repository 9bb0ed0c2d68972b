"""Weight rounding after any recipe's plan (option ``weights``): the recipe decides
transforms and clips, then this stage walks the blocks once more (CBC order, on the
quantized prefix, earlier blocks already with their solved weights) and replaces each
layer's round-to-nearest integers by GPTQ's, from the Hessian of the layer's input *as
the graph feeds it*: after the layer's transform."""

from __future__ import annotations

import logging
import time

import torch

from clq_compile.cbc import BlockData, calibrate_blockwise
from clq_compile.errors import ConfigError
from clq_compile.fisher import HESSIANS, fisher_weights
from clq_compile.gptq import gptq_quantize
from clq_compile.ops import transform_reference
from clq_compile.plan import PackedWeight, Plan, TransformPlan
from clq_compile.qlinear import split_weight
from clq_compile.runner import PlanContext

log = logging.getLogger(__name__)


def transformed_hessian(h: torch.Tensor, tp: TransformPlan | None) -> torch.Tensor:
    """Hessian of T(x) = x·M from that of x: Mᵀ·H·M, with M = T(I) as the graph computes
    it (float32), the product in float64."""
    if tp is None:
        return h
    tp = tp.on(h.device)
    m = transform_reference(torch.eye(h.shape[0], device=h.device), tp.perm, tp.smooth,
                            tp.rot).double()
    out = m.T @ h.double() @ m
    return (out + out.T) / 2  # symmetric up to float error; make it exactly so


def solve_gptq(ctx: PlanContext, plan: Plan, damp: float, act_order: bool,
               hessian: str = "uniform") -> None:
    """Fill ``plan.weights`` with GPTQ-rounded weights for every quantized layer.
    ``hessian``: "uniform" (Σ xᵀx over all calls) or "fisher" (each layer's calls weighted
    by AdaTSQ's Fisher sensitivity, clq_compile.fisher)."""
    if hessian not in HESSIANS:
        raise ConfigError(f"option hessian={hessian!r}: expected one of {list(HESSIANS)}")
    t0 = time.perf_counter()
    weights = fisher_weights(ctx, plan) if hessian == "fisher" else True
    rounding = "gptq" if hessian == "uniform" else f"gptq-{hessian}"

    def decide(block: BlockData) -> None:
        hessians: dict[int | str, torch.Tensor] = {}

        def solve(name: str) -> tuple[PackedWeight, float]:
            lp = plan.layers[name]
            tp = plan.transform_of(lp)
            key = block.hessian_key(name, lp.group)
            if key not in hessians:
                hessians[key] = transformed_hessian(block.hessians[key].mean(), tp)
            residual, up, down = split_weight(ctx.weight(name), lp, tp)
            w_q, scale, used = gptq_quantize(
                residual, hessians[key], lp.spec.w_bits, lp.spec.w_group, lp.w_clip,
                damp=damp, act_order=act_order)
            return PackedWeight(w_q, scale, up, down), used

        for name, (packed, used) in ctx.shard.map(solve, block.layers).items():
            plan.weights[name] = packed
            plan.layers[name].rounding = rounding
            if used != damp:
                plan.layers[name].notes.append(
                    f"gptq dampening raised to {used:g} (singular Hessian)")

    calibrate_blockwise(ctx, plan, decide, prefix="all", desc="gptq", hessians=weights)
    plan.meta["gptq_s"] = round(time.perf_counter() - t0, 3)
    log.info("gptq: %d layers solved in %.1f s", len(plan.weights), plan.meta["gptq_s"])
