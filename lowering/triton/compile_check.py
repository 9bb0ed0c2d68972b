"""Compile every kernel variant for NVIDIA targets without a GPU (ahead of time).

``triton.compile`` runs the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin
via the bundled ptxas) on any machine; only launching needs a driver. The CPU tests run
the kernels under the interpreter, which accepts things the GPU compiler rejects, so CI
also runs this in a subprocess without ``TRITON_INTERPRET``:

    python -m clq_compile.lowering.triton.compile_check [--arch 90 80] [--json]

It reports, per variant and architecture, whether it compiled and which tensor-core
instruction the integer dots became (int8 ``mma``/``wgmma`` with s32 accumulation).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Variant:
    name: str
    kernel: str  # "qgemm" | "rows"
    pointers: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    int_dot: bool = False  # expect an s8 x s8 -> s32 tensor-core instruction


@dataclass
class Result:
    name: str
    arch: int
    ok: bool
    seconds: float
    mma: list[str] = field(default_factory=list)
    error: str = ""


def _gemm_variants() -> list[Variant]:
    from clq_compile.lowering.triton import configs

    it = configs.GPU_INT_GEMM_TILES[0]
    wt = configs.GPU_WO_GEMM_TILES[0]
    base = dict(GROUPED=False, HAS_BIAS=True, STORE_ACC=False, OUT_BF16=True,
                FLOAT_DOT_FP32=False, DOT_PRECISION="tf32x3", BLOCK_K=configs.GPU_BLOCK_K,
                GROUP_M=it.group_m)
    ptrs = dict(a_ptr="*i8", as_ptr="*fp32", w_ptr="*i8", ws_ptr="*fp32", bias_ptr="*bf16",
                out_ptr="*bf16")

    def v(name, tile, int_dot, ptr_over=None, **over):
        c = {**base, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, **over}
        return Variant(name, "qgemm", {**ptrs, **(ptr_over or {})}, c, tile.num_warps,
                       tile.num_stages, int_dot)

    return [
        v("w4a4", it, True, A_KIND=1, W_PACKED=True),
        v("w4a4-grouped-fp16", it, True, {"out_ptr": "*fp16", "bias_ptr": "*fp16"},
          A_KIND=1, W_PACKED=True, GROUPED=True, OUT_BF16=False),
        v("w4a4-store-acc", it, True, {"out_ptr": "*i32"}, A_KIND=1, W_PACKED=True,
          STORE_ACC=True, HAS_BIAS=False),
        v("w4a8", it, True, A_KIND=0, W_PACKED=True),
        v("w8a8", it, True, A_KIND=0, W_PACKED=False),
        v("w8a4", it, True, A_KIND=1, W_PACKED=False),
        v("w4a16-bf16", wt, False, {"a_ptr": "*bf16"}, A_KIND=2, W_PACKED=True),
        v("w4a16-fp32", wt, False, {"a_ptr": "*fp32", "out_ptr": "*fp32", "bias_ptr": "*fp32"},
          A_KIND=2, W_PACKED=True, FLOAT_DOT_FP32=True, OUT_BF16=False),
    ]


def _row_variants() -> list[Variant]:
    from clq_compile.lowering.triton import configs
    from clq_compile.quant import EPS

    t = configs.GPU_ROW_TILES[0]
    ptrs = dict(x_ptr="*bf16", perm_ptr="*i64", smooth_ptr="*fp32", rot_ptr="*fp32",
                out_ptr="*i8", scale_ptr="*fp32")
    base = dict(HAS_PERM=True, HAS_SMOOTH=True, ROT_B=128, ROUND_TO=1, OUT_ROUND=0,
                ROT_PRECISION="tf32x3", MODE=1, BITS=4, QMAX=7, GROUP=1, EPS_=EPS,
                BLOCK_M=t.block_m, BLOCK_K=configs.GPU_ROW_BLOCK_K)

    def v(name, ptr_over=None, **over):
        return Variant(name, "rows", {**ptrs, **(ptr_over or {})}, {**base, **over},
                       t.num_warps, t.num_stages)

    return [
        v("act-int4-token-perm-smooth-h128"),
        v("act-int4-group128", HAS_PERM=False, HAS_SMOOTH=False, ROT_B=0, MODE=2, GROUP=128),
        v("act-int8-token-fp16", {"x_ptr": "*fp16"}, ROT_B=0, ROUND_TO=2, BITS=8, QMAX=127),
        v("transform-h16-bf16", {"out_ptr": "*bf16"}, HAS_SMOOTH=False, ROT_B=16, MODE=0,
          BITS=0, QMAX=0, OUT_ROUND=1),
    ]


def variants() -> list[Variant]:
    return _gemm_variants() + _row_variants()


def _compile(variant: Variant, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from clq_compile.lowering.triton import act_quant, qgemm

    fn = qgemm._qgemm_kernel if variant.kernel == "qgemm" else act_quant._rows_kernel.fn
    signature, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in variant.constexprs:
            signature[name] = "constexpr"
            constexprs[(i,)] = variant.constexprs[name]
        elif name in variant.pointers:
            signature[name] = variant.pointers[name]
        else:
            signature[name] = "fp32" if name == "clip" else "i32"
    t0 = time.perf_counter()
    try:
        k = triton.compile(
            ASTSource(fn, signature, constexprs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages,
                     "enable_fp_fusion": False},
        )
    except Exception as e:  # report every failing variant, not just the first
        return Result(variant.name, arch, False, time.perf_counter() - t0, error=repr(e)[:2000])
    ptx = k.asm["ptx"]
    mma = sorted({m.group(0) for m in re.finditer(r"\b(?:wgmma\.mma_async|mma)\.[\w.]+", ptx)})
    return Result(variant.name, arch, True, time.perf_counter() - t0, mma)


def check(archs: tuple[int, ...] = (90, 80), names: list[str] | None = None) -> list[Result]:
    """Compile the selected variants for each architecture (sm_90 and sm_80 by default)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: compiling needs the compiled-mode @jit")
    results = []
    for arch in archs:
        for v in variants():
            if names is None or v.name in names:
                results.append(_compile(v, arch))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--only", nargs="*", default=None, help="variant names")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    args = p.parse_args(argv)
    results = check(tuple(args.arch), args.only)
    if args.json:
        json.dump({"results": [asdict(r) for r in results],
                   "expect_int_dot": [v.name for v in variants() if v.int_dot]}, sys.stdout)
    else:
        for r in results:
            status = "ok" if r.ok else f"FAILED {r.error}"
            sys.stdout.write(f"sm_{r.arch} {r.name:36s} {r.seconds:5.1f}s {status} {r.mma}\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
