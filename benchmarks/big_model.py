"""Planning a model larger than memory: the peak memory of ``clq.quantize`` reading a
safetensors checkpoint block by block (``checkpoint=``, the model built on the meta
device) against loading the whole model first, on a PixArt-α-shaped transformer.

    python benchmarks/big_model.py --config 28x16            # PixArt-α size (2.3 GiB fp32)
    python benchmarks/big_model.py --config 8x8 --tokens-side 4 --calls 2 --out /tmp/x.json
    python benchmarks/big_model.py --config flux --tokens-side 4 --calls 2 --modes plan \
        --ckpt-dtype bfloat16 --out benchmarks/results/big_model_flux.json  # 11.9 B params

The default recipe is clq without CLPS (CBC + OBS: a calibration walk that reads every
block's weights and activation statistics; CLPS would add hours of probes at this size).

Each mode runs in its own process. Peak memory is the process's high-water RSS (VmHWM),
reset through ``/proc/self/clear_refs`` after imports and the calibration inputs, so it
counts what loading and planning add. Modes:
- ``plan``: capture + calibration + per-layer measurement from the checkpoint (no
  rewrite): calibration's own memory, the issue's bound (2 blocks' weights + one
  block's activations);
- ``checkpoint``: the whole ``quantize`` from the checkpoint (adds the quantized output);
- ``loaded``: the model loaded whole, then ``quantize`` (today's path).
The two quantize modes must give the same output (checked here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_info
from tabulate import tabulate

from clq_compile.checkpoint import DTYPES

RESULTS = Path(__file__).parent / "results"
MODES = ("plan", "checkpoint", "loaded")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Reset the high-water RSS to the current RSS; return it (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak() -> int:
    return _status_kib("VmHWM") * 1024


def flux_size(tokens_side: int, calls: int):
    """FLUX.1-dev's transformer shape (19 double + 38 single blocks, hidden 3072, 11.9 B
    parameters), ``tokens_side``² image and 16 text tokens, batch 2 calls."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()
    img, txt, b = tokens_side ** 2, 16, 2

    def call(i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        rows = torch.arange(img)
        return dict(
            hidden_states=torch.randn(b, img, 64, generator=g),
            encoder_hidden_states=torch.randn(b, txt, 4096, generator=g),
            pooled_projections=torch.randn(b, 768, generator=g),
            timestep=torch.rand(b, generator=g), guidance=torch.full((b,), 3.5),
            img_ids=torch.stack([torch.zeros(img), rows // tokens_side,
                                 rows % tokens_side], -1).float(),
            txt_ids=torch.zeros(txt, 3), return_dict=False)

    return model, [call(i) for i in range(calls)]


def build(config: str, tokens_side: int, calls: int, meta: bool):
    """(model, calib): ``flux``, or ``DEPTHxHEADS`` PixArt-α-shaped (72 · heads wide);
    random weights, or none (``meta``: parameters on meta, buffers real)."""
    from accelerate import init_empty_weights
    from pixart_like import pixart_like

    def make():
        if config == "flux":
            return flux_size(tokens_side, calls)
        depth, heads = map(int, config.split("x"))
        return pixart_like(depth, heads, tokens_side, calls=calls)

    if not meta:
        return make()
    with init_empty_weights():
        return make()


def write_random_checkpoint(model: torch.nn.Module, path: Path,
                            dtype: torch.dtype | None = None) -> None:
    """A safetensors file of ``model``'s tensors (meta ones random, std 0.02, as the
    models' init; floating ones stored in ``dtype`` when given), written one tensor at a
    time so the model is never held whole."""
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    header, offset = {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": next(k for k, v in DTYPES.items() if v == t.dtype),
                        "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in state.values():
            if t.device.type == "meta":
                t = (torch.randn(t.shape, generator=g) * 0.02).to(t.dtype)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def worker(args: argparse.Namespace) -> dict:
    import clq_compile as clq
    from clq_compile.api import plan_model
    from clq_compile.checkpoint import block_weight_bytes
    from clq_compile.cli import parse_options

    torch.set_num_threads(args.threads)
    model, calib = build(args.config, args.tokens_side, args.calls, meta=True)
    sizes = {n: p.numel() * p.element_size() for n, p in model.state_dict().items()}
    # export imports much of torch on first use: not the model's memory
    torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    base = reset_peak()
    t0 = time.perf_counter()
    options = dict(recipe=args.recipe, bits="w4a4", **parse_options(args.option))
    if args.mode == "plan":
        _, plan = plan_model(model, calib, checkpoint=args.ckpt, measure=True, **options)
        out = None
    else:
        if args.mode == "loaded":
            from safetensors.torch import load_file

            model.load_state_dict(load_file(args.ckpt), assign=True)
            qm = clq.quantize(model, calib, extra_shapes=None, **options)
        else:
            qm = clq.quantize(model, calib, extra_shapes=None, checkpoint=args.ckpt, **options)
        plan = qm.plan
    wall = time.perf_counter() - t0
    top = peak()
    if args.mode != "plan":
        out = qm(**calib[0])[0]
    row = dict(mode=args.mode, config=args.config, recipe=args.recipe, calls=args.calls,
               model_mib=sum(sizes.values()) / 2**20,
               block_mib=block_weight_bytes(sizes) / 2**20,
               calib_act_mib=plan.meta.get("calib_peak_bytes", 0) / 2**20,
               peak_mib=(top - base) / 2**20, seconds=round(wall, 1),
               reads=plan.meta.get("checkpoint", {}).get("reads"))
    if out is not None:
        row["output_mib"] = qm.weight_bytes() / 2**20
        torch.save(out, args.save_output)
    return row


def start_mode(mode: str, args: argparse.Namespace, tmp: Path) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", mode, "--ckpt", str(args.ckpt_path),
           "--config", args.config, "--recipe", args.recipe, "--calls", str(args.calls),
           "--tokens-side", str(args.tokens_side), "--threads", str(args.threads),
           "--save-output", str(tmp / f"{mode}.pt")]
    cmd += [a for kv in args.option for a in ("-o", kv)]
    # a fixed mmap threshold: freed blocks go back to the OS, so VmHWM is what was live
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    # files, not pipes: a worker running beside another cannot block on a full pipe
    with open(tmp / f"{mode}.out", "w") as out, open(tmp / f"{mode}.err", "w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)


def finish_mode(mode: str, proc: subprocess.Popen, tmp: Path) -> dict:
    if proc.wait():
        raise SystemExit(f"{mode} failed:\n{(tmp / f'{mode}.err').read_text()[-4000:]}")
    return json.loads((tmp / f"{mode}.out").read_text().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="28x16",
                    help="DEPTHxHEADS (PixArt-α-shaped, width 72·heads) or flux")
    ap.add_argument("--recipe", default="clq")
    ap.add_argument("-o", "--option", action="append", default=None, metavar="KEY=VALUE",
                    help="recipe option (default: -o clps=False)")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--tokens-side", type=int, default=16, help="16: 256 image tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-dtype", choices=["bfloat16", "float16"],
                    help="store the checkpoint in this dtype (read back into fp32)")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--parallel", action="store_true",
                    help="run the modes side by side (peaks stay per process; seconds then "
                         "share the cores and are not comparable)")
    ap.add_argument("--out", default=str(RESULTS / "big_model.json"))
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--save-output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.option is None:
        args.option = ["clps=False"] if args.recipe == "clq" else []
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        args.ckpt_path = tmp / "model.safetensors"
        write_random_checkpoint(build(args.config, args.tokens_side, 1, meta=True)[0],
                                args.ckpt_path, getattr(torch, args.ckpt_dtype or "", None))
        if args.parallel:  # each mode still in its own process, so each peak is its own
            procs = [(m, start_mode(m, args, tmp)) for m in args.modes]
            rows = [finish_mode(m, p, tmp) for m, p in procs]
        else:
            rows = [finish_mode(m, start_mode(m, args, tmp), tmp) for m in args.modes]
        outs = {m: torch.load(tmp / f"{m}.pt") for m in args.modes if m != "plan"}
        same = None
        if len(outs) == 2:
            same = torch.equal(outs["checkpoint"], outs["loaded"])
    for r in rows:
        # the issue's bound on calibration memory: two blocks' weights + their activations
        r["bound_mib"] = 2 * r["block_mib"] + r["calib_act_mib"]
    payload = {
        "benchmark": "big_model", "date": datetime.date.today().isoformat(),
        "cpu": cpu_info(), "torch": torch.__version__, "config": args.config,
        "tokens": args.tokens_side ** 2, "recipe": args.recipe, "options": args.option,
        "checkpoint_dtype": args.ckpt_dtype or "the model's",
        "outputs_equal": same, "rows": rows,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(tabulate(rows, headers="keys", floatfmt=".1f"))
    print(f"outputs equal: {same}; wrote {args.out}")


if __name__ == "__main__":
    main()
