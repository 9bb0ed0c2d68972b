"""Quality harness: how much does quantizing the shapes DiT hurt what it draws?

For a fixed set of captions x seeds, every method samples from the same initial noise as
the full-precision (FP) model, and we report

- ShapeEval: fraction of samples whose shape, colour and position all match the caption,
  per the judge (task-level quality, what a user sees);
- PSNR (dB) of each sample against the FP sample of the same seed (how far the trajectory
  drifted);
- FP agreement: fraction of samples the judge reads exactly as it reads the FP sample of
  the same seed. While FP itself misses the caption on some samples, ShapeEval cannot
  tell a method that keeps FP's drawings from one that swaps which samples are wrong;
  agreement can;
- SQNR (dB) of the transformer output against FP on transformer inputs recorded during FP
  sampling (the raw numerical error, independent of the sampler).

Methods are *factories*: ``factory(calib) -> transformer``. They receive calibration calls
recorded from FP sampling of prompts disjoint from the evaluation prompts, so e.g.
``lambda calib: clq.quantize(fp, calib, recipe="rtn", bits="w4a4")`` plugs in directly.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tabulate import tabulate

from clq_compile.api import quantize
from clq_compile.eval.judge import ShapeJudge, accuracy, labels_of, margins_of
from clq_compile.eval.sampler import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    Transformer,
    clone_call,
    record_calibration,
    sample,
)
from clq_compile.eval.shapes_data import all_labels, caption
from clq_compile.eval.shapes_model import CaptionEncoder
from clq_compile.qlinear import sqnr as sqnr_db  # the one SQNR (float64); dB

log = logging.getLogger(__name__)

Factory = Callable[[list[dict[str, Any]]], Transformer]
MethodKey = tuple[str, str]  # (method name, bits)
FP_KEY: MethodKey = ("fp32", "fp32")


def prompts(n: int, seed: int) -> tuple[list[str], list[int], torch.Tensor]:
    """``n`` captions covering the 96 attribute combinations evenly (seeded order), one seed
    each. Returns ``(captions, seeds, labels (n, 3))``."""
    combos = all_labels()
    g = torch.Generator().manual_seed(seed)
    reps = math.ceil(n / len(combos))
    order = torch.cat([torch.randperm(len(combos), generator=g) for _ in range(reps)])[:n]
    labels = combos[order]
    captions = [caption(*row) for row in labels.tolist()]
    seeds = [seed * 100_003 + i for i in range(n)]
    return captions, seeds, labels


def sample_psnr_db(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """PSNR of each sample (images in [0, 1]); identical samples count as 100 dB."""
    mse = (ref - out).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def psnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over samples of per-sample PSNR (the 100 dB cap keeps one exact match from
    making the mean infinite)."""
    return sample_psnr_db(ref, out).mean().item()


@torch.no_grad()
def output_sqnr(reference: Transformer, model: Transformer,
                calls: Sequence[dict[str, Any]]) -> float:
    """SQNR of ``model``'s output against ``reference``'s over all ``calls`` together."""
    refs, outs = [], []
    for kwargs in calls:
        refs.append(reference(**kwargs)[0].float())
        outs.append(model(**kwargs)[0].float())
    return sqnr_db(torch.cat(refs), torch.cat(outs))


class NoisyTransformer(torch.nn.Module):
    """The FP transformer plus white Gaussian noise on its output at a set SQNR per call (a
    control row: an error of known size and no structure, to read how far FP agreement
    moves under an error that is not quantization). Seeded, so rows repeat."""

    def __init__(self, transformer: torch.nn.Module, sqnr_db: float, seed: int = 0) -> None:
        super().__init__()
        self.inner, self.sqnr_db = transformer, sqnr_db
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        out, *rest = self.inner(**kwargs)
        noise = torch.randn(out.shape, generator=self.generator).to(out)
        scale = out.float().pow(2).mean().sqrt() * 10 ** (-self.sqnr_db / 20)
        return (out + noise * scale.to(out.dtype), *rest)


