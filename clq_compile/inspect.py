"""``clq.inspect``: one row per linear, the way a user audits a quantized model."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate, tabulate_formats

from clq_compile.errors import ConfigError
from clq_compile.lowering.triton.lower import lowered_ops
from clq_compile.lowrank import storage_dtype
from clq_compile.model import QuantizedModel
from clq_compile.passes.prologues import fused_prologues
from clq_compile.passes.rewrite import quant_linear_nodes
from clq_compile.plan import LayerPlan, Plan


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _gran(lp: LayerPlan) -> str:
    s = lp.spec
    w = s.w_format if s.w_format != "int" else (f"g{s.w_group}" if s.w_group else "ch")
    a = "-" if s.a_bits == 16 else (f"g{s.a_group}" if s.a_group else "tok")
    if s.a_format != "int":
        a = f"{s.a_format}{s.a_group}"
    return f"W:{w} A:{a}"


def _notes(qm: Any, lp: LayerPlan) -> list[str]:
    notes = list(lp.notes)
    if lp.rank:
        nbytes = lp.rank * (lp.in_features + lp.out_features) * storage_dtype(qm.dtype).itemsize
        notes.insert(0, f"lowrank r={lp.rank} ({nbytes:,} B)")
    return notes


def rows(qm: Any) -> list[list[Any]]:
    plan: Plan = qm.plan
    out = []
    for lp in plan.layers.values():
        tp = plan.transform_of(lp)
        if lp.quantized:
            out.append([
                lp.name, lp.role, "-" if lp.block is None else lp.block,
                f"{lp.in_features}x{lp.out_features}", lp.spec.name, _gran(lp), lp.rounding,
                tp.describe() if tp else "-", _fmt(lp.outlier_score),
                f"{lp.w_clip:.2f}/{lp.a_clip:.2f}", lp.target or "-",
                f"{_fmt(lp.err_before, 4)}→{_fmt(lp.err_after, 4)}" if lp.err_before is not None
                else "-", _fmt(lp.sqnr_db, 1), "; ".join(_notes(qm, lp)) or "",
            ])
        else:
            out.append([
                lp.name, lp.role, "-" if lp.block is None else lp.block,
                f"{lp.in_features}x{lp.out_features}", "fp", "-", "-", "-", "-", "-", "-", "-", "-",
                f"skip: {lp.skip_reason}",
            ])
    return out


HEADERS = ["layer", "role", "block", "shape", "bits", "granularity", "rounding", "rotation",
           "outlier", "clip w/a", "target", "target err", "SQNR dB", "notes"]


def summary(qm: Any) -> str:
    plan: Plan = qm.plan
    q = plan.quantized_layers()
    fp_lin = sum(lp.in_features * lp.out_features * 4 for lp in q)
    state = qm.graph_module.state_dict()  # the packed weights (shared by every graph)
    q_lin = sum(t.numel() * t.element_size() for k, t in state.items()
                if k.startswith("clq_") and k.endswith(("_w_q", "_w_scale", "_lr_up", "_lr_down")))
    total = qm.weight_bytes()
    ratio = fp_lin / q_lin if q_lin else float("nan")
    mratio = qm.fp_weight_bytes / total if total else float("nan")
    line = (
        f"{plan.recipe} {plan.spec.name}: {len(q)}/{len(plan.layers)} linears quantized; "
        f"quantized-linear weights {fp_lin:,} B -> {q_lin:,} B ({ratio:.2f}x); "
        f"model weights {qm.fp_weight_bytes:,} B -> {total:,} B ({mratio:.2f}x)"
    )
    gemms = quant_linear_nodes(qm.graph_module)
    if gemms:
        line += (f"; run as {len(gemms)} quantized GEMMs, "
                 f"{sum(n.args[5] < 16 for n in gemms)} activation quantizers")
    fused = fused_prologues(qm.graph_module)
    if fused:
        line += ("; producers fused into their quantizers: " +
                 ", ".join(f"{k} {v}" for k, v in sorted(fused.items())))
    lowered = getattr(qm, "lowered", [None])[0]
    if lowered is not None:
        kernels = lowered_ops(lowered).get("clq_triton.quant_linear.default", 0)
        line += f"; {kernels} of {len(gemms)} GEMMs lowered to the Triton kernels"
    notes_lowering = [f"not lowered to the Triton kernels: {k}: {v}"
                      for k, v in getattr(qm, "declined", {}).items()]
    if "rotations" in plan.meta:
        stacks = [tp.rot for tp in plan.transforms.values()
                  if tp.rot is not None and tp.rot.dim() == 3]
        nbytes = sum(r.numel() * r.element_size() for r in stacks)
        line += (f"; adaptive rotation: {len(stacks)} of {len(plan.transforms)} shared "
                 f"inputs outlier-aware ({nbytes:,} B of per-block rotations)")
    ts = plan.meta.get("timestep_bits")
    if plan.timesteps is not None and ts is not None:
        cells = plan.timesteps.a8
        line += (f"; timestep bits: {ts['bits']:.2f} average activation bits (target "
                 f"{ts['target']:g}), 8-bit in {int(cells.sum())} of {cells.numel()} "
                 f"(timestep, block) cells, by timestep input {plan.timesteps.input!r}")
    notes = [plan.meta.get("coverage"), *notes_lowering]
    if ts is not None and plan.timesteps is None:
        notes.append(f"timestep_bits={ts['target']:g} found no block with 4-bit-activation "
                     "layers: every layer stays at its planned bits")
    if "dac" in plan.meta:
        line += f"; DAC biases after {len(plan.dac)} norms"
        if not plan.dac:
            notes.append("dac=True found no norm after an attention block: nothing corrected")
    return "\n".join([line, *(f"WARNING: {n}" for n in notes if n)])


def inspect(qm: Any, tablefmt: str = "simple") -> str:
    """A per-layer table (tabulate) of a ``QuantizedModel`` plus a summary line."""
    if not isinstance(qm, QuantizedModel):
        raise TypeError(f"clq.inspect takes a QuantizedModel (what clq.quantize or clq.load "
                        f"returns), got {type(qm).__name__}")
    if tablefmt not in tabulate_formats:
        raise ConfigError(f"option tablefmt={tablefmt!r} is not allowed: expected one of "
                          f"tabulate's formats {sorted(tabulate_formats)}")
    return tabulate(rows(qm), headers=HEADERS, tablefmt=tablefmt) + "\n" + summary(qm)
