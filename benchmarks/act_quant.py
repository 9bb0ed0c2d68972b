"""Activation-quantize kernel bandwidth vs a device-to-device copy (CUDA only).

The kernel is memory-bound by design: it reads a bf16 activation once (twice per row
for per-token scales, the second read mostly from L2) and writes int4/int8 plus scales.
Each row reports the effective bandwidth (bytes read once + bytes written, / time) and
its fraction of the bandwidth of ``torch.Tensor.copy_`` moving the activation's bytes
(read + write). Variants: int4 and int8 per token, int4 per 128-group, the fused
permutation + block Hadamard (B=128 and 256, factored: a 16×16 tf32x3 dot plus
butterflies), int4 stored in the int8 and fp8 containers of the Hopper routes; the
torch eager reference (clq_compile.quant) for scale. Then the q/k/v input of a DiT
block, side by side: LayerNorm + adaLN modulation fused into the quantizer
(``prologue``) against the unfused sequence the graph ran before (norm + modulation as
one torch.compile kernel writing the modulated tensor, then the quantizer reading it).

    python benchmarks/act_quant.py [--m 1024 4096 16384] [--k 1152 3072 4608 12288]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_ms, import_kernels, require_cuda, write_results  # noqa: E402


def _variants(k: int, dev: torch.device) -> list[tuple[str, dict]]:
    from clq_compile.hadamard import hadamard

    perm = torch.randperm(k, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
    rot = hadamard(128).to(dev)
    return [
        ("int4 per-token", dict(bits=4)),
        ("int8 per-token", dict(bits=8)),
        ("int4 group-128", dict(bits=4, group=128)),
        ("int4 perm+H128 tf32x3", dict(bits=4, perm=perm, rot=rot, prec="tf32x3")),
        ("int4 per-token, fp8 container", dict(bits=4, container="fp8")),
        ("int4 per-token, int8 container", dict(bits=4, container="int8")),
        ("int4 perm+H256 tf32x3", dict(bits=4, perm=perm, rot=hadamard(256).to(dev),
                                       prec="tf32x3")),
    ]


def measure(m: int, k: int, dev: torch.device, act_quant) -> list[dict]:
    """All variants at one (M, K), plus the copy baseline and the torch reference."""
    from clq_compile.lowering.triton.reference import rotate_quantize_reference
    from clq_compile.quant import unpack_int4

    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16,
                    generator=torch.Generator(device=dev).manual_seed(0))
    dst = torch.empty_like(x)
    copy_ms = bench_ms(lambda: dst.copy_(x))
    copy_bw = 2 * x.nbytes / (copy_ms * 1e-3)
    base = {"M": m, "K": k, "copy_GB/s": copy_bw / 1e9}
    rows = []
    for name, c in _variants(k, dev):
        if c.get("rot") is not None and k % c["rot"].shape[0]:
            continue
        args = (x, c.get("perm"), None, c.get("rot"), c["bits"], c.get("group", 0))
        kw = {"rot_precision": c.get("prec"), "container": c.get("container", "packed")}
        try:
            q, s = act_quant.rotate_quantize(*args, **kw)
            q_ref, _ = rotate_quantize_reference(*args)
            if kw["container"] != "packed":
                q_ref = unpack_int4(q_ref).to(q.dtype)
            ms = bench_ms(lambda args=args, kw=kw: act_quant.rotate_quantize(*args, **kw))
        except Exception as e:  # a variant that cannot launch is a row with its error
            rows.append({**base, "variant": name, "error": repr(e)[:300]})
            continue
        bw = (x.nbytes + q.nbytes + s.nbytes) / (ms * 1e-3)
        rows.append({**base, "variant": name, "ms": ms, "GB/s": bw / 1e9,
                     "frac_of_copy": bw / copy_bw,
                     "byte_mismatch_vs_ref": float((q.float() != q_ref.float()).float().mean())})
    rows += _norm_rows(x, dev, act_quant, base, copy_bw)
    ref_ms = bench_ms(lambda: rotate_quantize_reference(x, None, None, None, 4))
    ref_bw = (x.nbytes + x.nbytes // 4 + 4 * m) / (ref_ms * 1e-3)
    rows.append({**base, "variant": "torch eager reference int4 per-token", "ms": ref_ms,
                 "GB/s": ref_bw / 1e9, "frac_of_copy": ref_bw / copy_bw,
                 "byte_mismatch_vs_ref": None})
    return rows


def _norm_rows(x: torch.Tensor, dev: torch.device, act_quant, base: dict, copy_bw: float
               ) -> list[dict]:
    """int4 perm+H128 of ``layer_norm(x) * (1 + scale) + shift`` (2 samples), fused and
    unfused; bandwidth counts the same bytes (x, codes, scales) for both."""
    from clq_compile.hadamard import hadamard
    from clq_compile.lowering.triton.reference import rotate_quantize_reference
    from clq_compile.lowering.triton.support import modulation_operand

    m, k = x.shape
    if m % 2 or k % 128:
        return []
    g = torch.Generator(device=dev).manual_seed(2)
    perm = torch.randperm(k, device=dev, generator=g)
    rot = hadamard(128).to(dev)
    x3 = x.reshape(2, m // 2, k)
    mul, add = (torch.randn(2, 1, k, device=dev, generator=g, dtype=x.dtype) * 0.1 + o
                for o in (1.0, 0.0))
    rows_mul, rows_add = (modulation_operand(t, x3.shape, x.dtype) for t in (mul, add))

    def fused():
        return act_quant.rotate_quantize(x3, perm, None, rot, 4, prologue="layer_norm",
                                         pro_mul=rows_mul, pro_add=rows_add, norm_eps=1e-6)

    def modulate(x3, mul, add):
        return torch.nn.functional.layer_norm(x3, (k,), eps=1e-6) * mul + add

    # The unfused graph's norm + modulation: one Inductor kernel on a GPU (eager on the
    # dry run's CPU, where compiling would only test the compiler).
    modulated = modulate if dev.type == "cpu" else torch.compile(modulate)

    def unfused():
        return act_quant.rotate_quantize(modulated(x3, mul, add), perm, None, rot, 4)

    q, s = fused()
    q_ref, _ = rotate_quantize_reference(x3, perm, None, rot, 4, prologue="layer_norm",
                                         pro_mul=mul, pro_add=add, norm_eps=1e-6)
    out = []
    for name, fn in (("int4 perm+H128 + LayerNorm + adaLN, fused", fused),
                     ("int4 perm+H128 after LayerNorm + adaLN (compiled), unfused", unfused)):
        fn()  # compile / warm
        ms = bench_ms(fn)
        bw = (x.nbytes + q.nbytes + s.nbytes) / (ms * 1e-3)
        out.append({**base, "variant": name, "ms": ms, "GB/s": bw / 1e9,
                    "frac_of_copy": bw / copy_bw,
                    "byte_mismatch_vs_ref": float((fn()[0] != q_ref).float().mean())})
    out[0]["speedup_vs_unfused"] = out[1]["ms"] / out[0]["ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--k", type=int, nargs="+", default=[1152, 3072, 4608, 12288])
    p.add_argument("--dry-run", action="store_true", help="CPU plumbing check (tiny shapes)")
    args = p.parse_args(argv)
    dev = require_cuda("benchmarks/act_quant.py", args.dry_run)
    if args.dry_run:
        args.m, args.k = [32], [256]
    act_quant, _, _ = import_kernels()
    rows = [r for m in args.m for k in args.k for r in measure(m, k, dev, act_quant)]
    write_results("act_quant", rows, {
        "bandwidth": "bytes read once + bytes written, / median time",
        "copy": "torch copy_ of the bf16 activation: 2 x its bytes / median time",
        "byte_mismatch_vs_ref": "fraction of output bytes differing from the fp32 reference "
                                "(0 expected without rotation; rare ±1 at ties with it)",
        "timing": "triton.testing.do_bench median, L2 flushed before each call",
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
