"""Can CLPS's search be cut far enough for issue 15's 10-minute PixArt-α plan without
leaving its contract (the exhaustive choice, or within 0.1 dB of its target error)?

For every searched layer this records the whole table: each clip pair's squared error at
every layer of the chain, and at the layer's own output, on every calibration call. The
exact choice follows from the table (checked against ``clps.search_layer``); each
shortcut then picks from the same table with less of it, and is scored by

- its worst loss against the exact choice, in dB of target error, over all layers;
- the probe work it needs relative to the exact (best-first) search: calls weighted by
  the linears they run (a window call runs the whole chain, a trial call runs up to its
  target). A cost model from counted calls, not a timing.

    python benchmarks/clps_shortcuts.py              # tiny models, shapes DiT, 2x4 PixArt
"""

from __future__ import annotations

import argparse
import copy
import datetime
import heapq
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from common import cpu_info
from tabulate import tabulate

from clq_compile.annotations import linear_info
from clq_compile.api import capture_calls
from clq_compile.build import analyze, resolve
from clq_compile.calibration import flatten_calls
from clq_compile.cbc import calibrate_blockwise
from clq_compile.clps import (
    block_references,
    call_energies,
    call_errors,
    candidates,
    downstream,
    probe_layer,
    search_layer,
)
from clq_compile.recipes.clq import plan_clq
from clq_compile.runner import GraphRunner, PlanContext
from clq_compile.testing import OUTLIER_SITES, TINY_MODELS, plant_outliers

RESULTS = Path(__file__).parent / "results"
SMALL_GRID = dict(w_grid=(1.0, 0.9, 0.8), a_grid=(1.0, 0.9, 0.8, 0.7))  # tests' grid


@dataclass
class Table:
    """One layer's errors: ``nums[k][c][i]`` Σ(ref − out)² at chain layer ``c`` for grid
    point ``k`` on call ``i``, ``dens[c][i]`` Σref²; ``own`` / ``own_den`` the same at the
    layer's own output (one linear, cheap)."""

    layer: str
    grid: list[tuple[float, float]]
    chain: list[str]
    nums: list[list[list[float]]]
    dens: list[list[float]]
    own: list[list[float]]
    own_den: list[float]

    @property
    def calls(self) -> int:
        return len(self.own_den)

    @property
    def base(self) -> int:
        return self.grid.index((1.0, 1.0))

    def err(self, k: int, c: int, calls: list[int] | None = None) -> float:
        """clps.relative_error's value (the same sums in the same order)."""
        calls = range(self.calls) if calls is None else calls
        return sum(self.nums[k][c][i] for i in calls) / max(sum(self.dens[c][i] for i in calls),
                                                           1e-30)

    def own_err(self, k: int) -> float:
        return sum(self.own[k]) / max(sum(self.own_den), 1e-30)

    def target(self, calls: list[int] | None = None) -> int:
        errs = [self.err(self.base, c, calls) for c in range(len(self.chain))]
        return errs.index(max(errs))  # the first among equals, as search_layer's max()

    def choice(self, t: int, ks, calls: list[int] | None = None) -> int:
        """search_layer's rule: the least error, (1, 1) before all, then grid order."""
        best = min([(self.err(self.base, t, calls), -1)] +
                   [(self.err(k, t, calls), k) for k in ks if k != self.base])
        return self.base if best[1] < 0 else best[1]

    def best_first_calls(self, t: int, ks, calls: list[int] | None = None) -> int:
        """Trial calls the exact search runs over trials ``ks`` (clps._best_first) on
        ``calls`` (default all)."""
        calls = list(range(self.calls)) if calls is None else calls
        n, den = len(calls), max(sum(self.dens[t][i] for i in calls), 1e-30)
        order = sorted(calls, key=lambda i: -self.nums[self.base][t][i])
        done = {k: 0 for k in ks if k != self.base}
        heap = [(self.err(self.base, t, calls), -1)] + [(0.0, k) for k in done]
        heapq.heapify(heap)
        runs = 0
        while True:
            key = heapq.heappop(heap)
            if key[1] < 0 or done[key[1]] == n:
                return runs
            k = key[1]
            done[k] += 1
            runs += 1
            if done[k] == n:
                heapq.heappush(heap, (self.err(k, t, calls), k))
            else:
                part = sum(self.nums[k][t][order[j]] for j in range(done[k])) / den
                heapq.heappush(heap, (part * (1 - 1e-9), k))

    # the cost model: linears a call runs (ℓ itself, then the chain up to where it stops)
    def window_cost(self) -> int:
        return 1 + len(self.chain)

    def trial_cost(self, t: int) -> int:
        return 2 + t


# A shortcut: table -> (the grid point it chooses, its cost in linear-weighted calls).
Shortcut = Callable[[Table], tuple[int, float]]


