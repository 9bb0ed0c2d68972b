"""``rotation="adaptive"`` (LRQ-DiT's adaptive rotation scheme): per shared input, OBS's
block Hadamard or the outlier-aware (DuQuant) rotation, whichever serves its linears
better.

LRQ-DiT says the choice follows "activation fluctuation" without a formula, and its
released scripts pick from a fixed list of layers. Our reading is the measurement that
statistic stands for: both candidates share OBS's permutation, and the one whose
quantized linears give the higher output SQNR on the calibration tokens wins (ties keep
the Hadamard). The channel peak/median ratio, the fluctuation the paper means, is
reported beside it so ``inspect`` shows why.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from clq_compile.cbc import GroupStats
from clq_compile.passes.obs import obs_transform, outlier_transform
from clq_compile.plan import Plan, TransformPlan
from clq_compile.qlinear import apply_transform, pack_weight, quantized_linear, sqnr_db
from clq_compile.runner import PlanContext

log = logging.getLogger(__name__)


def group_sqnrs(ctx: PlanContext, plan: Plan, group: int, tokens: torch.Tensor,
                candidates: Sequence[TransformPlan]) -> list[float]:
    """Output SQNR (dB) of the group's linears under each candidate transform, weights and
    activations quantized as their plans say (round to nearest, clips 1), over ``tokens``
    (T, K), all layers pooled. Each weight is read and its reference computed once."""
    signal = 0.0
    noise = [0.0] * len(candidates)
    moved = [apply_transform(tokens, tp) for tp in candidates]
    for lp in plan.quantized_layers():
        if lp.group != group:
            continue
        w = ctx.weight(lp.name).detach().float()
        ref = (tokens @ w.T).double()
        signal += float(ref.pow(2).sum())
        for i, (tp, xt) in enumerate(zip(candidates, moved, strict=True)):
            out = quantized_linear(xt, pack_weight(w, lp, tp, w_clip=1.0), None, lp,
                                   a_clip=1.0)
            noise[i] += float((ref - out.double()).pow(2).sum())
    return [sqnr_db(signal, n) for n in noise]


def choose_rotation(ctx: PlanContext, plan: Plan, group: int, st: GroupStats,
                    scores: torch.Tensor, order: str, block: int, steps: int) -> TransformPlan:
    """The better of the two rotations for one shared input, with the statistics in its
    note (``inspect`` shows it on every layer of the group)."""
    if not st.samples:
        raise ValueError("rotation='adaptive' needs the calibration token sample "
                         "(calibrate_blockwise(keep_tokens=...))")
    tokens = torch.cat(st.samples).float()
    had = obs_transform(scores, order, block)
    out = outlier_transform(had, tokens, steps, seed=group)
    h_db, o_db = group_sqnrs(ctx, plan, group, tokens, [had, out])
    am = st.absmax.float()
    fluct = float(am.max() / am.median().clamp(min=1e-12))
    pick, name = (out, "outlier-aware") if o_db > h_db else (had, "hadamard")
    why = (f"rotation {name}: SQNR {o_db:.2f} dB outlier-aware vs {h_db:.2f} dB Hadamard "
           f"on {tokens.shape[0]} tokens; channel peak/median |x| {fluct:.1f}")
    log.debug("group %d: %s", group, why)
    note = "; ".join(n for n in (pick.note, why) if n)
    return dataclasses.replace(pick, note=note)
