"""End-to-end latency and weight memory of a PixArt-α-size transformer (CUDA only).

diffusers ``PixArtTransformer2DModel`` at its PixArt-α 1024 configuration (28 blocks,
hidden 1152 = 16 heads × 72, MLP 4608, 128×128 latent with patch 2 = 4096 image tokens,
120 T5 tokens of 4096 channels), random weights, batch 2, one denoising forward:

- bf16 eager (also replayed as a CUDA graph), bf16 ``torch.compile``;
- W4A4 via ``clq_compile.quantize(model, calib, recipe=..., bits="w4a4")`` for rtn,
  quarot and clq (transforms included), whose graphs hold ``torch.ops.clq`` nodes served
  by the Triton kernels on CUDA, eager and as a CUDA graph (launch overhead removed),
  the top kernels of each by device time (profiler); last (so that a stage time limit
  cuts only them), the ``--compile-method`` model (default clq: the issue's goal row)
  under ``torch.compile`` (its ops lowered to the kernels, compiled by Inductor) and the
  ``clq`` backend (rtn, Inductor, reduce-overhead).

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
import common  # noqa: E402
from common import bench_ms, import_kernels, require_cuda, write_results  # noqa: E402

from clq_compile.qlinear import sqnr  # noqa: E402

# PixArt-α 1024; the dry run's tiny twin keeps every code path at toy sizes.
CONFIGS = {
    "pixart-alpha-1024": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28,
                              cross_attention_dim=1152, sample_size=128, caption_channels=4096,
                              text_tokens=120),
    "dry-run": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2,
                    cross_attention_dim=32, sample_size=8, caption_channels=32, text_tokens=4),
}


def build_model(dev: torch.device, config: str = "pixart-alpha-1024") -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    c = {k: v for k, v in CONFIGS[config].items() if k != "text_tokens"}
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(in_channels=4, out_channels=8, patch_size=2,
                                     num_embeds_ada_norm=1000, **c)
    return model.to(device=dev, dtype=torch.bfloat16).eval()


def make_inputs(dev: torch.device, batch: int, seed: int = 0,
                config: str = "pixart-alpha-1024") -> dict[str, Any]:
    c = CONFIGS[config]
    g = torch.Generator(device=dev).manual_seed(seed)
    bf16 = torch.bfloat16
    side, text, chans = c["sample_size"], c["text_tokens"], c["caption_channels"]
    return dict(
        hidden_states=torch.randn(batch, 4, side, side, device=dev, dtype=bf16, generator=g),
        encoder_hidden_states=torch.randn(batch, text, chans, device=dev, dtype=bf16,
                                          generator=g),
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


def measure(name: str, fn: Callable[[], Any], ref: torch.Tensor | None, rep_ms: int,
            extra: dict[str, Any]) -> dict[str, Any]:
    """Latency, peak memory and SQNR of one method; an exception becomes the row's error."""
    row: dict[str, Any] = {"method": name, **extra}
    try:
        t0 = time.perf_counter()
        cuda = torch.cuda.is_available() and not common.DRY_RUN
        with torch.inference_mode():
            out = _output(fn())
        if cuda:
            torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0  # includes compilation if any
        if cuda:
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


# (row name, recipe, options): the runtime graph is what is timed, so clq runs with its
# search off (clps=False, cbc="none"): the same transform + quantized-linear nodes as the
# full recipe, with different clip values, in seconds instead of a full calibration.
METHODS = [
    ("rtn", "rtn", {}),
    ("quarot", "quarot", {}),
    ("clq (search off)", "clq", {"clps": False, "cbc": "none"}),
]


def cuda_graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once into a CUDA graph (after two warm-up calls on a side stream,
    which also finish autotuning); the returned callable replays it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> Any:
        graph.replay()
        return out

    return replay


