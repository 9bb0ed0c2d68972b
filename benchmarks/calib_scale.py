"""What the clq W4A4 plan costs as models grow: wall time, CLPS probes and peak RSS on
PixArt-α-shaped transformers (random weights) at several depths and widths.

Each configuration runs in its own process, so its peak RSS is its own. A configuration
is ``DEPTHxHEADS`` (width = 72 · heads; PixArt-α is ``28x16``, hidden 1152), optionally
``:CALLS`` (calibration calls; default ``--calls``).

    python benchmarks/calib_scale.py                                 # the default sweep
    python benchmarks/calib_scale.py --configs 28x16 --calls 4       # PixArt-α size (hours)
    python benchmarks/calib_scale.py --configs --floors 28x16         # its floor only
    python benchmarks/calib_scale.py -o clps_samples=2 --out calib_scale_fast.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import cpu_info
from tabulate import tabulate

RESULTS = Path(__file__).parent / "results"
DEFAULT_CONFIGS = ["2x4", "2x8", "4x8", "2x8:2", "2x8:8", "1x16", "2x16"]


def one(depth: int, heads: int, calls: int, tokens_side: int, threads: int,
        options: dict) -> dict:
    """Plan one configuration in this process; the row for the results file."""
    from pixart_like import pixart_like

    import clq_compile as clq

    torch.set_num_threads(threads)
    model, calib = pixart_like(depth, heads, tokens_side, calls=calls)
    t0 = time.perf_counter()
    qm = clq.quantize(model, calib, recipe="clq", bits="w4a4", measure=False,
                      extra_shapes=None, **options)
    wall = time.perf_counter() - t0
    meta = qm.plan.meta
    probes = meta.get("clps_probes", 0)
    return dict(
        depth=depth, width=72 * heads, tokens=tokens_side ** 2, calls=calls,
        quantized=len(qm.plan.quantized_layers()), quantize_s=round(wall, 1),
        plan_s=meta.get("plan_s"), clps_s=meta.get("clps_s"), clps_probes=probes,
        clps_probe_calls=meta.get("clps_probe_calls", 0),
        ms_per_probe=round(1e3 * meta.get("clps_s", 0) / max(probes, 1), 1),
        calib_peak_mib=round(meta.get("calib_peak_bytes", 0) / 2**20, 1),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),
    )


def window_floor(depth: int, heads: int, calls: int, tokens_side: int, threads: int,
                 options: dict) -> dict:
    """A floor under the exact search's time at this size, from a measured float forward
    (no plan): each linear's (1, 1) probe, which finds its target, runs the float blocks
    after its own within the window on every probed call. Partial blocks and the grid's
    trials are left out, so the true time is above it."""
    from pixart_like import pixart_like

    from clq_compile.build import resolve

    torch.set_num_threads(threads)
    model, calib = pixart_like(depth, heads, tokens_side, calls=calls)
    config, _ = resolve("clq", "w4a4", **options)
    spent = [0.0]
    blocks = model.transformer_blocks
    for b in blocks:
        b.register_forward_pre_hook(lambda *_: spent.__setitem__(0, spent[0] - time.perf_counter()))
        b.register_forward_hook(lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter()))
    with torch.no_grad():
        model(**calib[0])  # warm-up
        runs = []
        for _ in range(3):
            spent[0] = 0.0
            model(**calib[0])
            runs.append(spent[0])
    block_s = min(runs) / depth
    linears = sum(isinstance(m, torch.nn.Linear) for m in blocks[0].modules())
    samples = min(calls, config.clps_samples)
    runs_after = sum(min(config.window, depth - 1 - b) for b in range(depth)) * linears * samples
    return dict(depth=depth, width=72 * heads, tokens=tokens_side ** 2, calls=calls,
                window=config.window, clps_samples=config.clps_samples,
                linears_per_block=linears, block_forward_s=round(block_s, 4),
                probe_block_runs=runs_after, window_floor_s=round(runs_after * block_s, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--tokens-side", type=int, default=16, help="16: 256 image tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                    help="clq recipe option, e.g. -o clps_samples=2")
    ap.add_argument("--floors", nargs="*", default=["28x16"],
                    help="configurations whose target-finding floor is measured, not planned")
    ap.add_argument("--out", default="calib_scale.json")
    ap.add_argument("--one", nargs=2, type=int, metavar=("DEPTH", "HEADS"), help=argparse.SUPPRESS)
    ap.add_argument("--floor-one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from clq_compile.cli import parse_options

    options = parse_options(args.option)
    if args.one:
        run = window_floor if args.floor_one else one
        row = run(*args.one, args.calls, args.tokens_side, args.threads, options)
        print(json.dumps(row))
        return
    def spawn(cfg: str, floor: bool) -> dict:
        shape, _, calls = cfg.partition(":")
        depth, _, heads = shape.partition("x")
        cmd = [sys.executable, __file__, "--one", depth, heads, "--calls", calls or str(args.calls),
               "--tokens-side", str(args.tokens_side), "--threads", str(args.threads),
               *[f"-o{o}" for o in args.option], *(["--floor-one"] if floor else [])]
        # stderr passes through: a long plan shows its progress bars and logs
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if out.returncode:
            sys.exit(f"{cfg} failed (exit {out.returncode}; its stderr is above)")
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    for cfg in args.configs:  # planned, with the floor beside (the floor is below the plan)
        rows.append({**spawn(cfg, False), **spawn(cfg, True)})
        print(tabulate([rows[-1]], headers="keys"), flush=True)
    floors = [spawn(cfg, True) for cfg in args.floors]
    if floors:
        print(tabulate(floors, headers="keys"))
    print(tabulate(rows, headers="keys"))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / args.out
    path.write_text(json.dumps(dict(
        rows=rows, floors=floors, options=options, threads=args.threads, cpu=cpu_info(),
        torch=torch.__version__, date=datetime.date.today().isoformat()), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
