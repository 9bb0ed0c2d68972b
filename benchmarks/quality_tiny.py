"""Output SQNR (dB) of every recipe × bits on the five tiny diffusers transformers,
random weights as initialized and with planted outlier channels (``plant_outliers``).

Seeds and sample counts are fixed: 4 calibration calls, 3 held-out calls (batch 2). A
method is a recipe name with options, e.g. ``"clq weights=gptq lowrank=8"``.

    python benchmarks/quality_tiny.py            # writes results/quality_tiny.json
    python benchmarks/quality_tiny.py --recipes quarot "quarot weights=gptq" \
        --bits w4a4 --out quality_tiny_options.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from pathlib import Path

import torch
from tabulate import tabulate

import clq_compile as clq
from clq_compile.cli import parse_options
from clq_compile.qlinear import sqnr
from clq_compile.testing import OUTLIER_SITES, TINY_MODELS, plant_outliers

RESULTS = Path(__file__).parent / "results"


def run(models, recipes, bits_list, outliers: float) -> list[dict]:
    rows = []
    for name in models:
        model, inputs = TINY_MODELS[name]()
        if outliers:
            plant_outliers(model, OUTLIER_SITES[name], outliers)
        calib = [inputs(i) for i in range(4)]
        held = [inputs(20 + i) for i in range(3)]
        with torch.no_grad():
            ref = torch.cat([model(**x)[0] for x in held])
        for recipe in recipes:
            row = {"model": name, "outliers": outliers, "recipe": recipe}
            name_, *pairs = recipe.split()
            for bits in bits_list:
                qm = clq.quantize(model, calib, recipe=name_, bits=bits, measure=False,
                                  **parse_options(pairs))
                row[bits] = round(sqnr(ref, torch.cat([qm(**x)[0] for x in held])), 2)
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=sorted(TINY_MODELS))
    ap.add_argument("--recipes", nargs="+", default=["rtn", "smoothquant", "quarot", "clq"])
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w4a16", "w4a8", "w4a4"])
    ap.add_argument("--out", default="quality_tiny.json", help="file name under results/")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    rows = run(args.models, args.recipes, args.bits, 0.0)
    rows += run(args.models, args.recipes, args.bits, 30.0)
    print(tabulate(rows, headers="keys"))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / args.out
    out.write_text(json.dumps(dict(
        rows=rows, metric="output SQNR dB vs fp32, 3 held-out calls",
        torch=torch.__version__, date=datetime.date.today().isoformat(), device="cpu",
    ), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
