"""ONNX on ORT's CPU EP: fp32 vs ORT's own int8 ``quantize_dynamic`` vs clq's "qdq" and
"ort-cpu" exports, on a PixArt-α-width transformer stack (hidden 1152, 16 heads × 72,
cross-attention to 1152-wide text tokens, GELU-tanh MLP 4608, adaLN-single modulation).

Per row: median (and min) latency over round-robin repeats, file size, relative error of
the output vs the fp32 torch model, and for clq rows the relative error vs clq's own
reference (``qm``) at the same bits. Writes benchmarks/results/onnx_cpu.json and prints
a table. Goals of issue 6 are computed from the rows (``goals``), reached or not.

    python benchmarks/onnx_cpu.py            # depth 2, 256 image + 64 text tokens
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript
import torch
from common import cpu_info
from onnxruntime.quantization import QuantType, quantize_dynamic
from tabulate import tabulate

import clq_compile as clq
from clq_compile.lowering.onnx import export_onnx, ort_feeds, ort_session

WIDTH, HEADS, HEAD_DIM = 1152, 16, 72
RESULTS = Path(__file__).parent / "results" / "onnx_cpu.json"
log = logging.getLogger("onnx_cpu")


class PixArtStack(torch.nn.Module):
    """``depth`` diffusers BasicTransformerBlocks configured as in PixArt-α."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.blocks = torch.nn.ModuleList(
            BasicTransformerBlock(
                WIDTH, HEADS, HEAD_DIM, cross_attention_dim=WIDTH,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                attention_bias=True, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6,
            )
            for _ in range(depth)
        )

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                  timestep=timestep)
        return hidden_states


def make_inputs(batch: int, tokens: int, text: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, tokens, WIDTH, generator=g),
        encoder_hidden_states=torch.randn(batch, text, WIDTH, generator=g),
        timestep=torch.randn(batch, 6 * WIDTH, generator=g) * 0.1,
    )


