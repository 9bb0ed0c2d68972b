"""D²Quant's deviation-aware correction (DAC, arXiv 2602.02546), option ``dac``: a
per-channel bias added after the norm that follows each attention block, equal to the
mean shift of that norm's output between the full-precision model and the quantized one
on the calibration tokens, μ = mean_t(LN(H)) − mean_t(LN(H̃)).

The reading we implement: H is the full-precision model's residual stream and H̃ the
quantized model's with every correction before it applied (the issue's "FP and the
quantized prefix"; the paper's LLM setting compares one block's attention, but the mean
shift a norm sees is the whole prefix's, and correcting it there is what the bias can do).
Sites come from the graph (``passes.post_norms``), never from module names. The means are
running sums, so nothing beyond one block's activations is held; sites are measured in
graph order, each with the earlier corrections applied, so the corrected quantized model
matches the full-precision mean at every site on the calibration set.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from clq_compile.annotations import after_attention
from clq_compile.overrides import PlanOverride
from clq_compile.plan import Plan
from clq_compile.runner import PlanContext, recorder

log = logging.getLogger(__name__)


def channel_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """Mean over every token (all leading dims, all samples) per channel, in float64."""
    total = sum(v.detach().double().reshape(-1, v.shape[-1]).sum(dim=0) for v in values)
    count = sum(v.numel() // v.shape[-1] for v in values)
    return total / count


def deviation_corrections(ctx: PlanContext, plan: Plan) -> None:
    """Fill ``plan.dac`` (site -> float32 bias) by streaming the calibration set through
    the full-precision and the planned quantized model, block by block."""
    t0 = time.perf_counter()
    runner = ctx.runner
    plan.dac.clear()
    fp, q = runner.start(ctx.flat_calib), runner.start(ctx.flat_calib)
    for seg in tqdm(runner.order, desc="dac", leave=False, disable=len(runner.order) < 8):
        sites: list[fx.Node] = [n for n in runner.segments.get(seg, []) if after_attention(n)]
        fp_values: dict[fx.Node, list[torch.Tensor]] = {n: [] for n in sites}
        runner.run_segment(seg, fp, recorder(fp_values))  # advances the FP model too
        quantized = PlanOverride(ctx, plan)  # one per block: its packed weights only
        for node in sites:  # in graph order: the earlier sites' biases are in the plan
            q_mean = channel_mean(runner.probe(q, seg, {node}, quantized)[node])
            plan.dac[after_attention(node)] = (channel_mean(fp_values[node]) - q_mean).float()
        runner.run_segment(seg, q, quantized)
    plan.meta["dac"] = {
        "sites": len(plan.dac), "seconds": round(time.perf_counter() - t0, 3),
        "mean_abs": {k: round(float(v.abs().mean()), 6) for k, v in plan.dac.items()}}
    if not plan.dac:
        log.warning("option dac=True found no norm after an attention block in this graph: "
                    "no correction added")
    for site, bias in plan.dac.items():
        lp = plan.layers.get(site)
        if lp is not None:
            lp.notes.append(f"dac: bias after the next norm, mean |μ| {bias.abs().mean():.3g}")
    log.info("dac: %d norm biases in %.1f s", len(plan.dac), time.perf_counter() - t0)
