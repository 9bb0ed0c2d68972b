"""AdaTSQ's Fisher-guided Hessian weights (arXiv 2602.09883), option ``hessian="fisher"``:
GPTQ's Hessian of layer l becomes Σ_t α_{t,l}·X_{t,l}ᵀX_{t,l} instead of the plain sum, so
the calibration calls (timesteps) where l's output matters most to the model's output
weigh most in its rounding.

The reading we implement (the paper gives the form, not the estimator):
- α_{t,l} is the mean squared gradient of the model output with respect to l's output on
  call t: the trace of the Fisher information of a unit-variance Gaussian output model,
  estimated with one Gaussian probe v (∂(v·f)/∂y has the Fisher's expected square; no
  labels needed). Every call uses the same v stream (common random numbers), so the
  ratios between calls are not noise of the draw.
- one calibration call is one recorded timestep (the harness records a sampler step per
  call), so α is kept per call; it is normalized to mean 1 over the calls per layer, which
  leaves GPTQ's dampening (a fraction of the mean diagonal) on the same scale.
- the gradients are those of the full-precision model (the sensitivity of the network,
  not of its quantized copy); the Hessians they weight are still collected on the
  quantized prefix (CBC), as for the uniform sum.
One call's forward is held for its backward: the whole model's activations and the
weights autograd keeps, so a model planned from a checkpoint is refused
(``build.build_plan``).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from clq_compile.errors import ConfigError
from clq_compile.plan import Plan
from clq_compile.runner import PlanContext, recorder

log = logging.getLogger(__name__)

HESSIANS = ("uniform", "fisher")


def _with_grad(value):
    return (value.detach().requires_grad_() if isinstance(value, torch.Tensor)
            and value.is_floating_point() else value)


def _accumulate(out: torch.Tensor, row: int, col: int):
    def hook(g: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
        out[row, col] += g.double().pow(2).mean()
    return hook


def squared_output_gradients(ctx: PlanContext, names: list[str], seed: int = 0) -> torch.Tensor:
    """(len(names), calls) float64: mean over elements of (∂(v·f)/∂y_l)² per layer and call,
    with v ~ N(0, 1) drawn from ``seed`` for every call (see the module docstring)."""
    runner = ctx.runner
    nodes = [ctx.nodes[n] for n in names]
    out = torch.zeros(len(names), len(ctx.flat_calib), dtype=torch.float64)
    for c, flat in enumerate(tqdm(ctx.flat_calib, desc="fisher", leave=False,
                                  disable=len(ctx.flat_calib) < 4)):
        envs = runner.start([[_with_grad(v) for v in flat]])
        values: dict[fx.Node, list] = {n: [] for n in nodes}
        for seg in runner.order:
            runner.run_segment(seg, envs, recorder(values), grad=True)
        for row, node in enumerate(nodes):
            y = values[node][0]
            if y.requires_grad:
                y.register_hook(_accumulate(out, row, c))
        leaves = [t for t in pytree.tree_leaves(runner.outputs(envs)[0])
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        if not leaves:
            raise ConfigError("option hessian='fisher' needs the model's output to depend on "
                              "its floating-point inputs; this graph's does not")
        gen = torch.Generator().manual_seed(seed)
        loss = sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in leaves)
        loss.backward()
    return out


def fisher_weights(ctx: PlanContext, plan: Plan) -> dict[str, torch.Tensor]:
    """Layer name -> α per calibration call (float64, mean 1) for every quantized layer;
    a note on each layer says the spread."""
    t0 = time.perf_counter()
    names = [lp.name for lp in plan.quantized_layers()]
    sq = squared_output_gradients(ctx, names)
    mean = sq.mean(dim=1, keepdim=True)
    alpha = torch.where(mean > 0, sq / mean.clamp_min(1e-300), torch.ones_like(sq))
    weights = dict(zip(names, alpha, strict=True))
    for name, a in weights.items():
        plan.layers[name].notes.append(
            f"fisher α over {a.numel()} calls: {float(a.min()):.2f}–{float(a.max()):.2f}")
    plan.meta["fisher_s"] = round(time.perf_counter() - t0, 3)
    log.info("fisher: %d layers x %d calls in %.1f s", len(names), sq.shape[1],
             plan.meta["fisher_s"])
    return weights
