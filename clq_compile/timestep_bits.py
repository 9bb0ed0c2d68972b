"""AdaTSQ's timestep-aware activation precision (option ``timestep_bits``): a policy
that, per calibrated timestep and per block, runs the block's 4-bit-activation layers at
8-bit activations instead, within an average bit-width.

Our reading of the paper (which gives neither its beam width nor its candidates):
- the unit of time is each distinct timestep value of the calibration set, found in the
  graph input that feeds the sinusoidal timestep embedding (:func:`find_timestep_input`);
- a path's score is the end-to-end error against the FP model, summed over timesteps: the
  mean relative squared output error of the samples at each one. Calibration calls are
  independent (each one's input is the FP trajectory's), so the errors add up;
- candidates at a timestep are the prefixes of a greedy chain: blocks ordered by how much
  8-bit activations in that block alone lower that timestep's error, the first k promoted
  (k = 0 … blocks), each prefix measured end to end with the whole model quantized;
- the beam runs over timesteps in sampling order (high t first) and keeps the Pareto
  front in (bits spent, error) among paths within the average; it is exact (a knapsack)
  while the front has at most ``BEAM`` paths, else it keeps ``BEAM`` spread along it.
Bits are averaged over the calibrated timesteps (each alike) and over the 4-bit-activation
layers' weights (layers outside blocks stay at 4 bits and count too).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from clq_compile.errors import CalibrationError, ConfigError
from clq_compile.overrides import PlanOverride
from clq_compile.plan import LayerPlan, Plan, TimestepPolicy, a8_eligible, timestep_rows
from clq_compile.runner import PlanContext

log = logging.getLogger(__name__)

BEAM = 256
_TRIG = {torch.ops.aten.sin.default, torch.ops.aten.cos.default}
_HOPS = 12  # timestep -> (cast, reshape, unsqueeze, mul by frequencies, ...) -> sin/cos


def _reaches_sinusoid(node: fx.Node) -> bool:
    seen, frontier = {node}, [node]
    for _ in range(_HOPS):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        if any(u.target in _TRIG for u in frontier):
            return True
        seen.update(frontier)
    return False


def _per_sample(value: Any) -> bool:
    """One value per call or per sample: a 0-d or 1-d tensor (a batch of timesteps)."""
    return isinstance(value, torch.Tensor) and value.dim() <= 1 and value.numel() >= 1


def find_timestep_input(gm: fx.GraphModule, flat_calib: list[list[Any]]) -> fx.Node:
    """The graph input holding the diffusion timestep: one value per sample (or per call)
    that reaches a sinusoidal embedding (sin/cos) and varies across the calibration set
    (which tells it from rotary positions and constant conditions such as guidance)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sinusoid = [n for n in placeholders if _reaches_sinusoid(n)]
    found = []
    for p in sinusoid:
        i = placeholders.index(p)
        values = [flat[i] for flat in flat_calib]
        if not all(_per_sample(v) for v in values):
            continue
        distinct = torch.cat([v.detach().reshape(-1).float().cpu() for v in values]).unique()
        if distinct.numel() > 1:
            found.append(p)
    if len(found) != 1:
        raise ConfigError(
            "option timestep_bits needs the timestep as a graph input: one value per sample "
            "that reaches a sinusoidal embedding (sin/cos) and varies across the calibration "
            f"calls; found {[p.name for p in found] or 'none'} (inputs reaching sin/cos: "
            f"{[p.name for p in sinusoid] or 'none'}). Calibrate on calls at two or more "
            "timesteps")
    return found[0]


