"""Quantization quality on the trained shapes DiT: ShapeEval accuracy, PSNR vs FP and
transformer-output SQNR for each method x bit width, plus a side-by-side PNG grid.

A method is a recipe plus options (``METHODS``); the clq ablations are the same recipe with
one component switched off, so every row runs through the same passes.

    python examples/quality.py                                   # the README table
    python examples/quality.py --methods rtn clq --bits w4a4     # a subset
    python examples/quality.py --samples 8 --steps 10 --out out/quality_smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

import clq_compile as clq
from clq_compile.cli import FAST
from clq_compile.eval import (
    CastTransformer,
    NoisyTransformer,
    evaluate,
    load_judge,
    load_shapes_dit,
)
from clq_compile.eval.sampler import make_scheduler
from clq_compile.timestep_bits import average_bits

# name -> (recipe, options). Ablations switch off one clq component each.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn": ("rtn", {}),
    "smoothquant": ("smoothquant", {}),
    "quarot": ("quarot", {}),
    "clq": ("clq", {}),  # order "auto": zigzag with per-token activations
    "clq -clps": ("clq", {"clps": False}),
    "clq -cbc": ("clq", {"cbc": "none"}),
    "clq cbc=last": ("clq", {"cbc": "last"}),
    "clq -obs": ("clq", {"obs": False}),
    "clq order=none": ("clq", {"order": "none"}),
    "clq order=sorted": ("clq", {"order": "sorted"}),
    "clq a_group=64": ("clq", {"a_group": 64}),
    # issue 15: the cheaper searches a user can ask for (the CLI's --budget fast preset,
    # then also the window cut to the next block): what their plan time costs in quality
    "clq fast": ("clq", dict(FAST)),
    "clq fast window=1": ("clq", {**FAST, "window": 1}),
    "clq fast window=1 samples=1": ("clq", {**FAST, "window": 1, "clps_samples": 1}),
    # issue 14: options that compose with any recipe
    # (rank 7: the largest whose fp16 branch adds under 10% to W4A4's bytes on the shapes
    # DiT; the budget promotes 5% of the weights one step up, budget_bits="auto")
    "quarot+gptq": ("quarot", {"weights": "gptq"}),
    "clq+gptq": ("clq", {"weights": "gptq"}),
    "clq+lowrank": ("clq", {"lowrank": 7}),
    "clq+gptq+lowrank": ("clq", {"weights": "gptq", "lowrank": 7}),
    "clq+budget": ("clq", {"budget": 0.05}),
    "clq+gptq+lowrank+budget": ("clq", {"weights": "gptq", "lowrank": 7, "budget": 0.05}),
    "clq+gptq+lowrank g64": ("clq", {"weights": "gptq", "lowrank": 7, "w_group": 64}),
    # issue 16: QuaRTZ's LZS activations (4-bit codes, a shift per 16 values along K)
    "rtn+lzs": ("rtn", {"activations": "lzs"}),
    "clq+lzs": ("clq", {"activations": "lzs"}),
    "clq+gptq+lowrank+budget+lzs": ("clq", {"weights": "gptq", "lowrank": 7, "budget": 0.05,
                                             "activations": "lzs"}),
    # issue 16: LRQ-DiT's twin-log weights (they replace GPTQ's rounding, not add to it)
    "rtn+twinlog": ("rtn", {"weights": "twinlog"}),
    "clq+twinlog": ("clq", {"weights": "twinlog"}),
    "clq+twinlog+lowrank+budget": ("clq", {"weights": "twinlog", "lowrank": 7,
                                           "budget": 0.05}),
    # issue 16: D²Quant's DAC (a bias after each post-attention norm)
    "rtn+dac": ("rtn", {"dac": True}),
    "clq+dac": ("clq", {"dac": True}),
    "clq+gptq+lowrank+budget+dac": ("clq", {"weights": "gptq", "lowrank": 7, "budget": 0.05,
                                             "dac": True}),
    # issue 16: D²Quant's DSQ (input-channel scales of MLP down-projections)
    "rtn+dsq": ("rtn", {"dsq": True}),
    "clq+dsq": ("clq", {"dsq": True}),
    "clq+gptq+lowrank+budget+dsq": ("clq", {"weights": "gptq", "lowrank": 7, "budget": 0.05,
                                             "dsq": True}),
    # issue 16: AdaTSQ's Fisher-weighted GPTQ Hessian
    "quarot+gptq+fisher": ("quarot", {"weights": "gptq", "hessian": "fisher"}),
    "clq+gptq+fisher": ("clq", {"weights": "gptq", "hessian": "fisher"}),
    "clq+gptq+lowrank+budget+fisher": ("clq", {"weights": "gptq", "lowrank": 7, "budget": 0.05,
                                                "hessian": "fisher"}),
    # issue 16: LRQ-DiT's adaptive rotation (Hadamard or outlier-aware, per shared input)
    "clq+adaptive": ("clq", {"rotation": "adaptive"}),
    "clq+gptq+lowrank+budget+adaptive": ("clq", {"weights": "gptq", "lowrank": 7,
                                                  "budget": 0.05, "rotation": "adaptive"}),
    # issue 16: AdaTSQ's per-timestep, per-block activation bits (4 or 8), average 6 / 5
    "rtn+timestep6": ("rtn", {"timestep_bits": 6.0}),
    "clq+timestep6": ("clq", {"timestep_bits": 6.0}),
    # the same 6-bit average spent statically: half the weights at A8 at every timestep
    "clq+budget50": ("clq", {"budget": 0.5}),
    "clq+timestep5": ("clq", {"timestep_bits": 5.0}),
    "clq+gptq+lowrank+budget+timestep6": ("clq", {"weights": "gptq", "lowrank": 7,
                                                   "budget": 0.05, "timestep_bits": 6.0}),
    # issue 14: the best configuration with a larger budget (to W4A8: no extra weight bytes)
    "clq+gptq+lowrank+budget10": ("clq", {"weights": "gptq", "lowrank": 7, "budget": 0.1}),
    "clq+gptq+lowrank+budget20": ("clq", {"weights": "gptq", "lowrank": 7, "budget": 0.2}),
    # the same with Hadamard blocks of 256 (full width on the shapes DiT's K = 256 inputs,
    # as quarot's, which keeps samples 27 and 55)
    "clq+gptq+lowrank+budget20 b256": ("clq", {"weights": "gptq", "lowrank": 7,
                                                "budget": 0.2, "block": 256}),
    # ... with rank 5, so the 256-wide blocks and the branch stay under 10% extra bytes
    "clq+gptq+lowrank5+budget20 b256": ("clq", {"weights": "gptq", "lowrank": 5,
                                                 "budget": 0.2, "block": 256}),
}
BASELINES = ["rtn", "smoothquant", "quarot", "clq"]
OPTIONS = ["quarot+gptq", "clq+gptq", "clq+lowrank", "clq+gptq+lowrank", "clq+budget",
           "clq+gptq+lowrank+budget", "clq+gptq+lowrank g64", "rtn+lzs", "clq+lzs",
           "clq+gptq+lowrank+budget+lzs", "rtn+twinlog", "clq+twinlog",
           "clq+twinlog+lowrank+budget", "rtn+dac", "clq+dac", "clq+gptq+lowrank+budget+dac",
           "rtn+dsq", "clq+dsq", "clq+gptq+lowrank+budget+dsq", "quarot+gptq+fisher",
           "clq+gptq+fisher", "clq+gptq+lowrank+budget+fisher", "clq+adaptive",
           "clq+gptq+lowrank+budget+adaptive", "rtn+timestep6", "clq+timestep6",
           "clq+timestep5", "clq+budget50", "clq+gptq+lowrank+budget+timestep6",
           "clq+gptq+lowrank+budget10", "clq+gptq+lowrank+budget20",
           "clq+gptq+lowrank+budget20 b256", "clq+gptq+lowrank5+budget20 b256"]
ABLATIONS = [m for m in METHODS if m not in BASELINES and m not in OPTIONS]


def factory(transformer: torch.nn.Module, name: str, bits: str, meta: dict[str, Any],
            steps: int):
    recipe, options = METHODS[name]

    def build(calib: list[dict[str, Any]]) -> clq.QuantizedModel:
        qm = clq.quantize(transformer, calib, recipe=recipe, bits=bits, **options)
        if qm.plan.timesteps is not None:  # the average over the steps sampling runs
            qm.plan.meta["timestep_bits"]["sampled_bits"] = round(average_bits(
                qm.plan, make_scheduler(steps).timesteps), 4)
        meta[f"{name} {bits}"] = {
            "recipe": recipe, "options": options,
            "quantized_layers": len(qm.plan.quantized_layers()),
            "weight_bytes": qm.weight_bytes(), "fp_weight_bytes": qm.fp_weight_bytes,
            **{k: qm.plan.meta[k] for k in ("plan_s", "calib_peak_bytes", "clps_s",
                                            "clps_probes", "rotations", "rotation_s",
                                            "timestep_bits")
                                            if k in qm.plan.meta},
        }
        if "budget" in qm.plan.meta:  # the fraction of the weights it promoted
            meta[f"{name} {bits}"]["budget_spent"] = qm.plan.meta["budget"]["spent"]
        return qm

    return build


def peer(transformer: torch.nn.Module, name: str, meta: dict[str, Any]):
    from clq_compile.eval.peers import peer_factory

    build = peer_factory(transformer, name)

    def timed(calib: list[dict[str, Any]]) -> torch.nn.Module:
        t0 = time.perf_counter()
        model = build(calib)
        meta[name] = {"peer": name, "build_s": round(time.perf_counter() - t0, 2)}
        return model

    return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="*", default=BASELINES, choices=list(METHODS))
    p.add_argument("--ablations", nargs="*", default=ABLATIONS, choices=list(METHODS),
                   help="extra methods run only at --ablation-bits")
    p.add_argument("--bits", nargs="*", default=["w8a8", "w4a8", "w4a4"])
    p.add_argument("--ablation-bits", nargs="*", default=["w4a4"])
    p.add_argument("--peers", nargs="*", default=[],
                   help="peer rows (pip install '.[peers]'), e.g. 'torchao 8da4w g64'; "
                        "'all' for every available one, each at the bits it compares with")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 sanity row")
    p.add_argument("--noise-db", nargs="*", type=float, default=[],
                   help="control rows: FP plus white noise on the transformer output at "
                        "these SQNRs (how far FP agreement moves without quantization)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid-methods", nargs="*", default=None,
                   help="columns of grid.png (default: FP and the --methods at the last bits)")
    p.add_argument("--out", type=Path, default=Path("out/quality"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()

    transformer, encoder = load_shapes_dit()
    judge = load_judge()
    meta: dict[str, Any] = {}
    methods: dict = {}
    if not args.no_bf16:
        methods[("bf16", "bf16")] = lambda calib: CastTransformer(transformer, torch.bfloat16)
    for db in args.noise_db:
        methods[(f"noise {db:g} dB", "control")] = (
            lambda calib, db=db: NoisyTransformer(transformer, db, seed=args.seed))
    for bits in args.bits:
        for name in args.methods:
            methods[(name, bits)] = factory(transformer, name, bits, meta, args.steps)
    for bits in args.ablation_bits:
        for name in args.ablations:
            methods.setdefault((name, bits),
                               factory(transformer, name, bits, meta, args.steps))
    if args.peers:
        from clq_compile.eval.peers import available_peers

        peers = available_peers()
        if not peers:
            p.error("--peers needs torchao: pip install '.[peers]'")
        wanted = list(peers) if args.peers == ["all"] else args.peers
        for name in wanted:
            if name not in peers:
                p.error(f"unknown peer {name!r}; available: {list(peers)}")
            methods[(name, peers[name])] = peer(transformer, name, meta)
    grid = args.grid_methods or [f"{m} {args.bits[-1]}" for m in args.methods]
    report = evaluate(transformer, encoder, judge, methods, n_samples=args.samples,
                      seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                      out_dir=args.out, grid_columns=grid)
    results = json.loads((args.out / "results.json").read_text())
    results["methods"] = meta
    results["config"]["wall_s"] = round(time.time() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report.table())
    for r in report.results:
        agree = "" if r.fp_agreement is None else f"FP agreement {100 * r.fp_agreement:.1f}% "
        print(f"{r.method:>18} {r.bits:>6}: per-attribute {r.attribute_accuracy} {agree}"
              f"flips {r.fp_disagree} at {r.disagree_psnr_db} dB (FP judge margin "
              f"{r.disagree_fp_margin}, rank {r.disagree_fp_rank}) "
              f"build {r.build_s:.1f}s sample {r.sample_s:.1f}s")
    print(f"wrote {args.out}/results.json, table.md, grid.png")


if __name__ == "__main__":
    main()
