"""D²Quant's dual-scale quantizer (arXiv 2602.02546, DSQ), option ``dsq``: a weight
(N out, K in) as ``diag(s) · Q · diag(s_c)``, the usual per-row (or per-group) scales s
and an extra per-input-channel scale s_c, found by alternating updates.

Each round: with s_c fixed, Q and s are round-to-nearest of ``W · diag(1/s_c)``; with
Q and s fixed, each s_c[j] is the least-squares fit of column j (closed form). Rounding
is not the minimizer of its step, so the error need not fall every round: the best
round is kept, and round 0 is plain RTN (s_c = 1), so DSQ is never worse than RTN.

Where s_c goes: in a DiT MLP the down-projection reads GELU(up(x)), which is not linear
in up's output, so s_c cannot be folded into the up-projection as in SwiGLU LLMs (the
paper's place). It joins the layer's input transform x ↦ (x[perm]·smooth)·R as a factor
of ``smooth`` — the activation quantizer's per-channel multiply, exact, and run unchanged
by every lowering. That multiply comes before the rotation R, so with a rotation the
effective weight in the permuted basis is A·diag(s_c), A = (Q̂·Rᵀ)·diag(smooth): still one
least-squares fit per column.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from clq_compile.errors import QuantizationError
from clq_compile.hadamard import block_hadamard
from clq_compile.plan import Plan, TransformPlan
from clq_compile.qlinear import fold_weight
from clq_compile.quant import QTensor, quantize
from clq_compile.runner import PlanContext

log = logging.getLogger(__name__)

EPS = 1e-12


@dataclass(frozen=True)
class DualScale:
    """Q with its row/group scales (``qt``, in the transform's folded basis), the
    input-channel scales (in the transform's permuted order), the kept round."""

    qt: QTensor
    s_c: torch.Tensor  # (K,) float32
    rounds: int  # the round whose result is kept (0: plain RTN)
    error: float  # squared weight error of the kept round
    rtn_error: float  # that of round 0 (plain RTN)
    weight: torch.Tensor  # the weight it stands for, columns in the permuted order

    def dequantize(self) -> torch.Tensor:
        return self.weight


def dual_scale_quantize(w: torch.Tensor, bits: int, group: int = 0, clip: float = 1.0,
                        iters: int = 8, tp: TransformPlan | None = None) -> DualScale:
    """DSQ of ``w``; with ``tp``, for the weight that transform folds (see the module)."""
    if w.dim() != 2:
        raise QuantizationError(f"DSQ takes a 2-D weight, got shape {tuple(w.shape)}")
    if iters < 0:
        raise QuantizationError(f"DSQ iterations must be >= 0, got {iters}")
    w = w.detach().float().cpu()
    tp = (TransformPlan() if tp is None else tp).on("cpu")
    wp = w if tp.perm is None else w.index_select(1, tp.perm)
    base = torch.ones(w.shape[1]) if tp.smooth is None else tp.smooth.float()
    rot = tp.rot
    s_c = torch.ones(w.shape[1])
    best, rtn = None, 0.0
    for r in range(iters + 1):
        # folded exactly as the rewrite folds it (so the graph packs this very Q)
        qt = quantize(fold_weight(w, with_scale(tp, s_c)), bits, group, clip)
        a = qt.dequantize()
        a = (a if rot is None else block_hadamard(a, rot.float().mT)) * base
        err = float(((a * s_c - wp).double() ** 2).sum())
        rtn = err if r == 0 else rtn
        if best is None or err < best.error:
            best = DualScale(qt, s_c, r, err, rtn, a * s_c)
        den = (a * a).sum(dim=0)
        fit = (wp * a).sum(dim=0) / den.clamp(min=EPS)
        # a column the round quantized to all zeros has no fit: keep its scale
        s_c = torch.where((den > EPS) & (fit > 0), fit, s_c)
    return best


def with_scale(tp: TransformPlan, s_c: torch.Tensor) -> TransformPlan:
    """``tp`` with s_c joined to its smooth (permuted order), marked as DSQ's."""
    smooth = s_c if tp.smooth is None else tp.smooth.float() * s_c
    kind = "dsq" if tp.kind == "none" else f"{tp.kind}+dsq"
    return dataclasses.replace(tp, smooth=smooth, kind=kind)


def dual_scale_transforms(ctx: PlanContext, plan: Plan, iters: int = 32) -> None:
    """Fold DSQ's s_c into the transform of each MLP down-projection's input (an input
    no other quantized layer reads; the plan's clips and weight bits)."""
    t0 = time.perf_counter()
    readers: dict[int, list[str]] = {}
    for lp in plan.quantized_layers():
        readers.setdefault(lp.group, []).append(lp.name)
    done = []
    found = [lp for lp in plan.quantized_layers()
             if lp.role == "mlp_down" and readers[lp.group] == [lp.name]]
    for lp in found:
        tp = plan.transform_of(lp)
        d = dual_scale_quantize(ctx.weight(lp.name), lp.spec.w_bits, lp.spec.w_group,
                                lp.w_clip, iters, tp)
        if d.rounds == 0:
            lp.notes.append("dsq: no round beat RTN; s_c = 1")
            continue
        plan.transforms[lp.group] = with_scale((tp or TransformPlan()).on("cpu"), d.s_c)
        lp.notes.append(f"dsq: weight error {100 * (d.error / d.rtn_error - 1):+.1f}% "
                        f"(round {d.rounds}; s_c in [{d.s_c.min():.3g}, {d.s_c.max():.3g}])")
        done.append(lp.name)
    plan.meta["dsq"] = {"layers": done, "seconds": round(time.perf_counter() - t0, 3)}
    if not found:
        log.warning("option dsq=True found no MLP down-projection to apply it to (a "
                    "quantized layer of role mlp_down that alone reads its input)")
    elif not done:
        log.warning("option dsq=True found %d MLP down-projection(s), but on none did a "
                    "dual-scale round beat plain rounding: every s_c stays 1 (DSQ changed "
                    "nothing)", len(found))
    log.info("dsq: %d down-projections in %.1f s", len(done), time.perf_counter() - t0)
