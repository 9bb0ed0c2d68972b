"""CLPS (cross-layer parameter search): pick each layer's clip ratios by the error they
cause at the most affected downstream layer, not at the layer itself.

For layer ℓ (others in float), the target ℓ_T is the layer of ℓ's cross-layer chain
whose output has the largest relative error with ℓ quantized at clips (1, 1); then
(α_w, α_a) on a grid minimize ℓ_T's output error. Cost per layer: one probe over the
window, then one probe up to ℓ_T per grid point, on ``samples`` calibration calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from clq_compile.annotations import linear_info
from clq_compile.overrides import PlanOverride
from clq_compile.plan import Plan
from clq_compile.runner import PlanContext


@dataclass
class SearchResult:
    target: str
    err_before: float
    err_after: float
    w_clip: float
    a_clip: float
    probes: int


def relative_error(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> float:
    """Σ‖ref − out‖² / Σ‖ref‖² over calibration calls."""
    num = sum(float((r.double() - o.double()).pow(2).sum()) for r, o in zip(ref, out, strict=True))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    return num / max(den, 1e-30)


def candidates(ctx: PlanContext, name: str) -> list[fx.Node]:
    """ℓ's chain (downstream quantizable linears in the window); ℓ itself if empty."""
    chain = linear_info(ctx.nodes[name]).chain
    return [ctx.nodes[c] for c in chain] or [ctx.nodes[name]]


def downstream(node: fx.Node) -> set[fx.Node]:
    """``node`` and everything that reads it, transitively."""
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(n.users)
    return out


def block_references(ctx: PlanContext, seg: int, layers: Sequence[str],
                     envs: list[dict]) -> tuple[dict[fx.Node, list[torch.Tensor]], list[dict]]:
    """What probing the layers of block ``seg`` compares against: the float outputs of
    every layer of their chains (``fp_refs``), and the block's own float values per call
    (``reuse``, so a probe recomputes only what depends on the probed layer)."""
    watch = {n for name in layers for n in candidates(ctx, name)}
    return ctx.runner.probe(envs, seg, watch), ctx.runner.run_segment(seg, envs, commit=False)


def chain_errors(
    ctx: PlanContext,
    plan: Plan,
    name: str,
    seg: int,
    envs: list[dict],
    fp_refs: dict[fx.Node, list[torch.Tensor]],
    cache: dict | None = None,
    reuse: list[dict] | None = None,
    clips: tuple[float, float] | None = None,
    targets: Sequence[fx.Node] | None = None,
) -> dict[fx.Node, float]:
    """Relative output error of each layer of ℓ's chain (or of ``targets``) with only ℓ
    quantized (at ``clips``, default the plan's). ``reuse``: see :func:`block_references`."""
    probe = PlanOverride(ctx, plan, only={name}, clips={name: clips} if clips else None,
                         cache=cache)
    watch = candidates(ctx, name) if targets is None else list(targets)
    outs = ctx.runner.probe(envs, seg, set(watch), probe, reuse=reuse,
                            dirty=downstream(ctx.nodes[name]))
    return {n: relative_error(fp_refs[n], outs[n]) for n in watch}


def search_layer(
    ctx: PlanContext,
    plan: Plan,
    name: str,
    seg: int,
    envs: list[dict],
    fp_refs: dict[fx.Node, list[torch.Tensor]],
    w_grid: Sequence[float],
    a_grid: Sequence[float],
    cache: dict | None = None,
    reuse: list[dict] | None = None,
) -> SearchResult:
    """``fp_refs``, ``reuse``: see :func:`block_references`."""
    errs = chain_errors(ctx, plan, name, seg, envs, fp_refs, cache, reuse, clips=(1.0, 1.0))
    target = max(errs, key=errs.get)
    best = (errs[target], 1.0, 1.0)
    probes = 1
    a_values = a_grid if plan.layers[name].spec.a_bits < 16 else (1.0,)
    for wc in w_grid:
        for ac in a_values:
            if (wc, ac) == (1.0, 1.0):
                continue
            e = chain_errors(ctx, plan, name, seg, envs, fp_refs, cache, reuse, (wc, ac),
                             targets=[target])[target]
            probes += 1
            if e < best[0]:
                best = (e, wc, ac)
    return SearchResult(linear_info(target).name, errs[target], best[0], best[1], best[2],
                        probes)