def exact(tb: Table) -> tuple[int, float]:
    t = tb.target()
    grid = range(len(tb.grid))
    cost = tb.calls * tb.window_cost() + tb.best_first_calls(t, grid) * tb.trial_cost(t)
    return tb.choice(t, grid), cost


def target_on_first_call(tb: Table) -> tuple[int, float]:
    """Find the target on call 0 alone (one window call; (1, 1) on the other calls up to
    it), then the exact trials."""
    t = tb.target([0])
    grid = range(len(tb.grid))
    cost = tb.window_cost() + (tb.calls - 1 + tb.best_first_calls(t, grid)) * tb.trial_cost(t)
    return tb.choice(t, grid), cost


def first_chain_layer(tb: Table) -> tuple[int, float]:
    """No target search: the chain's first layer is the target."""
    grid = range(len(tb.grid))
    return tb.choice(0, grid), (tb.calls + tb.best_first_calls(0, grid)) * tb.trial_cost(0)


def own_top(k: int) -> Shortcut:
    def pick(tb: Table) -> tuple[int, float]:
        """Rank the grid by ℓ's own output error; exact trials on the best ``k``."""
        t = tb.target()
        ks = sorted(range(len(tb.grid)), key=tb.own_err)[:k]
        cost = tb.calls * (tb.window_cost() + len(tb.grid)) + \
            tb.best_first_calls(t, ks) * tb.trial_cost(t)
        return tb.choice(t, ks), cost
    return pick


def worst_call_top(k: int) -> Shortcut:
    def pick(tb: Table) -> tuple[int, float]:
        """Every trial on the worst call, then the exact trials on the best ``k``."""
        t = tb.target()
        worst = max(range(tb.calls), key=lambda i: tb.nums[tb.base][t][i])
        ks = sorted(range(len(tb.grid)), key=lambda j: tb.err(j, t, [worst]))[:k]
        cost = tb.calls * tb.window_cost() + \
            (len(tb.grid) - 1 + tb.best_first_calls(t, ks)) * tb.trial_cost(t)
        return tb.choice(t, ks), cost
    return pick


def fewer_calls(m: int) -> Shortcut:
    def pick(tb: Table) -> tuple[int, float]:
        """``clps_samples`` = m: target and trials on the first m calls only."""
        calls = list(range(min(m, tb.calls)))
        t, grid = tb.target(calls), range(len(tb.grid))
        cost = len(calls) * tb.window_cost() + \
            tb.best_first_calls(t, grid, calls) * tb.trial_cost(t)
        return tb.choice(t, grid, calls), cost
    return pick


def descent(tb: Table) -> tuple[int, float]:
    """Coordinate descent from (1, 1): the best a-clip at the current w-clip, then the best
    w-clip at that a-clip, until neither moves; every visited point on every call."""
    t = tb.target()
    ws = sorted({w for w, _ in tb.grid}, reverse=True)
    As = sorted({a for _, a in tb.grid}, reverse=True)
    seen: set[int] = set()

    def best(points):
        ks = [tb.grid.index(p) for p in points]
        seen.update(ks)
        return tb.grid[tb.choice(t, ks)] if tb.base in ks else \
            tb.grid[min(ks, key=lambda k: (tb.err(k, t), k))]

    cur = (1.0, 1.0)
    for _ in range(len(tb.grid)):  # each move lowers the error; bounded all the same
        nxt = best([(cur[0], a) for a in As])
        nxt = best([(w, nxt[1]) for w in ws])
        if nxt == cur:
            break
        cur = nxt
    cost = tb.calls * tb.window_cost() + (len(seen) - 1) * tb.calls * tb.trial_cost(t)
    return tb.grid.index(cur), cost


SHORTCUTS: dict[str, Shortcut] = {
    "exact (best first)": exact,
    "target on call 0": target_on_first_call,
    "target = first chain layer": first_chain_layer,
    **{f"own-error top {k}": own_top(k) for k in (3, 5, 8)},
    **{f"worst-call top {k}": worst_call_top(k) for k in (2, 3, 5)},
    "coordinate descent": descent,
    "2 calls (clps_samples=2)": fewer_calls(2),
}


def tables(model: torch.nn.Module, calib: list, **options) -> list[Table]:
    """Every searched layer's table, on the clq plan's own transforms and block inputs
    (``cbc="none"``: each block on float inputs, so the tables are independent of the
    clips chosen before)."""
    graphs, calls = capture_calls(model, calib)
    config, spec = resolve("clq", "w4a4", cbc="none", **options)
    gm = analyze(copy.deepcopy(graphs[0].gm), spec, config)
    ctx = PlanContext(gm, spec, flatten_calls(gm, calls), GraphRunner(gm))
    plan = plan_clq(ctx, replace(config, clps=False))  # OBS's transforms, clips (1, 1)
    cache: dict = {}
    out: list[Table] = []

    def collect(block) -> None:
        envs = block.envs[: config.clps_samples]
        fp_refs, reuse = block_references(ctx, block.seg, block.layers, envs)
        for name in block.layers:
            out.append(_table(ctx, plan, name, block.seg, envs, fp_refs, reuse, cache, config))

    calibrate_blockwise(ctx, plan, collect, prefix="none", desc="tables")
    return out