def time_sessions(runs: dict[str, tuple[ort.InferenceSession, dict]], repeats: int
                  ) -> dict[str, list[float]]:
    """Round-robin timing: each round runs every model once, so load from other processes
    on a shared machine hits all rows alike (median and min are reported)."""
    for session, feeds in runs.values():
        session.run(None, feeds)  # warm-up: ORT initializes lazily
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (session, feeds) in runs.items():
            t0 = time.perf_counter()
            session.run(None, feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def rel(a: np.ndarray, b: torch.Tensor) -> float:
    a64, b64 = torch.from_numpy(a).double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm())


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every model is written under ``work`` (a temporary directory the caller removes)."""
    torch.manual_seed(0)
    model = PixArtStack(args.depth).eval()
    calib = [make_inputs(args.batch, args.tokens, args.text, s) for s in (1, 2)]
    test = make_inputs(args.batch, args.tokens, args.text, 99)
    with torch.no_grad():
        ref_fp = model(**test)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    rows: dict[str, dict[str, Any]] = {}
    runs: dict[str, tuple[ort.InferenceSession, dict]] = {}

    def add(name: str, path: Path, session: ort.InferenceSession, feeds: dict,
            clq_ref: torch.Tensor | None, export_s: float | None) -> None:
        out = session.run(None, feeds)[0]
        runs[name] = (session, feeds)
        rows[name] = dict(
            model=name, file_mb=round(path.stat().st_size / 2**20, 2),
            rel_err_vs_fp32=rel(out, ref_fp),
            rel_err_vs_clq=None if clq_ref is None else rel(out, clq_ref),
            export_s=None if export_s is None else round(export_s, 1),
        )

    fp_path = work / "fp32.onnx"
    t0 = time.perf_counter()
    program = torch.onnx.export(model, (), kwargs=test, dynamo=True, opset_version=21,
                                verbose=False)
    program.save(str(fp_path), external_data=False)
    feeds = {k: v.numpy() for k, v in test.items()}
    add("ORT fp32", fp_path,
        ort.InferenceSession(str(fp_path), so, providers=["CPUExecutionProvider"]), feeds,
        None, time.perf_counter() - t0)
    qd_path = work / "quantize_dynamic.onnx"
    quantize_dynamic(str(fp_path), str(qd_path), weight_type=QuantType.QInt8)
    add("ORT quantize_dynamic int8", qd_path,
        ort.InferenceSession(str(qd_path), so, providers=["CPUExecutionProvider"]), feeds,
        None, None)

    for bits in args.bits:
        qm = clq.quantize(model, calib, recipe="rtn", bits=bits, measure=False)
        with torch.no_grad():
            ref_q = qm(**test)
        rows[f"clq reference {bits}"] = dict(
            model=f"clq reference {bits} (torch)", file_mb=None,
            rel_err_vs_fp32=rel(ref_q.numpy(), ref_fp), rel_err_vs_clq=0.0, export_s=None)
        for target in ("qdq", "ort-cpu"):
            t0 = time.perf_counter()
            path = export_onnx(qm, work / f"{bits}_{target}.onnx", target=target)
            export_s = time.perf_counter() - t0
            session = ort_session(path, threads=args.threads)
            add(f"clq {target} {bits}", path, session, ort_feeds(session, (), test), ref_q,
                export_s)

    load_before = os.getloadavg()
    times = time_sessions(runs, args.repeats)
    for name, ts in times.items():
        rows[name]["latency_ms"] = round(statistics.median(ts), 2)
        rows[name]["min_ms"] = round(min(ts), 2)
    order = ["model", "latency_ms", "min_ms", "file_mb", "rel_err_vs_fp32", "rel_err_vs_clq",
             "export_s"]
    return dict(
        benchmark="onnx_cpu",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        versions=dict(torch=torch.__version__, onnx=onnx.__version__,
                      onnxruntime=ort.__version__, onnxscript=onnxscript.__version__,
                      python=platform.python_version()),
        cpu=cpu_info(),
        load_average=dict(before_timing=load_before, after_timing=os.getloadavg()),
        config=dict(depth=args.depth, width=WIDTH, batch=args.batch, image_tokens=args.tokens,
                    text_tokens=args.text, repeats=args.repeats, ort_threads=args.threads,
                    recipe="rtn", weights="random (seeded) init",
                    timing="round-robin over all rows, median (and min) of repeats"),
        rows=[{k: r.get(k) for k in order} for r in rows.values()],
    )


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, computed from the rows (reported as reached or not). Speed
    ratios are given on medians and on minima: on a shared machine the minimum is the
    least disturbed run, the median what a user would see under the same load."""
    by = {r["model"]: r for r in result["rows"]}
    fp, qd = by["ORT fp32"], by["ORT quantize_dynamic int8"]
    out: dict[str, Any] = {}

    def ratio(a: dict, b: dict) -> str:
        return (f"{a['latency_ms'] / b['latency_ms']:.2f} (median), "
                f"{a['min_ms'] / b['min_ms']:.2f} (min)")

    if "clq ort-cpu w8a8" in by:
        out["ort-cpu W8A8 speedup vs ORT fp32 (goal >= 2)"] = ratio(fp, by["clq ort-cpu w8a8"])
    if "clq ort-cpu w4a4" in by:
        w4 = by["clq ort-cpu w4a4"]
        out["ort-cpu W4A4 speed vs quantize_dynamic (goal >= 1)"] = ratio(qd, w4)
        out["ort-cpu W4A4 rel err vs clq W4A4 reference"] = f"{w4['rel_err_vs_clq']:.2e}"
        out["W4A4 file size reduction vs fp32 (goal >= 6)"] = (
            f"{fp['file_mb'] / w4['file_mb']:.2f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--text", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bits", nargs="+", default=["w8a8", "w4a4", "w4a16"])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch", "clq_compile"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnx_cpu_") as work:  # ~350 MB of ONNX files
        result = run(args, Path(work))
    result["goals"] = goals(result)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(tabulate(result["rows"], headers="keys", floatfmt=".3g", missingval="-"))
    print(tabulate(result["goals"].items(), headers=["goal", "value"]))
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
