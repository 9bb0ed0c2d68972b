"""One-off check (2026-12-02): does the best W4A4 configuration
(clq + gptq + lowrank 7 + budget 0.2) stop flipping samples 27, 55 and 226 when its
activations run at 8 bits in every block during the first sampling steps?

No option sets a hand-written timestep policy, so this builds with ``timestep_bits=4.0``
(a policy of all 4-bit rows, the same plan otherwise) and then overwrites the policy's
rows in the plan and in the graph constant the rewrite made from it (a check, not a
recipe). Calibrated timesteps are 999, 749, 500, 300, 50 and a sampling step takes the
nearest one's row, so row 0 covers steps 0-2 (t >= 875) and rows 0-1 steps 0-7.

    python benchmarks/first_steps_a8.py benchmarks/results/quality_256_first_steps_a8
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

import clq_compile as clq
from clq_compile.eval import evaluate, load_judge, load_shapes_dit

OPTIONS = {"weights": "gptq", "lowrank": 7, "budget": 0.2, "timestep_bits": 4.0}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    transformer, encoder = load_shapes_dit()
    meta: dict = {}

    def variant(rows: list[int]):
        def build(calib):
            qm = clq.quantize(transformer, calib, recipe="clq", bits="w4a4", **OPTIONS)
            hits = 0
            for g in qm.graphs:
                for name, buf in list(g.gm.named_buffers()) + [
                        (n, getattr(g.gm, n)) for n in dir(g.gm) if "timestep_a8" in n]:
                    if "timestep_a8" in name and isinstance(buf, torch.Tensor):
                        buf.zero_()
                        buf[rows] = True
                        hits += 1
            a8 = qm.plan.timesteps.a8
            a8.zero_()
            a8[rows] = True
            meta[str(rows)] = {"hits": hits, "times": qm.plan.timesteps.times.tolist(),
                               "a8": a8.int().tolist(), "weight_bytes": qm.weight_bytes()}
            logging.info("policy set: %s", meta[str(rows)])
            return qm
        return build

    methods = {("best20 row0 a8", "w4a4"): variant([0]),
               ("best20 rows01 a8", "w4a4"): variant([0, 1])}
    out = Path(sys.argv[1])
    rep = evaluate(transformer, encoder, load_judge(), methods, n_samples=256, seed=0,
                   steps=20, guidance_scale=4.0, out_dir=out)
    res = json.loads((out / "results.json").read_text())
    res["methods"] = meta
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(rep.table())
    for r in rep.results:
        print(r.method, r.bits, r.fp_agreement, r.fp_disagree, r.disagree_psnr_db,
              r.psnr_db, r.sqnr_db)


if __name__ == "__main__":
    main()