def _table(ctx, plan, name, seg, envs, fp_refs, reuse, cache, config) -> Table:
    node = ctx.nodes[name]
    own_ref = ctx.runner.probe(envs, seg, {node}, reuse=reuse, dirty=downstream(node))[node]
    spec = plan.layers[name].spec
    a_values = config.a_grid if spec.a_bits < 16 else (1.0,)
    w_values = config.w_grid if spec.w_format == "int" else (1.0,)
    grid = [(w, a) for w in w_values for a in a_values]
    chain = candidates(ctx, name)
    nums, own = [], []
    for clips in grid:
        _, outs = probe_layer(ctx, plan, name, seg, envs, cache, reuse, clips,
                              list(dict.fromkeys([*chain, node])))
        nums.append([call_errors(fp_refs[c], outs[c]) for c in chain])
        own.append(call_errors(own_ref, outs[node]))
    table = Table(name, grid, [linear_info(c).name for c in chain], nums,
                  [call_energies(fp_refs[c]) for c in chain], own,
                  call_energies(own_ref))
    found = search_layer(ctx, plan, name, seg, envs, fp_refs, config.w_grid, config.a_grid,
                         cache, reuse)
    t, k = table.target(), exact(table)[0]
    calls = table.calls + table.best_first_calls(t, range(len(grid)))
    if (found.target, (found.w_clip, found.a_clip), found.calls) != (table.chain[t], grid[k],
                                                                     calls):
        raise AssertionError(f"{name}: the table's exact search is not search_layer's")
    return table


def score(tabs: list[Table]) -> dict[str, dict]:
    rows = {}
    exact_runs = [exact(tb) for tb in tabs]  # (choice, cost): what each shortcut is scored by
    exact_cost = sum(c for _, c in exact_runs)
    for name, pick in SHORTCUTS.items():
        worst, differ, cost = 0.0, 0, 0.0
        for tb, (k_exact, _) in zip(tabs, exact_runs, strict=True):
            t = tb.target()
            k, c = pick(tb)
            loss = 10 * math.log10(max(tb.err(k, t), 1e-30) / max(tb.err(k_exact, t), 1e-30))
            worst, differ, cost = max(worst, loss), differ + (k != k_exact), cost + c
        rows[name] = dict(worst_db=round(worst, 3), layers_differ=differ,
                          cost_vs_exact=round(cost / exact_cost, 3))
    return rows


def models(with_pixart: bool):
    for arch in sorted(TINY_MODELS):
        model, inputs = TINY_MODELS[arch]()
        yield f"{arch} tiny, default grid", model, [inputs(i) for i in range(3)], {}
        model, inputs = TINY_MODELS[arch]()
        plant_outliers(model, OUTLIER_SITES[arch], 30.0)
        yield f"{arch} tiny, outliers, 3x4 grid", model, [inputs(i) for i in range(3)], SMALL_GRID
    from clq_compile.eval import calibration_calls, load_shapes_dit

    torch.manual_seed(0)
    model, encoder = load_shapes_dit()
    calib = calibration_calls(model, encoder, n_prompts=2, steps=8, at_steps=[0, 4, 7])
    model.transformer_blocks = model.transformer_blocks[:2]
    yield "shapes DiT, 2 blocks", model, calib, dict(clps_samples=3)
    if with_pixart:
        from pixart_like import pixart_like

        model, calib = pixart_like(2, 4, 16, calls=4)
        yield "PixArt-like 2x288", model, calib, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-pixart", action="store_true", help="skip the 2-block PixArt shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="clps_shortcuts.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    per_model, all_tabs = {}, []
    for label, model, calib, options in models(not args.no_pixart):
        tabs = tables(model, calib, **options)
        all_tabs.append(tabs)
        per_model[label] = dict(layers=len(tabs), shortcuts=score(tabs))
        print(label, flush=True)
    summary = []
    for name in SHORTCUTS:
        rows = [m["shortcuts"][name] for m in per_model.values()]
        summary.append(dict(shortcut=name,
                            worst_db=max(r["worst_db"] for r in rows),
                            models_within_0_1_db=sum(r["worst_db"] <= 0.1 for r in rows),
                            cost_vs_exact_min=min(r["cost_vs_exact"] for r in rows),
                            cost_vs_exact_max=max(r["cost_vs_exact"] for r in rows)))
    print(tabulate(summary, headers="keys"))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / args.out
    path.write_text(json.dumps(dict(
        summary=summary, models=per_model, threads=args.threads, cpu=cpu_info(),
        torch=torch.__version__, date=datetime.date.today().isoformat()), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
