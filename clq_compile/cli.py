"""``clq`` (also ``python -m clq_compile``): quantize, inspect, export, sample and evaluate
from the shell.

    clq quantize --out q/                       # the committed shapes DiT, clq W4A4
    torchrun --nproc-per-node 2 -m clq_compile quantize --out q/   # work split over 2 ranks
    clq inspect q/
    clq export-onnx q/ q.onnx --target ort-cpu
    clq sample q/ --prompt "red circle top-left" --out grid.png
    clq eval q/ --samples 64

``quantize`` calibrates on the shapes DiT's own inputs recorded while sampling prompts;
``sample`` and ``eval`` need the full-precision model the quantized one came from, which
the saved directory names (a shapes-DiT checkpoint).

A user mistake (a count below 1, an unknown caption word, a bad option, a missing or
malformed directory) is one line on stderr, ``clq VERB: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from clq_compile.errors import ClqError, ConfigError

log = logging.getLogger("clq_compile.cli")

BUILTIN = "builtin:shapes_dit"
# A smaller CLPS search (9 clip pairs on 2 calls instead of 30 on 4): the clq plan of the
# shapes DiT in seconds instead of a minute, for a first look.
FAST = {"w_grid": (1.0, 0.9, 0.8), "a_grid": (1.0, 0.9, 0.8), "clps_samples": 2}


def _value(text: str) -> Any:
    """An option value from the shell: a Python literal, a comma list, or a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if "," in text:
        return tuple(_value(t) for t in text.split(","))
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def positive_int(text: str) -> int:
    """argparse type of a count (prompts, steps, samples, seeds, threads): at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count: give 1 or more")
    return value


def seed_int(text: str) -> int:
    """argparse type of a seed: an integer in [0, 2**32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is not a seed: give 0 to 2**32 - 1")
    return value


def shapes_caption(text: str) -> str:
    """argparse type of a shapes-DiT caption: what ``tokenize`` takes, checked before any
    model is loaded or sampled."""
    from clq_compile.eval.shapes_data import tokenize

    try:
        tokenize([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def image_out(text: str) -> Path:
    """argparse type of an image to write: a format PIL writes (by its suffix) into an
    existing directory, checked before any sampling."""
    from PIL import Image

    path = Path(text)
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if path.suffix.lower() not in writable:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no image suffix PIL writes (e.g. .png, .jpg)")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: directory {str(path.parent)!r} not found")
    return path


def directory_out(text: str) -> Path:
    """argparse type of a directory to write into (made if missing): not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a directory")
    return path


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"option {pair!r} is not KEY=VALUE (e.g. -o w_grid=1.0,0.9)")
        out[key.replace("-", "_")] = _value(value)
    return out


def _shapes_dit(checkpoint: str | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    from clq_compile.eval import load_shapes_dit

    return load_shapes_dit(None if checkpoint in (None, BUILTIN) else checkpoint)


def _source_checkpoint(qm: Any, path: Path) -> str:
    ckpt = qm.source.get("checkpoint")
    if ckpt is None:
        raise ConfigError(
            f"{path} was not quantized from a shapes-DiT checkpoint (it came from "
            f"{qm.source.get('class', 'an unknown model')}): sample and eval need the "
            "full-precision shapes DiT it came from")
    return ckpt


def cmd_quantize(args: argparse.Namespace) -> int:
    from clq_compile.shard import process_group_from_env

    with process_group_from_env() as shard:  # under torchrun: the work split across ranks
        return _quantize(args, shard.rank, shard.world > 1)


def _quantize(args: argparse.Namespace, rank: int, distributed: bool) -> int:
    import clq_compile as clq
    from clq_compile.build import resolve
    from clq_compile.eval import calibration_calls
    from clq_compile.qlinear import sqnr
    from clq_compile.serialize import check_save_target

    t0 = time.perf_counter()
    options = {**(FAST if args.budget == "fast" else {}), **parse_options(args.option)}
    resolve(args.recipe, args.bits, **options)  # a bad option fails before any sampling
    check_save_target(args.out)  # and so does an --out that save would refuse
    transformer, encoder = _shapes_dit(args.checkpoint)
    log.info("recording calibration: %d prompts x %d steps", args.calib_prompts, args.calib_steps)
    at = sorted({round(i * (args.steps - 1) / max(args.calib_steps - 1, 1))
                 for i in range(args.calib_steps)})
    calib = calibration_calls(transformer, encoder, args.calib_prompts, args.seed,
                              steps=args.steps, at_steps=at)
    t1 = time.perf_counter()
    qm = clq.quantize(transformer, calib, recipe=args.recipe, bits=args.bits,
                      distributed=distributed, **options)
    qm.source["checkpoint"] = args.checkpoint or BUILTIN
    t2 = time.perf_counter()
    if rank:  # every rank holds the same model; rank 0 saves and reports
        return 0
    qm.save(args.out)
    with torch.no_grad():
        db = sqnr(torch.cat([transformer(**c)[0] for c in calib]),
                  torch.cat([qm(**c)[0] for c in calib]))
    print(clq.inspect(qm).splitlines()[-1])
    print(f"output SQNR on the calibration calls: {db:.1f} dB")
    print(f"calibration {t1 - t0:.1f} s, quantize {t2 - t1:.1f} s, total "
          f"{time.perf_counter() - t0:.1f} s; saved {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import clq_compile as clq

    print(clq.inspect(clq.load(args.dir), tablefmt=args.format))
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    import clq_compile as clq

    path = clq.export_onnx(clq.load(args.dir), args.out, target=args.target)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, target {args.target})")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import clq_compile as clq
    from clq_compile.eval import psnr_db, sample, save_grid

    qm = clq.load(args.dir)
    transformer, encoder = _shapes_dit(_source_checkpoint(qm, args.dir))
    prompts = args.prompt * args.seeds
    seeds = [args.seed + i for i in range(args.seeds) for _ in args.prompt]
    common = dict(steps=args.steps, guidance_scale=args.guidance)
    fp = sample(transformer, encoder, prompts, seeds, **common)
    q = sample(qm, encoder, prompts, seeds, **common)
    name = f"{qm.plan.recipe} {qm.plan.spec.name}"
    save_grid({"fp32": fp, name: q}, Path(args.out), n=len(prompts))
    print(f"wrote {args.out}: FP beside {name}, {len(prompts)} samples, "
          f"PSNR vs FP {psnr_db(fp, q):.1f} dB")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import clq_compile as clq
    from clq_compile.eval import evaluate, load_judge

    qm = clq.load(args.dir)
    transformer, encoder = _shapes_dit(_source_checkpoint(qm, args.dir))
    name = (qm.plan.recipe, qm.plan.spec.name)
    report = evaluate(transformer, encoder, load_judge(), {name: lambda calib: qm},
                      n_samples=args.samples, seed=args.seed, steps=args.steps,
                      out_dir=args.out)
    print(report.table())
    r = report.results[-1]
    print(json.dumps({"shapeeval": r.shapeeval, "fp_agreement": r.fp_agreement,
                      "psnr_db": r.psnr_db, "sqnr_db": r.sqnr_db}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="clq", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize the shapes DiT and save it",
                       description="Quantize a shapes-DiT checkpoint (default: the committed "
                       "one) on inputs recorded while sampling, and save it to --out.")
    q.add_argument("--checkpoint", default=None,
                   help="shapes-DiT checkpoint directory (default: the committed one)")
    q.add_argument("--recipe", default="clq", help="rtn, smoothquant, quarot, clq (default)")
    q.add_argument("--bits", default="w4a4", help="w4a4 (default), w4a8, w8a8, w4a16")
    q.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe option, repeatable (e.g. -o clps=false -o a_group=64)")
    q.add_argument("--budget", choices=["full", "fast"], default="full",
                   help=f"fast: a smaller CLPS search {FAST}")
    q.add_argument("--calib-prompts", type=positive_int, default=8)
    q.add_argument("--calib-steps", type=positive_int, default=5,
                   help="sampling steps recorded per prompt, spread over the trajectory")
    q.add_argument("--steps", type=positive_int, default=20, help="sampling steps")
    q.add_argument("--seed", type=seed_int, default=0)
    q.add_argument("--out", type=Path, required=True, help="directory to save the model to")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="per-layer table of a saved model")
    i.add_argument("dir", type=Path)
    i.add_argument("--format", default="simple", help="tabulate format (simple, github, ...)")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export-onnx", help="write a saved model as ONNX")
    e.add_argument("dir", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--target", choices=["qdq", "ort-cpu"], default="qdq")
    e.set_defaults(func=cmd_export_onnx)

    s = sub.add_parser("sample", help="FP beside quantized samples, same seeds, as a PNG")
    s.add_argument("dir", type=Path)
    s.add_argument("--prompt", action="append", required=True, type=shapes_caption,
                   help='a caption such as "red circle top-left", repeatable')
    s.add_argument("--seeds", type=positive_int, default=4, help="samples per prompt")
    s.add_argument("--seed", type=seed_int, default=0)
    s.add_argument("--steps", type=positive_int, default=20)
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--out", type=image_out, default=Path("grid.png"))
    s.set_defaults(func=cmd_sample)

    v = sub.add_parser("eval", help="the quality harness's metrics for a saved model")
    v.add_argument("dir", type=Path)
    v.add_argument("--samples", type=positive_int, default=64)
    v.add_argument("--seed", type=seed_int, default=0)
    v.add_argument("--steps", type=positive_int, default=20)
    v.add_argument("--out", type=directory_out, default=None,
                   help="write results.json, table.md and grid.png here")
    v.set_defaults(func=cmd_eval)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ClqError, OSError) as e:  # OSError: a path the user named (missing, unwritable)
        print(f"clq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
