"""End-to-end latency and weight memory of a PixArt-α-size transformer (CUDA only).

diffusers ``PixArtTransformer2DModel`` at its PixArt-α 1024 configuration (28 blocks,
hidden 1152 = 16 heads × 72, MLP 4608, 128×128 latent with patch 2 = 4096 image tokens,
120 T5 tokens of 4096 channels), random weights, batch 2, one denoising forward:

- bf16 eager, bf16 ``torch.compile``;
- clq W4A4 via ``clq_compile.quantize(model, calib, recipe="rtn", bits="w4a4")`` whose
  graph holds ``torch.ops.clq`` nodes served by the Triton kernels on CUDA;
- clq W4A4 under ``torch.compile`` (attempted; the error is recorded if it fails).

Per row: median latency, speed vs bf16 eager, weight bytes, peak memory of a forward,
and the output SQNR vs bf16 eager (a sanity check on random weights, not a quality
claim). A method that fails records its error instead of numbers.

    python benchmarks/e2e.py [--batch 2] [--rep-ms 3000]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_ms, import_kernels, require_cuda, write_results  # noqa: E402

from clq_compile.qlinear import sqnr  # noqa: E402


def build_model(dev: torch.device) -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
        num_layers=28, cross_attention_dim=1152, sample_size=128, patch_size=2,
        caption_channels=4096, num_embeds_ada_norm=1000,
    )
    return model.to(device=dev, dtype=torch.bfloat16).eval()


def make_inputs(dev: torch.device, batch: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator(device=dev).manual_seed(seed)
    bf16 = torch.bfloat16
    return dict(
        hidden_states=torch.randn(batch, 4, 128, 128, device=dev, dtype=bf16, generator=g),
        encoder_hidden_states=torch.randn(batch, 120, 4096, device=dev, dtype=bf16, generator=g),
        timestep=torch.full((batch,), 500, device=dev, dtype=torch.long),
        added_cond_kwargs={
            "resolution": torch.tensor([[1024.0, 1024.0]] * batch, device=dev, dtype=bf16),
            "aspect_ratio": torch.tensor([[1.0]] * batch, device=dev, dtype=bf16),
        },
        return_dict=False,
    )


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _clq_nodes(qm: Any) -> int:
    gm = getattr(qm, "graph_module", None)
    if gm is None:
        return 0
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_function" and str(n.target).startswith("clq."))


def measure(name: str, fn: Callable[[], Any], ref: torch.Tensor | None, rep_ms: int,
            extra: dict[str, Any]) -> dict[str, Any]:
    """Latency, peak memory and SQNR of one method; an exception becomes the row's error."""
    row: dict[str, Any] = {"method": name, **extra}
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = _output(fn())
        torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0  # includes compilation if any
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        with torch.inference_mode():
            row["ms"] = bench_ms(fn, warmup_ms=max(rep_ms // 4, 200), rep_ms=rep_ms)
        row["sqnr_db_vs_bf16"] = sqnr(ref, out) if ref is not None else None
        row["_out"] = out
    except Exception as e:  # a benchmark records what failed and goes on
        logging.getLogger("e2e").error("%s failed:\n%s", name, traceback.format_exc())
        row["error"] = repr(e)[:500]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rep-ms", type=int, default=3000)
    p.add_argument("--skip-compile", action="store_true", help="skip torch.compile rows")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dev = require_cuda("benchmarks/e2e.py")
    _, _, dispatch = import_kernels()
    dispatch.register()
    import clq_compile as clq

    model = build_model(dev)
    inputs = make_inputs(dev, args.batch)
    bf16_bytes = _state_bytes(model)
    rows = [measure("bf16 eager", lambda: model(**inputs), None, args.rep_ms,
                    {"weight_mib": bf16_bytes / 2**20})]
    ref = rows[0].get("_out")
    if not args.skip_compile:
        compiled = torch.compile(model)
        rows.append(measure("bf16 torch.compile", lambda: compiled(**inputs), ref, args.rep_ms,
                            {"weight_mib": bf16_bytes / 2**20}))

    t0 = time.perf_counter()
    try:
        calib = [make_inputs(dev, args.batch, seed=s) for s in (1, 2)]
        qm = clq.quantize(model, calib, recipe="rtn", bits="w4a4")
        extra = {"quantize_s": time.perf_counter() - t0, "clq_nodes": _clq_nodes(qm),
                 "weight_mib": (qm.weight_bytes() if hasattr(qm, "weight_bytes")
                                else _state_bytes(qm)) / 2**20}
        rows.append(measure("clq W4A4 (rtn, Triton)", lambda: qm(**inputs), ref, args.rep_ms,
                            extra))
        if not args.skip_compile:
            cq = torch.compile(qm)
            rows.append(measure("clq W4A4 (rtn) + torch.compile", lambda: cq(**inputs), ref,
                                args.rep_ms, dict(extra)))
    except Exception as e:
        logging.getLogger("e2e").error("clq.quantize failed:\n%s", traceback.format_exc())
        rows.append({"method": "clq W4A4 (rtn, Triton)", "error": repr(e)[:500]})

    base = rows[0].get("ms")
    for r in rows:
        r.pop("_out", None)
        if base and r.get("ms"):
            r["x_vs_bf16_eager"] = base / r["ms"]
    write_results("e2e", rows, {
        "model": "PixArtTransformer2DModel, PixArt-alpha 1024 config, random weights",
        "batch": args.batch, "image_tokens": 4096, "text_tokens": 120,
        "timing": f"triton.testing.do_bench median, {args.rep_ms} ms of repetitions",
        "sqnr_note": "random weights: a sanity check that the quantized graph computes the "
                     "same function, not a quality result",
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
