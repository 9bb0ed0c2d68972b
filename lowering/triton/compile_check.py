"""Compile every kernel variant and autotune config for NVIDIA targets, without a GPU,
specialized as a real launch is, and check what the compiler produced.

``triton.compile`` runs the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin
via the bundled ptxas) on any machine; only launching needs a driver. A real launch
specializes the kernel on its arguments (integers divisible by 16, 16-byte-aligned
pointers, unit strides as constants), and that changes vectorization and pipelining, so
this compiles with the same specialization. Per variant, config and architecture it
checks (``Result.problems``):

- shared memory within the architecture's per-block limit (configs over it are skipped
  by the autotuner at run time; a default config over it is a problem);
- no register spills on the default config (ptxas -v);
- the integer GEMMs: async copies (``cp.async``) and int8 tensor-core instructions (s8 x
  s8 -> s32 ``mma``/``wgmma``).

CI runs it in a subprocess without ``TRITON_INTERPRET`` (tests/triton/test_gpu_compile.py):

    python -m clq_compile.lowering.triton.compile_check [--arch 90 89 80] [--configs all]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Shared memory a block may opt into (bytes): A100 163 KB, sm_86/sm_89 99 KB, H100 227 KB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# Integer arguments a real launch passes as 1 (contiguous last dims, per-token/per-channel
# scale columns): Triton turns those into constants.
UNIT_ARGS = {"stride_ak", "stride_wk", "stride_on", "stride_asm", "stride_wsn", "stride_xk",
             "stride_sm"}
FLOAT_ARGS = {"clip", "eps"}

@dataclass
class Variant:
    name: str
    kernel: str  # "qgemm" | "rows"
    pointers: dict[str, str]
    constexprs: dict[str, Any]
    tiles: str  # "int" | "grouped" | "weight_only" | "rows": its autotune list
    int_dot: bool = False  # expect an s8 x s8 -> s32 tensor-core instruction
    unit_args: frozenset[str] = frozenset(UNIT_ARGS)
    min_arch: int = 80  # fp8 needs sm_89


@dataclass
class Result:
    name: str
    arch: int
    config: str
    default: bool
    ok: bool
    seconds: float
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0
    cp_async: int = 0
    mma: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    error: str = ""


def _gemm_variants() -> list[Variant]:
    from clq_compile.lowering.triton import configs

    base = dict(GROUPED=False, HAS_BIAS=True, STORE_ACC=False, OUT_BF16=True,
                FLOAT_DOT_FP32=False, DOT_PRECISION="tf32x3", BLOCK_K=configs.GPU_BLOCK_K)
    ptrs = dict(a_ptr="*i8", as_ptr="*fp32", w_ptr="*i8", ws_ptr="*fp32", bias_ptr="*bf16",
                out_ptr="*bf16")
    grouped_units = frozenset(UNIT_ARGS - {"stride_asm", "stride_wsn"})

    def v(name, tiles, int_dot, ptr_over=None, units=frozenset(UNIT_ARGS), **over):
        return Variant(name, "qgemm", {**ptrs, **(ptr_over or {})}, {**base, **over}, tiles,
                       int_dot, units)

    return [
        v("w4a4", "int", True, A_KIND=1, W_PACKED=True),
        v("w4a4-grouped-fp16", "grouped", True, {"out_ptr": "*fp16", "bias_ptr": "*fp16"},
          grouped_units, A_KIND=1, W_PACKED=True, GROUPED=True, OUT_BF16=False, BLOCK_K=64),
        v("w4a4-store-acc", "int", True, {"out_ptr": "*i32"}, A_KIND=1, W_PACKED=True,
          STORE_ACC=True, HAS_BIAS=False),
        v("w4a8", "int", True, A_KIND=0, W_PACKED=True),
        v("w8a8", "int", True, A_KIND=0, W_PACKED=False),
        v("w8a4", "int", True, A_KIND=1, W_PACKED=False),
        v("w4a16-bf16", "weight_only", False, {"a_ptr": "*bf16"}, A_KIND=2, W_PACKED=True),
        v("w4a16-fp32", "weight_only", False,
          {"a_ptr": "*fp32", "out_ptr": "*fp32", "bias_ptr": "*fp32"},
          A_KIND=2, W_PACKED=True, FLOAT_DOT_FP32=True, OUT_BF16=False),
    ]


def _row_variants() -> list[Variant]:
    from clq_compile.lowering.triton import configs
    from clq_compile.quant import EPS

    ptrs = dict(x_ptr="*bf16", perm_ptr="*i64", smooth_ptr="*fp32", rot_ptr="*fp32",
                out_ptr="*i8", scale_ptr="*fp32", mul_ptr="*bf16", add_ptr="*bf16")
    base = dict(HAS_PERM=True, HAS_SMOOTH=True, ROT_B=128, ROT_OUTER=8, ROUND_TO=1, OUT_ROUND=0,
                ROT_PRECISION="tf32x3", MODE=1, BITS=4, QMAX=7, GROUP=1, EPS_=EPS, STORE=0,
                PROLOGUE=0, IN_ROUND=1, PRO_ROUND=1, HAS_MUL=False, HAS_ADD=False,
                BLOCK_K=configs.GPU_ROW_BLOCK_K)

    def v(name, ptr_over=None, min_arch=80, **over):
        return Variant(name, "rows", {**ptrs, **(ptr_over or {})}, {**base, **over}, "rows",
                       min_arch=min_arch)

    return [
        v("act-int4-token-perm-smooth-h128"),
        v("act-int4-token-h256-factored", ROT_B=256, ROT_OUTER=16),
        v("act-int4-token-h64-dense", ROT_B=64, ROT_OUTER=1),
        v("act-int4-token-fp8-container", {"out_ptr": "*fp8e4nv"}, min_arch=89, ROT_B=0,
          STORE=2),
        v("act-int4-token-gelu-tanh-fp8", {"out_ptr": "*fp8e4nv"}, min_arch=89, ROT_B=0,
          STORE=2, PROLOGUE=2),
        v("act-int4-token-layernorm-adaln-h128", PROLOGUE=3, HAS_MUL=True, HAS_ADD=True),
        v("act-int4-token-layernorm-adaln-fp32-h128", {"mul_ptr": "*fp32", "add_ptr": "*fp32"},
          PROLOGUE=3, PRO_ROUND=0, HAS_MUL=True, HAS_ADD=True),
        v("act-int4-token-layernorm-adaln-fp8", {"out_ptr": "*fp8e4nv"}, min_arch=89, ROT_B=0,
          STORE=2, PROLOGUE=3, HAS_MUL=True, HAS_ADD=True),
        v("act-int4-group128", HAS_PERM=False, HAS_SMOOTH=False, ROT_B=0, MODE=2, GROUP=128),
        v("act-int8-token-fp16", {"x_ptr": "*fp16"}, ROT_B=0, ROUND_TO=2, BITS=8, QMAX=127),
        v("transform-h16-bf16", {"out_ptr": "*bf16"}, HAS_SMOOTH=False, ROT_B=16, ROT_OUTER=1,
          MODE=0, BITS=0, QMAX=0, OUT_ROUND=1),
    ]


def variants() -> list[Variant]:
    return _gemm_variants() + _row_variants()


def _tiles(kind: str) -> list[tuple[dict[str, int], int, int]]:
    """(tile constexprs, num_warps, num_stages) of every autotune config, default first."""
    from clq_compile.lowering.triton import configs

    if kind == "rows":
        return [({"BLOCK_M": t.block_m}, t.num_warps, t.num_stages)
                for t in configs.GPU_ROW_TILES]
    tiles = {"int": configs.GPU_INT_GEMM_TILES, "grouped": configs.GPU_GROUPED_GEMM_TILES,
             "weight_only": configs.GPU_WO_GEMM_TILES}[kind]
    return [({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "GROUP_M": t.group_m}, t.num_warps,
             t.num_stages) for t in tiles]


def _specialized(fn: Any, variant: Variant, tile: dict[str, int]) -> Any:
    """ASTSource with a real launch's specialization: unit strides constant, every other
    integer and every pointer divisible by 16."""
    from triton.compiler import ASTSource

    consts_in = {**variant.constexprs, **tile}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts_in:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts_in[name]
        elif name in variant.unit_args:
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = variant.pointers.get(name, "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


def _ptxas(arch: int) -> str:
    """Path of the ptxas Triton itself uses for ``arch`` (its API changed across versions)."""
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(arch).path
    except TypeError:
        return compiler.get_ptxas().path


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v on the kernel's PTX."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={target}", src, "-o",
                               os.path.join(d, "k.cubin")], capture_output=True, text=True,
                              check=False)
    out = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return (int(regs.group(1)) if regs else -1), sum(spills)


def _compile(variant: Variant, arch: int, tile: tuple, default: bool) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    from clq_compile.lowering.triton import act_quant, qgemm

    fn = qgemm._qgemm_kernel if variant.kernel == "qgemm" else act_quant._rows_kernel.fn
    consts, warps, stages = tile
    cfg = ",".join(f"{k}={v}" for k, v in consts.items()) + f",w{warps},s{stages}"
    t0 = time.perf_counter()
    try:
        k = triton.compile(_specialized(fn, variant, consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages,
                                    "enable_fp_fusion": False})
    except Exception as e:  # report every failing variant, not just the first
        return Result(variant.name, arch, cfg, default, False, time.perf_counter() - t0,
                      error=repr(e)[:2000], problems=["does not compile"])
    ptx = k.asm["ptx"]
    regs, spills = _ptxas_report(ptx, arch)
    r = Result(
        variant.name, arch, cfg, default, True, time.perf_counter() - t0,
        shared=int(k.metadata.shared), registers=regs, spill_bytes=spills,
        cp_async=len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
        mma=sorted({m.group(0) for m in re.finditer(r"\b(?:wgmma\.mma_async|mma)\.[\w.]+",
                                                    ptx)}),
    )
    limit = SMEM_LIMIT[arch]
    if default and r.shared > limit:
        r.problems.append(f"default config needs {r.shared} B of shared memory > {limit}")
    if default and spills:
        r.problems.append(f"default config spills {spills} B")
    if variant.int_dot:
        if not any("s32" in m and "s8.s8" in m for m in r.mma):
            r.problems.append("no int8 tensor-core instruction")
        if r.cp_async < 2:
            r.problems.append(f"{r.cp_async} async copies: operands are not pipelined")
    return r


def check(archs: tuple[int, ...] = (90, 89, 80), names: list[str] | None = None,
          all_configs: bool = True) -> list[Result]:
    """Compile the selected variants (every autotune config, or the default one) for each
    architecture."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: compiling needs the compiled-mode @jit")
    results = []
    for arch in archs:
        for v in variants():
            if (names is not None and v.name not in names) or arch < v.min_arch:
                continue
            tiles = _tiles(v.tiles)
            for i, tile in enumerate(tiles if all_configs else tiles[:1]):
                results.append(_compile(v, arch, tile, default=i == 0))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 89, 80])
    p.add_argument("--only", nargs="*", default=None, help="variant names")
    p.add_argument("--configs", choices=("all", "default"), default="all")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    args = p.parse_args(argv)
    results = check(tuple(args.arch), args.only, args.configs == "all")
    if args.json:
        json.dump({"results": [asdict(r) for r in results],
                   "expect_int_dot": [v.name for v in variants() if v.int_dot]}, sys.stdout)
    else:
        for r in results:
            status = "ok" if r.ok and not r.problems else f"PROBLEM {r.problems} {r.error}"
            sys.stdout.write(
                f"sm_{r.arch} {r.name:34s} {r.config:38s} smem {r.shared:6d} regs "
                f"{r.registers:3d} spill {r.spill_bytes:5d} cp.async {r.cp_async:3d} "
                f"{r.seconds:4.1f}s {status}\n")
    return 0 if all(r.ok and not r.problems for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
