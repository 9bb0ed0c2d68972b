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
    probes: int  # grid points tried
    calls: int = 0  # calibration calls those probes ran (fewer when trials stop early)


def relative_error(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> float:
    """Σ‖ref − out‖² / Σ‖ref‖² over calibration calls."""
    return sum(_call_errors(ref, out)) / _energy(ref)


def _energy(ref: Sequence[torch.Tensor]) -> float:
    """Σ‖ref‖² (floored), relative_error's denominator."""
    return max(sum(float(r.double().pow(2).sum()) for r in ref), 1e-30)


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
    fp_refs = ctx.runner.probe(envs, seg, watch)
    return fp_refs, ctx.runner.run_segment(seg, envs, commit=False, keep=True)


def probe_layer(
    ctx: PlanContext,
    plan: Plan,
    name: str,
    seg: int,
    envs: list[dict],
    cache: dict | None = None,
    reuse: list[dict] | None = None,
    clips: tuple[float, float] | None = None,
    targets: Sequence[fx.Node] | None = None,
) -> tuple[list[fx.Node], dict[fx.Node, list[torch.Tensor]]]:
    """Outputs of ℓ's chain (or of ``targets``) per call with only ℓ quantized (at
    ``clips``, default the plan's): (the watched nodes in chain order, their outputs)."""
    probe = PlanOverride(ctx, plan, only={name}, clips={name: clips} if clips else None,
                         cache=cache)
    watch = candidates(ctx, name) if targets is None else list(targets)
    outs = ctx.runner.probe(envs, seg, set(watch), probe, reuse=reuse,
                            dirty=downstream(ctx.nodes[name]))
    return watch, outs


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
    watch, outs = probe_layer(ctx, plan, name, seg, envs, cache, reuse, clips, targets)
    return {n: relative_error(fp_refs[n], outs[n]) for n in watch}


def _call_errors(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> list[float]:
    return [float((r.double() - o.double()).pow(2).sum()) for r, o in zip(ref, out, strict=True)]


def _trial_error(ctx: PlanContext, plan: Plan, name: str, seg: int, envs: list[dict],
                 ref: Sequence[torch.Tensor], den: float, target: fx.Node,
                 clips: tuple[float, float], order: Sequence[int], bound: float,
                 cache: dict | None, reuse: list[dict] | None) -> tuple[float | None, int]:
    """``relative_error`` at ``target`` (``den``: ``_energy(ref)``) with ℓ at ``clips``,
    call by call in ``order``; ``None`` as soon as the error already summed exceeds
    ``bound`` (the sum only grows, so the trial cannot win). Returns (error or None,
    calls run)."""
    nums: dict[int, float] = {}
    for i in order:
        _, out = probe_layer(ctx, plan, name, seg, [envs[i]], cache,
                             None if reuse is None else [reuse[i]], clips, [target])
        nums[i] = _call_errors(ref[i:i + 1], out[target])[0]
        if sum(nums.values()) / den > bound * (1 + 1e-9):  # margin: summation order
            return None, len(nums)
    return sum(nums[i] for i in range(len(ref))) / den, len(nums)  # relative_error's order


SEARCHES = ("exact", "exhaustive")


def _local_errors(ctx: PlanContext, plan: Plan, name: str, seg: int, envs: list[dict],
                  clips: Sequence[tuple[float, float]], cache: dict | None,
                  reuse: list[dict]) -> list[float]:
    """ℓ's own output error at each clip pair (ℓ alone, no downstream): a cheap guess at
    which trials win, used only to try likely winners first."""
    node = ctx.nodes[name]
    fp = [r[node] for r in reuse]
    out = []
    for c in clips:
        probe = PlanOverride(ctx, plan, only={name}, clips={name: c}, cache=cache)
        got = ctx.runner.probe(envs, seg, {node}, probe, reuse=reuse, dirty={node})[node]
        out.append(sum(_call_errors(fp, got)))
    return out


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
    search: str = "exact",
) -> SearchResult:
    """The grid point with the least target error (the first in grid order among equals,
    (1, 1) before all). ``search``:
    - "exhaustive": every trial on every calibration call;
    - "exact": the same choice, cheaper (branch and bound): trials run in the order of
      ℓ's own output error (likely winners first), each stops once its error summed over
      the calls so far (the worst calls first) exceeds the best so far.
    ``fp_refs``, ``reuse``: see :func:`block_references`."""
    watch, outs = probe_layer(ctx, plan, name, seg, envs, cache, reuse, (1.0, 1.0))
    errs = {n: relative_error(fp_refs[n], outs[n]) for n in watch}
    target = max(errs, key=errs.get)
    ref = fp_refs[target]
    den = _energy(ref)  # the same for every trial
    base = _call_errors(ref, outs[target])
    order = sorted(range(len(envs)), key=lambda i: -base[i])
    spec = plan.layers[name].spec
    a_values = tuple(a_grid) if spec.a_bits < 16 else (1.0,)
    w_values = tuple(w_grid) if spec.w_format == "int" else (1.0,)  # twin-log: own ranges
    grid = [(w, a) for w in w_values for a in a_values]
    trials = [k for k, c in enumerate(grid) if c != (1.0, 1.0)]
    if search == "exact" and reuse is not None and len(trials) > 1:
        local = _local_errors(ctx, plan, name, seg, envs, [grid[k] for k in trials], cache,
                              reuse)
        trials = [k for _, k in sorted(zip(local, trials, strict=True))]
    best = (errs[target], -1)  # (error, grid index); (1, 1) wins ties
    probes, calls = 1, len(envs)
    for k in trials:
        bound = float("inf") if search == "exhaustive" else best[0]
        e, n = _trial_error(ctx, plan, name, seg, envs, ref, den, target, grid[k], order,
                            bound, cache, reuse)
        probes, calls = probes + 1, calls + n
        if e is not None and (e, k) < best:
            best = (e, k)
    w_clip, a_clip = (1.0, 1.0) if best[1] < 0 else grid[best[1]]
    return SearchResult(linear_info(target).name, errs[target], best[0], w_clip, a_clip,
                        probes, calls)
