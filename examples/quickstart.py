"""Quickstart: quantize the committed shapes DiT (a trained diffusers PixArt transformer)
to W4A4 with CLQ, look at what was done, compare its drawings with full precision, save it.

    python examples/quickstart.py            # about 1.5 minutes on 2 CPU cores

Writes out/quickstart/: fp_vs_w4a4.png and the saved model (clq.load("out/quickstart/model")).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

import clq_compile as clq
from clq_compile.eval import calibration_calls, load_shapes_dit, psnr_db, sample, save_grid
from clq_compile.qlinear import sqnr

# CLQ with a smaller clip search than the default (3x3 clip pairs on 2 calibration calls
# instead of 5x6 on 4): the same passes, a plan in seconds rather than a minute.
BUDGET = {"w_grid": (1.0, 0.9, 0.8), "a_grid": (1.0, 0.9, 0.8), "clps_samples": 2}
PROMPTS = ["red circle top-left", "blue square bottom-right", "green triangle top-right",
           "yellow cross bottom-left"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out/quickstart"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    transformer, encoder = load_shapes_dit()
    # The transformer's real inputs while sampling 8 prompts, at 5 of the 20 steps.
    calib = calibration_calls(transformer, encoder, n_prompts=8)
    qm = clq.quantize(transformer, calib, recipe="clq", bits="w4a4", **BUDGET)
    print(clq.inspect(qm))

    seeds = list(range(len(PROMPTS) * 2))
    captions = PROMPTS * 2
    fp = sample(transformer, encoder, captions, seeds)
    q = sample(qm, encoder, captions, seeds)
    with torch.no_grad():
        db = sqnr(torch.cat([transformer(**c)[0] for c in calib]),
                  torch.cat([qm(**c)[0] for c in calib]))
    args.out.mkdir(parents=True, exist_ok=True)
    save_grid({"fp32": fp, "clq w4a4": q}, args.out / "fp_vs_w4a4.png", n=len(seeds))
    saved = qm.save(args.out / "model")
    size = sum(f.stat().st_size for f in saved.iterdir())

    print(f"\ntransformer-output SQNR vs fp32: {db:.1f} dB (calibration calls)")
    print(f"image PSNR vs fp32, same seeds: {psnr_db(fp, q):.1f} dB over {len(seeds)} samples")
    print(f"wrote {args.out / 'fp_vs_w4a4.png'}; saved the W4A4 model to {saved} "
          f"({size / 1e6:.1f} MB); {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
