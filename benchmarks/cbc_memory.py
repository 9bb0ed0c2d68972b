"""CBC memory: peak calibration activations held while calibrating block by block,
against what a calibrate-everything-at-once PTQ would hold (every linear's input for
every calibration call), plus the process peak RSS.

    python benchmarks/cbc_memory.py --model pixart-alpha   # 28 blocks, hidden 1152
    python benchmarks/cbc_memory.py --model shapes         # the trained benchmark DiT
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import time
from pathlib import Path

import torch
from pixart_like import pixart_like
from tabulate import tabulate

import clq_compile as clq

RESULTS = Path(__file__).parent / "results"


def pixart_alpha(tokens_side: int, batch: int, calls: int):
    """PixArt-α-size transformer (28 blocks, 16×72 = 1152 hidden), random weights."""
    return pixart_like(28, 16, tokens_side, batch, calls)


def shapes(calls: int):
    """The trained benchmark DiT on the quality harness's calibration prompts, ``calls``
    transformer calls spread over a 20-step trajectory (each 2 x 8 rows: cond + uncond)."""
    from clq_compile.eval import load_shapes_dit, prompts, record_calibration

    model, encoder = load_shapes_dit()
    captions, seeds, _ = prompts(8, seed=1)
    at_steps = sorted({int(s) for s in torch.linspace(0, 19, calls).round().tolist()})
    return model, record_calibration(model, encoder, captions, seeds, at_steps=at_steps, steps=20)


def all_linear_inputs_bytes(model: torch.nn.Module, calib: list[dict]) -> int:
    """What holding every linear's input for the whole calibration set costs."""
    # Keyed by id() with the tensor kept alive for the whole call, so a freed input's id
    # cannot be reused by another; linears reading one tensor (q/k/v) count it once.
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.__setitem__(id(a[0]), a[0]))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = 0
    with torch.no_grad():
        for c in calib:
            seen.clear()
            model(**c)
            total += sum(t.numel() * t.element_size() for t in seen.values())
    seen.clear()
    for h in hooks:
        h.remove()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=["pixart-alpha", "shapes"], default="pixart-alpha")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--tokens-side", type=int, default=16, help="latent patches per side")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.model == "pixart-alpha":
        model, calib = pixart_alpha(args.tokens_side, args.batch, args.calls)
    else:
        model, calib = shapes(args.calls)
    naive = all_linear_inputs_bytes(model, calib)
    t0 = time.perf_counter()
    # CBC + OBS; CLPS off so the run stays in CPU minutes at this size (its probes hold
    # one window of activations for clps_samples calls on top of this).
    qm = clq.quantize(model, calib, recipe="clq", bits="w4a4", clps=False, measure=False)
    seconds = time.perf_counter() - t0
    peak = qm.plan.meta["calib_peak_bytes"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = dict(model=args.model, calib_calls=args.calls, blocks=len(
        {lp.block for lp in qm.plan.layers.values() if lp.block is not None}),
        cbc_peak_activation_mib=round(peak / 2**20, 1),
        all_linear_inputs_mib=round(naive / 2**20, 1), ratio=round(naive / max(peak, 1), 1),
        process_peak_rss_mib=round(rss / 2**20, 1), calibrate_s=round(seconds, 1))
    print(tabulate([row], headers="keys"))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cbc_memory_{args.model}.json"
    out.write_text(json.dumps(dict(
        row=row, device="cpu", cpu=platform.processor() or platform.machine(),
        torch=torch.__version__, date=datetime.date.today().isoformat(), args=vars(args),
    ), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
