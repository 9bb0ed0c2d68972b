"""Quantized GEMM throughput on DiT linear shapes (CUDA only).

Rows per (M, K, N): bf16 ``torch.matmul`` (cuBLAS), ``torch._int_mm`` W8A8 (cuBLASLt
int8 -> int32, no scale epilogue: a lower bound for an int8 GEMM), and our Triton
kernels: W8A8, W4A8, W4A4 GEMMs on pre-quantized activations, W4A4 "linear" (the full
``clq::quant_linear``: activation quantize + GEMM), the same with the H128 rotation fused
into the quantizer (what quarot/clq deploy) and W4A16 (weight-only, also at small M, its
regime). Each row gives median time, TOPS (2·M·N·K / t), speed vs bf16, and % of
the GPU's dense peak; ours are first checked against exact float64 sums. Inputs are not
rotated: do_bench flushes L2 before every timed call, so each call starts cold, as a
layer of a 28-block DiT does.

Peaks (CLI): defaults are the H100 SXM5 datasheet's dense figures, INT8 1979 TOPS and
BF16 989.5 TFLOPS (the datasheet's 3958 / 1979 are with 2:4 sparsity). Int4 has no
tensor-core instruction on Hopper (DESIGN §7), so all integer rows are measured against
the int8 peak. Pass the right numbers for another GPU (e.g. H100 PCIe 1513 / 756).

    python benchmarks/gemm.py [--m 1024 4096 16384] [--int8-peak-tops 1979]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_ms, import_kernels, require_cuda, write_results  # noqa: E402

# (model, K, N): PixArt-α (hidden 1152, MLP 4608) and Flux (hidden 3072, MLP 12288).
SHAPES = [
    ("pixart", 1152, 1152), ("pixart", 1152, 4608), ("pixart", 4608, 1152),
    ("flux", 3072, 3072), ("flux", 3072, 12288), ("flux", 12288, 3072),
]


# Routes each bits setting can take (lowering/triton/routes.py); "fp8" needs sm_90.
ROUTES_BY_BITS = {(8, 8): ("packed",), (8, 4): ("packed", "int8"),
                  (4, 4): ("packed", "int8", "fp8")}


def _quantized_operands(x: torch.Tensor, w: torch.Tensor, act_quant: Any) -> dict[str, Any]:
    from clq_compile.quant import quantize_weight

    ops = {}
    for bits in (4, 8):
        ops[f"w{bits}"] = quantize_weight(w, bits)
        ops[f"a{bits}"] = act_quant.rotate_quantize(x, None, None, None, bits)
    return ops


def _exact(a_int: torch.Tensor, sa: torch.Tensor, w_int: torch.Tensor, sw: torch.Tensor
           ) -> torch.Tensor:
    """Float64 result of the integer GEMM with scales (integer sums are exact in fp64)."""
    return (a_int.double() @ w_int.double().t()) * sa.double() * sw.double().t()


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def run_shape(m: int, k: int, n: int, model: str, check: bool, kernels: tuple,
              dev: torch.device) -> list[dict]:
    act_quant, qgemm, dispatch = kernels
    from clq_compile.quant import unpack_int4

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * k**-0.5
    q = _quantized_operands(x, w, act_quant)
    flops = 2.0 * m * n * k

    def mm(kind: str, a_bits: int, w_bits: int, route: str | None = None):
        wq, sw = q[f"w{w_bits}"]
        if kind == "gemm":
            aq, sa = q[f"a{a_bits}"]
            return lambda: qgemm.quant_matmul(aq, sa, wq, sw, None, a_bits=a_bits,
                                              w_bits=w_bits, out_dtype=torch.bfloat16)
        return lambda: dispatch.quant_linear_triton(x, wq, sw, None, w_bits, a_bits, 0, 1.0,
                                                    route=route)

    cases: list[tuple[str, Any]] = [
        ("bf16 torch.matmul", lambda: torch.matmul(x, w.t())),
    ]
    if m > 16 and k % 8 == 0 and n % 8 == 0:  # torch._int_mm's shape rules
        a8 = q["a8"][0]
        w8t = q["w8"][0].t()
        cases.append(("int8 torch._int_mm (no epilogue)", lambda: torch._int_mm(a8, w8t)))
    fp8_ok = dev.type == "cpu" or torch.cuda.get_device_capability(dev) >= (8, 9)
    if fp8_ok and m % 16 == 0:
        xf8 = x.to(torch.float8_e4m3fn)
        wf8t = w.to(torch.float8_e4m3fn).t()
        one_a = torch.ones(m, 1, device=dev)
        one_w = torch.ones(1, n, device=dev)
        cases.append(("fp8 torch._scaled_mm rowwise (no act-quant)",
                      lambda: torch._scaled_mm(xf8, wf8t, scale_a=one_a, scale_b=one_w,
                                               out_dtype=torch.bfloat16)))
    cases += [
        ("ours W8A8 gemm", mm("gemm", 8, 8)),
        ("ours W4A8 gemm", mm("gemm", 8, 4)),
        ("ours W4A4 gemm", mm("gemm", 4, 4)),
    ]
    for a_bits, w_bits in ((8, 8), (8, 4), (4, 4)):
        for route in ROUTES_BY_BITS[(a_bits, w_bits)]:
            cases.append((f"ours W{w_bits}A{a_bits} linear (act-quant + gemm) route={route}",
                          mm("linear", a_bits, w_bits, route)))
    cases.append(("ours W4A16", mm("linear", 16, 4)))
    if k % 128 == 0:  # what quarot/clq deploy: the H128 rotation inside the quantizer
        from clq_compile.hadamard import hadamard

        rot = hadamard(128).to(dev)
        wq4, sw4 = q["w4"]
        cases.append(("ours W4A4 linear + fused H128 rotation (route auto)",
                      lambda: dispatch.quant_linear_triton(x, wq4, sw4, None, 4, 4, 0, 1.0,
                                                           None, None, rot)))

    errors: dict[str, float] = {}
    if check:
        for a_bits, w_bits in ((8, 8), (8, 4), (4, 4)):
            aq, sa = q[f"a{a_bits}"]
            wq, sw = q[f"w{w_bits}"]
            a_int = unpack_int4(aq) if a_bits == 4 else aq
            w_int = unpack_int4(wq) if w_bits == 4 else wq
            y = mm("gemm", a_bits, w_bits)()
            errors[f"ours W{w_bits}A{a_bits} gemm"] = _rel_err(y, _exact(a_int, sa, w_int, sw))
        wq, sw = q["w4"]
        a_int, sa = unpack_int4(q["a4"][0]), q["a4"][1]
        exact44 = _exact(a_int, sa, unpack_int4(wq), sw)
        for name, fn in cases:
            if "W4A4 linear" in name:
                try:
                    errors[name] = _rel_err(fn(), exact44)
                except Exception as e:  # the row records the failure; others go on
                    errors[name] = repr(e)[:300]
        ref = x.double() @ (unpack_int4(wq).double() * sw.double()).t()
        errors["ours W4A16"] = _rel_err(mm("linear", 16, 4)(), ref)

    rows = []
    t_bf16 = None
    for name, fn in cases:
        try:
            ms = bench_ms(fn)
        except Exception as e:  # a failed launch is a row with its error, not a crash
            rows.append({"model": model, "M": m, "K": k, "N": n, "method": name,
                         "error": repr(e)[:300]})
            continue
        tops = flops / (ms * 1e-3) / 1e12
        if t_bf16 is None:
            t_bf16 = ms
        rows.append({
            "model": model, "M": m, "K": k, "N": n, "method": name, "ms": ms, "TOPS": tops,
            "x_vs_bf16": t_bf16 / ms, "max_rel_err": errors.get(name),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--small-m", type=int, nargs="*", default=[1, 16, 128],
                   help="extra M for the weight-only vs bf16 rows")
    p.add_argument("--int8-peak-tops", type=float, default=1979.0,
                   help="dense INT8 tensor-core peak (H100 SXM5: 1979)")
    p.add_argument("--bf16-peak-tflops", type=float, default=989.5,
                   help="dense BF16 tensor-core peak (H100 SXM5: 989.5)")
    p.add_argument("--models", nargs="*", default=["pixart", "flux"])
    p.add_argument("--dry-run", action="store_true", help="CPU plumbing check (tiny shapes)")
    args = p.parse_args(argv)
    dev = require_cuda("benchmarks/gemm.py", args.dry_run)
    kernels = import_kernels()
    shapes = [("dry-run", 64, 32)] if args.dry_run else SHAPES
    if args.dry_run:
        args.m, args.small_m = [32], [16]

    rows: list[dict] = []
    for model, k, n in shapes:
        if model not in args.models and not args.dry_run:
            continue
        for i, m in enumerate(args.m):
            rows += run_shape(m, k, n, model, check=i == 0, kernels=kernels, dev=dev)
        for m in args.small_m:
            rows += [r for r in run_shape(m, k, n, model, check=False, kernels=kernels, dev=dev)
                     if r["method"] in ("bf16 torch.matmul", "ours W4A16")]
        write_results("gemm", rows, {}, partial=True)
    for r in rows:
        if "TOPS" not in r:
            continue
        peak = args.bf16_peak_tflops if r["method"].startswith("bf16") else args.int8_peak_tops
        r["pct_peak"] = 100.0 * r["TOPS"] / peak
    write_results("gemm", rows, {
        "int8_peak_tops": args.int8_peak_tops, "bf16_peak_tflops": args.bf16_peak_tflops,
        "peak_note": "dense tensor-core peaks; bf16 rows vs the bf16 peak, integer rows "
                     "(int4 included: no int4 MMA on Hopper) vs the int8 peak",
        "timing": "triton.testing.do_bench median, 25 ms warm-up, 100 ms reps, L2 flushed",
        "max_rel_err": "first M only: max |ours - exact fp64| / max |exact|",
    })
    import json

    from common import device_slug, environment, results_dir
    from kernel_report import collect

    report = {"environment": environment(), **collect()}
    path = results_dir() / f"kernels_{device_slug()}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    bad = [r for r in report["compiled"] if r.get("n_spills") or r.get("ld_local")]
    print(f"wrote {path.name}: {len(report['compiled'])} compiled variants, "
          f"{len(bad)} with spills/local memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