def pareto_beam(options: list[list[tuple[float, float]]], allowed: float,
                beam: int = BEAM) -> list[int]:
    """``options[u][k]`` = (cost, error) of choice k at step u (choice 0 costs nothing);
    the choice per step with the least total error whose total cost is at most
    ``allowed``, by a beam over the steps that keeps the Pareto front in (cost, error)."""
    states: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for opts in options:
        grown = sorted(((c + oc, e + oe, path + (k,)) for c, e, path in states
                        for k, (oc, oe) in enumerate(opts) if c + oc <= allowed),
                       key=lambda s: (s[0], s[1]))
        front: list[tuple[float, float, tuple[int, ...]]] = []
        for s in grown:  # by cost; a path is kept only if it lowers the error
            if not front or s[1] < front[-1][1]:
                front.append(s)
        if len(front) > beam:
            keep = torch.linspace(0, len(front) - 1, beam).round().long().unique().tolist()
            front = [front[i] for i in keep]
        states = front
    return list(min(states, key=lambda s: (s[1], s[0]))[2])


def _sample_errors(q: Any, ref: Any, n: int) -> torch.Tensor:
    """(n,) relative squared error of each sample's outputs (n = 1: the whole call)."""
    noise = torch.zeros(n, dtype=torch.float64)
    signal = torch.zeros(n, dtype=torch.float64)
    for a, b in zip(pytree.tree_leaves(q), pytree.tree_leaves(ref), strict=True):
        if not isinstance(b, torch.Tensor) or not b.is_floating_point():
            continue
        if n > 1 and (b.dim() == 0 or b.shape[0] != n):
            raise CalibrationError(
                f"timestep_bits: an output of shape {tuple(b.shape)} has no batch dim of "
                f"{n} samples to attribute its error to each sample's timestep")
        a, b = a.double().reshape(n, -1), b.double().reshape(n, -1)
        noise += (a - b).pow(2).sum(1).cpu()
        signal += b.pow(2).sum(1).cpu()
    return noise / signal.clamp_min(1e-300)


class _Runs:
    """End-to-end runs of the quantized model under trial policies, scored per timestep."""

    def __init__(self, ctx: PlanContext, plan: Plan, node: fx.Node) -> None:
        self.ctx, self.plan, self.name = ctx, plan, node.name
        self.t = [ctx.calib_input(node.name, i).detach().reshape(-1).float().cpu()
                  for i in range(len(ctx.flat_calib))]
        self.times = torch.cat(self.t).unique().flip(0)  # sampling order: high t first
        self.count = 0
        self.ref = self._outputs(None)

    def _outputs(self, plan: Plan | None) -> list[Any]:
        runner = self.ctx.runner
        envs = runner.start(self.ctx.flat_calib)
        for seg in runner.order:  # one override per block, as CBC's: its weights only
            runner.run_segment(seg, envs, None if plan is None else PlanOverride(self.ctx, plan))
        return runner.outputs(envs)

    def errors(self, blocks: list[int], a8: torch.Tensor) -> torch.Tensor:
        """(T,) mean relative output error of the samples at each timestep."""
        policy = TimestepPolicy(self.name, self.times, blocks, a8)
        outs = self._outputs(dataclasses.replace(self.plan, timesteps=policy))
        self.count += 1
        total = torch.zeros(len(self.times), dtype=torch.float64)
        seen = torch.zeros(len(self.times), dtype=torch.float64)
        eye = torch.eye(len(self.times), dtype=torch.bool)
        for t, q, ref in zip(self.t, outs, self.ref, strict=True):
            at = timestep_rows(t, self.times, eye).double()  # (n, T) one-hot
            total += at.T @ _sample_errors(q, ref, len(t))
            seen += at.sum(0)
        return total / seen


def _eligible(plan: Plan) -> tuple[list[LayerPlan], dict[int, int], int]:
    """The 4-bit-activation layers, their weights per block, and their total weights."""
    layers = [lp for lp in plan.quantized_layers() if a8_eligible(lp)]
    blocks = sorted({lp.block for lp in layers if lp.block is not None})
    size = {b: sum(lp.in_features * lp.out_features for lp in layers if lp.block == b)
            for b in blocks}
    return layers, size, sum(lp.in_features * lp.out_features for lp in layers)


