"""Runner overrides: evaluate planned linears quantized while the rest runs in float.

One class serves CBC (advance the quantized prefix), CLPS probes (only one layer
quantized, trial clips), DAC and per-layer measurement, so all of them compute exactly
what the rewritten graph computes (the plan's DAC biases included).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from clq_compile.annotations import after_attention, linear_info
from clq_compile.plan import LayerPlan, Plan
from clq_compile.qlinear import (
    LinearMemo,
    PackedWeight,
    apply_transform,
    planned_weight,
    quantized_linear,
)
from clq_compile.runner import PlanContext


class PlanOverride:
    """Callable for :meth:`GraphRunner.run_segment`/``probe``.

    ``only``: restrict to these layer names. ``clips``: per-layer (w_clip, a_clip) trials
    that win over the plan. ``measure``: accumulate (signal, noise) energy per layer
    against the float linear on the same input. ``memo``: pieces of the quantized
    linears kept across calls that share their tensors (a clip search's trials).
    """

    def __init__(
        self,
        ctx: PlanContext,
        plan: Plan,
        only: set[str] | None = None,
        clips: dict[str, tuple[float, float]] | None = None,
        measure: dict[str, list[float]] | None = None,
        cache: dict[tuple, PackedWeight] | None = None,
        memo: LinearMemo | None = None,
    ) -> None:
        self.ctx, self.plan, self.only = ctx, plan, only
        self.clips = clips or {}
        self.measure = measure
        self.cache = {} if cache is None else cache
        self.memo = memo
        self._rows: dict[int, torch.Tensor] = {}  # call -> its timestep policy rows

    def a8_rows(self, lp: LayerPlan, i: int) -> torch.Tensor | None:
        """The samples of calibration call ``i`` that the plan's timestep policy runs at
        8-bit activations in ``lp`` (None: no policy for it). Every runner pass starts
        from the whole calibration set, so ``i`` indexes ``ctx.flat_calib``."""
        ts = self.plan.timesteps
        col = None if ts is None else ts.column(lp)
        if col is None:
            return None
        if i not in self._rows:
            self._rows[i] = ts.rows(self.ctx.calib_input(ts.input, i))
        return self._rows[i][:, col]

    def packed(self, name: str, w_clip: float) -> PackedWeight:
        lp = self.plan.layers[name]
        solved = self.plan.weights.get(name)
        key = (name, w_clip, id(self.plan.transform_of(lp)), id(solved))
        if key not in self.cache:
            self.cache[key] = planned_weight(self.plan, lp, self.ctx.weight(name), w_clip)
        return self.cache[key]

    def __call__(self, node: fx.Node, args: tuple, kwargs: dict, i: int) -> Any:
        site = after_attention(node)
        if site is not None and site in self.plan.dac:
            return add_correction(node.target(*args, **kwargs), self.plan.dac[site])
        info = linear_info(node)
        if info is None or (self.only is not None and info.name not in self.only):
            return NotImplemented
        lp = self.plan.layers.get(info.name)
        if lp is None or not lp.quantized:
            return NotImplemented
        w_clip, a_clip = self.clips.get(lp.name, (lp.w_clip, lp.a_clip))
        x = args[0]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        out = quantized_linear(apply_transform(x, self.plan.transform_of(lp), self.memo),
                               self.packed(lp.name, w_clip), bias, lp, a_clip,
                               self.a8_rows(lp, i), self.memo)
        if self.measure is not None:
            ref = torch.nn.functional.linear(x, args[1], bias).double()
            s = self.measure.setdefault(lp.name, [0.0, 0.0])
            s[0] += float(ref.pow(2).sum())
            s[1] += float((ref - out.double()).pow(2).sum())
        return out


def add_correction(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A norm's output plus its DAC bias, in the output's dtype (as the rewrite adds it)."""
    return y + bias.to(y.device, y.dtype)
