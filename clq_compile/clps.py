"""CLPS (cross-layer parameter search): pick each layer's clip ratios by the error they
cause at the most affected downstream layer, not at the layer itself.

For layer ℓ (others in float), the target ℓ_T is the layer of ℓ's cross-layer chain
whose output has the largest relative error with ℓ quantized at clips (1, 1); then
(α_w, α_a) on a grid minimize ℓ_T's output error. Cost per layer: one probe over the
window, then one probe up to ℓ_T per grid point, on ``samples`` calibration calls.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from clq_compile.annotations import linear_info
from clq_compile.overrides import PlanOverride
from clq_compile.plan import Plan
from clq_compile.qlinear import LinearMemo
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
    return sum(call_errors(ref, out)) / _energy(ref)


def call_energies(ref: Sequence[torch.Tensor]) -> list[float]:
    """‖ref‖² per calibration call."""
    return [float(r.double().pow(2).sum()) for r in ref]


def _energy(ref: Sequence[torch.Tensor]) -> float:
    """Σ‖ref‖² (floored), relative_error's denominator."""
    return max(sum(call_energies(ref)), 1e-30)


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
    memo: LinearMemo | None = None,
) -> tuple[list[fx.Node], dict[fx.Node, list[torch.Tensor]]]:
    """Outputs of ℓ's chain (or of ``targets``) per call with only ℓ quantized (at
    ``clips``, default the plan's): (the watched nodes in chain order, their outputs)."""
    probe = PlanOverride(ctx, plan, only={name}, clips={name: clips} if clips else None,
                         cache=cache, memo=memo)
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


def call_errors(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> list[float]:
    """‖ref − out‖² per calibration call."""
    return [float((r.double() - o.double()).pow(2).sum()) for r, o in zip(ref, out, strict=True)]


class _Trial:
    """One grid point's error at the target, summed over the calls run so far."""

    def __init__(self, k: int, clips: tuple[float, float]) -> None:
        self.k, self.clips = k, clips
        self.nums: dict[int, float] = {}

    def bound(self, den: float) -> float:
        """A lower bound of its relative error (errors only add), below the exact sum by a
        margin for the summation order."""
        return sum(self.nums.values()) / den * (1 - 1e-9)

    def error(self, n_calls: int, den: float) -> float:
        return sum(self.nums[i] for i in range(n_calls)) / den  # relative_error's order


SEARCHES = ("exact", "exhaustive")


@dataclass
class _Layer:
    """One layer's search: what each of its probes runs on. ``memo`` keeps the layer's
    transformed inputs and float weights across trials (their inputs are the same
    tensors: only ℓ is quantized and the block's float values are reused)."""

    ctx: PlanContext
    plan: Plan
    name: str
    seg: int
    envs: list[dict]
    cache: dict | None
    reuse: list[dict] | None
    memo: LinearMemo = field(default_factory=LinearMemo)

    def probe(self, clips: tuple[float, float], targets: Sequence[fx.Node] | None = None,
              call: int | None = None) -> tuple[list[fx.Node], dict]:
        """:func:`probe_layer` on every calibration call, or on ``call`` alone."""
        envs, reuse = self.envs, self.reuse
        if call is not None:
            envs, reuse = [envs[call]], None if reuse is None else [reuse[call]]
        return probe_layer(self.ctx, self.plan, self.name, self.seg, envs, self.cache, reuse,
                           clips, targets, self.memo)


def _run_call(layer: _Layer, ref: Sequence[torch.Tensor], target: fx.Node, trial: _Trial,
              i: int) -> None:
    """Run ``trial`` on calibration call ``i``: ℓ at its clips, up to ``target``."""
    _, out = layer.probe(trial.clips, [target], i)
    trial.nums[i] = call_errors(ref[i:i + 1], out[target])[0]


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
    - "exact": the same choice, cheaper (best first): each step runs one more call (the
      worst calls first) of the trial whose error summed so far is least; a partial sum
      bounds its trial's error from below, so the first trial to be least once complete
      is the exhaustive choice, and trials that cannot win stop early.
    ``fp_refs``, ``reuse``: see :func:`block_references`."""
    layer = _Layer(ctx, plan, name, seg, envs, cache, reuse)
    watch, outs = layer.probe((1.0, 1.0))
    errs = {n: relative_error(fp_refs[n], outs[n]) for n in watch}
    target = max(errs, key=errs.get)
    ref = fp_refs[target]
    den = _energy(ref)  # the same for every trial
    base = call_errors(ref, outs[target])
    order = sorted(range(len(envs)), key=lambda i: -base[i])
    spec = plan.layers[name].spec
    a_values = tuple(a_grid) if spec.a_bits < 16 else (1.0,)
    w_values = tuple(w_grid) if spec.w_format == "int" else (1.0,)  # twin-log: own ranges
    grid = [(w, a) for w in w_values for a in a_values]
    trials = [_Trial(k, c) for k, c in enumerate(grid) if c != (1.0, 1.0)]
    if search == "exhaustive":
        for t in trials:
            for i in order:
                _run_call(layer, ref, target, t, i)
        best = min([(errs[target], -1)] + [(t.error(len(envs), den), t.k) for t in trials])
    elif search == "exact":
        best = _best_first(layer, ref, den, target, trials, (errs[target], -1), order)
    else:
        raise ValueError(f"search {search!r} not in {SEARCHES}")
    w_clip, a_clip = (1.0, 1.0) if best[1] < 0 else grid[best[1]]
    calls = len(envs) + sum(len(t.nums) for t in trials)  # the (1, 1) probe's, then trials'
    return SearchResult(linear_info(target).name, errs[target], best[0], w_clip, a_clip,
                        1 + len(trials), calls)


def _best_first(layer: _Layer, ref: Sequence[torch.Tensor], den: float, target: fx.Node,
                trials: list[_Trial], base: tuple[float, int],
                order: Sequence[int]) -> tuple[float, int]:
    """The least (error, grid index), each trial's calls left in it: trials are
    keyed by (lower bound, grid index), complete ones by (error, grid index), (1, 1)
    (``base``, complete) by index −1; the first complete key to come out is the least of
    all exact keys, since no other trial's error is below its bound."""
    n = len(layer.envs)
    heap = [base] + [(0.0, t.k) for t in trials]
    by_k = {t.k: t for t in trials}
    heapq.heapify(heap)
    while True:
        key = heapq.heappop(heap)
        t = by_k.get(key[1])
        if t is None or len(t.nums) == n:
            return key
        _run_call(layer, ref, target, t, order[len(t.nums)])
        heapq.heappush(heap, (t.error(n, den) if len(t.nums) == n else t.bound(den), t.k))