def average_bits(plan: Plan, t: torch.Tensor) -> float:
    """The policy's average activation bits over the timesteps ``t`` (each alike; e.g. a
    sampler's), weighted by the 4-bit-activation layers' weights."""
    _, size, total = _eligible(plan)
    policy = plan.timesteps
    rows = policy.rows(t.float()).double()  # (steps, blocks)
    per_block = torch.tensor([size[b] for b in policy.blocks], dtype=torch.float64)
    return 4.0 + 4.0 * float((rows @ per_block).mean()) / total


def assign_timestep_bits(ctx: PlanContext, plan: Plan, target: float) -> None:
    """Set ``plan.timesteps``: the per-timestep, per-block policy with the least summed
    end-to-end error whose average activation bits are at most ``target``."""
    t0 = time.perf_counter()
    node = find_timestep_input(ctx.gm, ctx.flat_calib)
    layers, size, total = _eligible(plan)
    blocks = sorted(size)
    if not blocks:
        log.warning("timestep_bits=%g: no block has 4-bit-activation layers; every layer "
                    "stays at its planned bits", target)
        plan.meta["timestep_bits"] = {"target": target, "bits": None, "blocks": []}
        return
    runs = _Runs(ctx, plan, node)
    n_t, n_b = len(runs.times), len(blocks)
    bar = tqdm(total=2 * n_b, desc="timestep bits", leave=False, disable=n_b < 4)

    def run(a8: torch.Tensor) -> torch.Tensor:
        err = runs.errors(blocks, a8)
        bar.update()
        return err

    base = run(torch.zeros(n_t, n_b, dtype=torch.bool))
    single = torch.stack([run(torch.eye(n_b, dtype=torch.bool)[j].expand(n_t, n_b))
                          for j in range(n_b)], dim=1)  # (T, blocks)
    order = single.argsort(dim=1, stable=True)  # per timestep, the most helpful block first
    chain = [base, single.gather(1, order[:, :1])[:, 0]]  # k = 1 was measured alone
    for k in range(2, n_b + 1):
        chain.append(run(torch.zeros(n_t, n_b, dtype=torch.bool).scatter_(
            1, order[:, :k], True)))
    bar.close()
    cost = [[sum(size[blocks[j]] for j in order[u, :k].tolist()) for k in range(n_b + 1)]
            for u in range(n_t)]
    options = [[(float(cost[u][k]), float(chain[k][u])) for k in range(n_b + 1)]
               for u in range(n_t)]
    allowed = (target - 4.0) / 4.0 * n_t * total
    picks = pareto_beam(options, allowed)
    a8 = torch.zeros(n_t, n_b, dtype=torch.bool)
    for u, k in enumerate(picks):
        a8[u, order[u, :k]] = True
    plan.timesteps = TimestepPolicy(node.name, runs.times, blocks, a8)
    bits = average_bits(plan, runs.times)
    error = sum(options[u][k][1] for u, k in enumerate(picks))
    for lp in layers:
        col = plan.timesteps.column(lp)
        if col is None:
            lp.notes.append("timestep_bits: 4-bit activations at every timestep (outside "
                            "the blocks the policy covers)")
            continue
        at = [f"{float(t):g}" for t in runs.times[a8[:, col]]]
        lp.notes.append(f"timestep_bits: 8-bit activations at {len(at)} of {n_t} "
                        f"calibrated timesteps ({', '.join(at) or 'none'})")
    plan.meta["timestep_bits"] = {
        "target": target, "bits": round(bits, 4), "input": node.name,
        "times": runs.times.tolist(), "blocks": blocks, "a8": a8.int().tolist(),
        "error": error, "error_a4": float(base.sum()), "error_a8": float(chain[-1].sum()),
        "runs": runs.count, "seconds": round(time.perf_counter() - t0, 3)}
    log.info("timestep_bits %.3g: %.3f average activation bits over %d timesteps x %d "
             "blocks; summed relative error %.4g (all 4-bit %.4g, all 8-bit %.4g)",
             target, bits, n_t, n_b, error, float(base.sum()), float(chain[-1].sum()))