class CastTransformer(torch.nn.Module):
    """Runs a copy of a transformer in another dtype behind the fp32 call signature (a sanity
    row: a lower-precision float model that needs no quantizer)."""

    def __init__(self, transformer: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = copy.deepcopy(transformer).to(dtype)
        self.dtype = dtype

    def forward(self, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        cast = {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v for k, v in kwargs.items()}
        out = self.inner(**cast)
        return tuple(o.float() for o in out)


@dataclass
class MethodResult:
    method: str
    bits: str
    shapeeval: float
    attribute_accuracy: dict[str, float]
    psnr_db: float | None
    fp_agreement: float | None
    sqnr_db: float | None
    sqnr_calib_db: float | None
    build_s: float
    sample_s: float
    # the samples the judge reads otherwise than FP's, and each one's PSNR vs FP (a flip
    # with a low PSNR is a trajectory that went elsewhere, not a blurred drawing)
    fp_disagree: list[int] | None = None
    disagree_psnr_db: list[float] | None = None
    # for each of those, the FP image's judge margin on the attribute that flipped (top-1
    # minus top-2 probability, the least over flipped attributes) and its rank among all
    # samples' margins on that attribute (0: the FP reading nearest a tie)
    disagree_fp_margin: list[float] | None = None
    disagree_fp_rank: list[int] | None = None


@dataclass
class Report:
    results: list[MethodResult]
    config: dict[str, Any]
    images: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def table(self) -> str:
        """Method x bits table: one row per method, a column group per bit width."""
        bits_order = list(dict.fromkeys(r.bits for r in self.results))
        methods = list(dict.fromkeys(r.method for r in self.results))
        by_key = {(r.method, r.bits): r for r in self.results}
        headers = ["method"]
        for b in bits_order:
            headers += [f"{b} ShapeEval", f"{b} PSNR", f"{b} SQNR"]
        rows = []
        for m in methods:
            row: list[Any] = [m]
            for b in bits_order:
                r = by_key.get((m, b))
                row += ["", "", ""] if r is None else [
                    f"{100 * r.shapeeval:.1f}%", _fmt_db(r.psnr_db), _fmt_db(r.sqnr_db)]
            rows.append(row)
        return tabulate(rows, headers=headers, tablefmt="github")

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "results": [asdict(r) for r in self.results]}


def _fmt_db(x: float | None) -> str:
    return "-" if x is None or math.isinf(x) else f"{x:.1f} dB"


def _finite(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else x


def spread_steps(steps: int, n: int = 5) -> list[int]:
    """``n`` sampling steps spread evenly over a trajectory of ``steps``."""
    return sorted({round(i * (steps - 1) / (n - 1)) for i in range(n)})


def calibration_calls(transformer: torch.nn.Module, encoder: CaptionEncoder, n_prompts: int = 8,
                      seed: int = 0, *, steps: int = DEFAULT_STEPS,
                      at_steps: Sequence[int] | None = None,
                      guidance_scale: float = DEFAULT_GUIDANCE,
                      batch_size: int = 32) -> list[dict[str, Any]]:
    """The shapes DiT's calibration set: its real inputs while sampling ``n_prompts``
    prompts (disjoint from the evaluation prompts of ``seed``) at ``at_steps``."""
    captions, seeds, _ = prompts(n_prompts, seed + 1)
    return record_calibration(transformer, encoder, captions, seeds,
                              at_steps=spread_steps(steps) if at_steps is None else at_steps,
                              steps=steps, guidance_scale=guidance_scale, batch_size=batch_size)


def evaluate(transformer: torch.nn.Module, encoder: CaptionEncoder, judge: ShapeJudge,
             methods: Mapping[MethodKey, Factory] | None = None, *, n_samples: int = 64,
             seed: int = 0, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
             n_calib_prompts: int = 8, calib_steps: Sequence[int] | None = None,
             batch_size: int = 32, out_dir: str | Path | None = None,
             grid_columns: Sequence[str] | None = None, progress: bool = True) -> Report:
    """Sample FP and every method on the same captions x seeds and score them.

    ``methods`` maps ``(name, bits)`` to a factory called once with the calibration calls.
    ``calib_steps`` defaults to 5 steps spread over the trajectory. With ``out_dir``, writes
    ``results.json``, ``table.md`` and ``grid.png`` there; ``grid_columns`` ("name bits")
    picks the grid's columns after FP (default: every method).
    """
    captions, seeds, labels = prompts(n_samples, seed)
    if calib_steps is None:
        calib_steps = spread_steps(steps)
    calib = calibration_calls(transformer, encoder, n_calib_prompts, seed, steps=steps,
                              at_steps=calib_steps, guidance_scale=guidance_scale,
                              batch_size=batch_size)
    # Held-out transformer inputs: recorded from FP sampling of the evaluation prompts.
    held_out: list[dict[str, Any]] = []
    keep = set(calib_steps)

    def recorder(step: int, kwargs: dict[str, Any]) -> None:
        if step in keep:
            held_out.append(clone_call(kwargs))

    common = dict(steps=steps, guidance_scale=guidance_scale, batch_size=batch_size,
                  progress=progress)
    t0 = time.time()
    fp_images = sample(transformer, encoder, captions, seeds, recorder=recorder, **common)
    fp_s = time.time() - t0
    fp_logits = judge.logits(fp_images)  # one judge pass: labels and margins
    fp_read, fp_margin = labels_of(fp_logits), margins_of(fp_logits)  # (N, 3) each
    fp_rank = fp_margin.argsort(dim=0, stable=True).argsort(dim=0, stable=True)
    results = [MethodResult(FP_KEY[0], FP_KEY[1], *_score(fp_read, labels), None, None,
                            None, None, 0.0, fp_s)]
    images = {FP_KEY[0]: fp_images}
    for (name, bits), factory in (methods or {}).items():
        log.info("building %s @ %s", name, bits)
        t0 = time.time()
        model = factory(calib)
        build_s = time.time() - t0
        t0 = time.time()
        imgs = sample(model, encoder, captions, seeds, **common)
        sample_s = time.time() - t0
        read = judge.predict(imgs)
        agree = (read == fp_read).all(dim=1)
        psnr = sample_psnr_db(fp_images, imgs)
        flips = (~agree).nonzero().flatten().tolist()
        at = [int(torch.where(read[i] != fp_read[i], fp_margin[i], 2.0).argmin()) for i in flips]
        results.append(MethodResult(
            name, bits, *_score(read, labels), psnr.mean().item(),
            agree.float().mean().item(),
            _finite(output_sqnr(transformer, model, held_out)),
            _finite(output_sqnr(transformer, model, calib)), build_s, sample_s,
            flips, [round(psnr[i].item(), 2) for i in flips],
            [round(fp_margin[i, a].item(), 4) for i, a in zip(flips, at, strict=True)],
            [int(fp_rank[i, a]) for i, a in zip(flips, at, strict=True)]))
        images[f"{name} {bits}"] = imgs
    config = {"n_samples": n_samples, "seed": seed, "steps": steps,
              "guidance_scale": guidance_scale, "n_calib_prompts": n_calib_prompts,
              "calib_steps": list(calib_steps), "calib_calls": len(calib),
              "held_out_calls": len(held_out), "torch": torch.__version__}
    report = Report(results, config, images)
    if out_dir is not None:
        write_outputs(report, Path(out_dir), grid_columns)
    return report


def _score(read: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, float]]:
    acc = accuracy(read, labels)
    return acc.pop("joint"), acc


def write_outputs(report: Report, out_dir: Path, grid_columns: Sequence[str] | None = None,
                  grid_samples: int = 16) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (out_dir / "table.md").write_text(report.table() + "\n")
    images = report.images
    if grid_columns is not None:
        missing = [c for c in grid_columns if c not in images]
        if missing:
            raise KeyError(f"grid columns {missing} not among the methods {list(images)}")
        images = {FP_KEY[0]: images[FP_KEY[0]], **{c: images[c] for c in grid_columns}}
    save_grid(images, out_dir / "grid.png", grid_samples)


def save_grid(images: Mapping[str, torch.Tensor], path: Path, n: int = 16,
              scale: int = 3) -> None:
    """PNG with one column per method (FP first) and one row per sample (same seed)."""
    names = list(images)
    n = min(n, min(len(v) for v in images.values()))
    cell, pad, header = 32 * scale, 4, 16
    width = len(names) * (cell + pad) + pad
    height = header + n * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        x = pad + c * (cell + pad)
        draw.text((x, 2), name[: cell // 6], fill=(0, 0, 0))
        pixels = (images[name][:n].clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
        for r in range(n):
            tile = Image.fromarray(pixels[r].numpy()).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (x, header + pad + r * (cell + pad)))
    canvas.save(path)


def quantize_methods(recipes: Sequence[str], bits: Sequence[str],
                     transformer: torch.nn.Module, **options: Any) -> dict[MethodKey, Factory]:
    """Factories for ``clq_compile.quantize(transformer, calib, recipe=r, bits=b)`` over all
    recipe x bits pairs."""
    def factory(recipe: str, b: str) -> Factory:
        return lambda calib: quantize(transformer, calib, recipe=recipe, bits=b, **options)

    return {(r, b): factory(r, b) for r in recipes for b in bits}