def top_kernels(fn: Callable[[], Any], n: int = 15) -> list[dict[str, Any]]:
    """The n kernels with the most device time over one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: -e.self_device_time_total)
    return [{"kernel": e.key[:120], "calls": e.count, "ms": e.self_device_time_total / 1e3,
             "share": e.self_device_time_total / total} for e in events[:n]]


def _with_graph(rows: list[dict[str, Any]], name: str, fn: Callable[[], Any], ref: Any,
                rep_ms: int, extra: dict[str, Any]) -> None:
    rows.append(measure(name, fn, ref, rep_ms, extra))
    if common.DRY_RUN:
        return
    try:
        with torch.inference_mode():
            graphed = cuda_graphed(fn)
    except Exception as e:
        rows.append({"method": f"{name} + CUDA graph", "error": repr(e)[:500]})
        return
    rows.append(measure(f"{name} + CUDA graph", graphed, ref, rep_ms, dict(extra)))


def _compiled_rows(rows: list[dict], model: torch.nn.Module, inputs: dict, ref: Any,
                   rep_ms: int, label: str, qm: Any, extra: dict) -> None:
    """torch.compile of the quantized model (kernels lowered, Inductor), then the
    backend path (Inductor around the clq ops, CUDA graphs, packing per call)."""
    for method, make, info in (
            (f"{label} + torch.compile", lambda: torch.compile(qm), extra),
            ("clq backend W4A4 rtn (Inductor, reduce-overhead)",
             lambda: torch.compile(model, backend="clq", fullgraph=True, options={
                 "recipe": "rtn", "bits": "w4a4", "mode": "reduce-overhead"}), {})):
        try:
            fn = make()
            rows.append(measure(method, lambda fn=fn: fn(**inputs), ref, rep_ms, dict(info)))
        except Exception as e:
            rows.append({"method": method, "error": repr(e)[:500]})
        write_results("e2e", [{k: v for k, v in r.items() if k != "_out"} for r in rows],
                      {}, partial=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rep-ms", type=int, default=3000)
    p.add_argument("--skip-compile", action="store_true", help="skip torch.compile rows")
    p.add_argument("--methods", nargs="*", default=[m[0] for m in METHODS])
    p.add_argument("--skip-clq-compile", action="store_true",
                   help="skip torch.compile of the quantized model (bf16 compile still runs)")
    p.add_argument("--compile-method", default=METHODS[-1][0],
                   choices=[m[0] for m in METHODS],
                   help="the quantized model also run under torch.compile")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU plumbing check: tiny PixArt, interpreter, no compile/graphs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dev = require_cuda("benchmarks/e2e.py", args.dry_run)
    config = "dry-run" if args.dry_run else "pixart-alpha-1024"
    if args.dry_run:
        args.skip_compile, args.rep_ms = True, 1
    _, _, dispatch = import_kernels()
    dispatch.register()
    import clq_compile as clq
    from clq_compile.lowering.triton import routes
    from clq_compile.lowering.triton.lower import lowered_ops

    model = build_model(dev, config)
    inputs = make_inputs(dev, args.batch, config=config)
    bf16_bytes = _state_bytes(model)
    bf16 = {"weight_mib": bf16_bytes / 2**20}
    rows: list[dict[str, Any]] = []
    _with_graph(rows, "bf16 eager", lambda: model(**inputs), None, args.rep_ms, bf16)
    ref = rows[0].get("_out")
    if not args.skip_compile:
        compiled = torch.compile(model)
        rows.append(measure("bf16 torch.compile", lambda: compiled(**inputs), ref, args.rep_ms,
                            dict(bf16)))

    profiles: dict[str, Any] = {}
    to_compile = None
    calib = [make_inputs(dev, args.batch, seed=s, config=config) for s in (1, 2)]
    for name, recipe, options in METHODS:
        if name not in args.methods:
            continue
        label = f"clq_compile W4A4 {name}"
        t0 = time.perf_counter()
        try:
            qm = clq.quantize(model, calib, recipe=recipe, bits="w4a4", extra_shapes=None,
                              **options)
        except Exception as e:
            logging.getLogger("e2e").error("%s failed:\n%s", label, traceback.format_exc())
            rows.append({"method": label, "error": repr(e)[:500]})
            continue
        if args.dry_run:
            qm.lower(None)  # what a model on a GPU does by itself (here: interpreter)
        extra = {"quantize_s": time.perf_counter() - t0,
                 # quant_linear / transform nodes of the graph (fewer: shared, fused)
                 "clq_nodes": lowered_ops(qm.graph_module),
                 # calls a GPU model left as clq ops (not lowered to the kernels), with why
                 "not_lowered": dict(getattr(qm, "declined", {})),
                 "weight_mib": (qm.weight_bytes() if hasattr(qm, "weight_bytes")
                                else _state_bytes(qm)) / 2**20}
        fallbacks_before = len(dispatch._fallbacks_logged)
        _with_graph(rows, label, lambda qm=qm: qm(**inputs), ref, args.rep_ms, extra)
        rows[-1]["fallback_shapes"] = len(dispatch._fallbacks_logged) - fallbacks_before
        rows[-1]["unpacked_weight_cache_mib"] = routes.weight_cache_bytes() / 2**20
        try:
            if not args.dry_run:
                with torch.inference_mode():
                    profiles[label] = top_kernels(lambda qm=qm: qm(**inputs))
        except Exception as e:
            profiles[label] = repr(e)[:300]
        write_results("e2e", [{k: v for k, v in r.items() if k != "_out"} for r in rows],
                      {"top_kernels": profiles}, partial=True)
        if name == args.compile_method:
            to_compile = (label, qm, extra)
        del qm
    if to_compile is not None and not args.skip_compile and not args.skip_clq_compile:
        _compiled_rows(rows, model, inputs, ref, args.rep_ms, *to_compile)

    base = rows[0].get("ms")
    for r in rows:
        r.pop("_out", None)
        if base and r.get("ms"):
            r["x_vs_bf16_eager"] = base / r["ms"]
    write_results("e2e", rows, {
        "model": f"PixArtTransformer2DModel, {config} config, random weights",
        "batch": args.batch, "image_tokens": 4096, "text_tokens": 120,
        "timing": f"triton.testing.do_bench median, {args.rep_ms} ms of repetitions",
        "sqnr_note": "random weights: a sanity check that the quantized graph computes the "
                     "same function, not a quality result",
        "routes": "lowering/triton/routes.py rule; fallback_shapes: shapes that ran the "
                  "reference instead of a kernel",
        "top_kernels": profiles,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
