"""Quantized GEMM: y = (A_int · W_intᵀ) ⊙ scales + bias, for W4A4, W4A8, W8A8, W8A4 and
weight-only W4A16 / W8A16, in one kernel specialized by constexpr flags.

Int4 operands stay packed in memory and are unpacked in registers (``lo = (p<<4)>>4``,
``hi = p>>4``). Because a sum over K does not care about order, a packed operand is never
re-interleaved: the kernel dots the even-element halves and the odd-element halves
separately (``dot(a_lo, w_lo) + dot(a_hi, w_hi)``); an unpacked partner is loaded as one
contiguous tile and split into its even and odd columns in registers to match (two
stride-2 gathers could not be copied asynchronously: compile_check counted 12 cp.async
for W4A8 / W8A4 against 24 now). Integer variants accumulate exactly in int32.

Scales are constant on K segments (the finer of the activation and weight groups; the
whole of K for per-token x per-channel). Each segment's int32 sum is scaled into an fp32
accumulator: ``out += float(acc) * (s_a[m] * s_w[n])``; the exact twin of that epilogue
is ``reference.epilogue_reference``.

Import this module only after choosing interpret vs compile (``TRITON_INTERPRET``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from clq_compile.lowering.triton import configs
from clq_compile.lowering.triton.jit_helpers import (
    launcher,
    round_to_bf16,
    unpack_hi,
    unpack_lo,
)
from clq_compile.lowering.triton.support import GemmPlan, Unsupported, plan_gemm

_A_INT8, _A_INT4, _A_FLOAT = 0, 1, 2
_A_KIND_CODE = {"int8": _A_INT8, "int4": _A_INT4, "float": _A_FLOAT}


@triton.jit
def _load_split(ptr, rows, mask_rows, k0, K, stride_r, stride_k, PACKED: tl.constexpr,
                ROWS_FIRST: tl.constexpr, HALF: tl.constexpr):
    """Even-element and odd-element columns k0.. of a (rows, K) operand, each HALF wide;
    transposed to (HALF, rows) when not ROWS_FIRST (the weight side of the dot)."""
    offs_h = tl.arange(0, HALF)
    rows = rows.to(tl.int64)  # M*K may pass 2**31 (video DiTs with CFG)
    if PACKED:
        kb = k0 // 2 + offs_h  # byte index along packed K
        # K is even whenever an operand is packed; `K // 2` (not `(K + 1) // 2`) keeps
        # K's divisibility by 16 visible, so the loads vectorize and pipeline.
        kmask = kb < K // 2
        if ROWS_FIRST:
            p = tl.load(ptr + rows[:, None] * stride_r + kb[None, :] * stride_k,
                        mask=mask_rows[:, None] & kmask[None, :], other=0)
        else:
            p = tl.load(ptr + kb[:, None] * stride_k + rows[None, :] * stride_r,
                        mask=kmask[:, None] & mask_rows[None, :], other=0)
        even = unpack_lo(p)
        odd = unpack_hi(p)
    else:
        # One contiguous (rows, 2·HALF) tile, de-interleaved in registers: two stride-2
        # gathers (even, odd columns) could not be vectorized or copied asynchronously.
        ks = k0 + tl.arange(0, 2 * HALF)
        if ROWS_FIRST:
            t = tl.load(ptr + rows[:, None] * stride_r + ks[None, :] * stride_k,
                        mask=mask_rows[:, None] & (ks[None, :] < K), other=0)
        else:
            t = tl.trans(tl.load(ptr + ks[:, None] * stride_k + rows[None, :] * stride_r,
                                 mask=(ks[:, None] < K) & mask_rows[None, :], other=0))
        even, odd = tl.split(tl.reshape(t, (t.shape[0], HALF, 2)))
        if not ROWS_FIRST:
            even, odd = tl.trans(even), tl.trans(odd)
    return even, odd


@triton.jit
def _mma(acc, a, w, A_KIND: tl.constexpr, FLOAT_DOT_FP32: tl.constexpr,
         DOT_PRECISION: tl.constexpr):
    """acc += a · w; int8 x int8 -> int32, or float (w's integers are exact in bf16/fp16)."""
    if A_KIND == 2:
        if FLOAT_DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
    else:
        # out_dtype spelled out: Triton <= 3.6 defaults it to fp32 whatever acc is.
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _k_step(acc, a_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k0, K,
            stride_am, stride_ak, stride_wn, stride_wk,
            A_KIND: tl.constexpr, W_PACKED: tl.constexpr, FLOAT_DOT_FP32: tl.constexpr,
            DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """Accumulate columns [k0, k0 + BLOCK_K) of A·Wᵀ into ``acc``."""
    SPLIT: tl.constexpr = (A_KIND == 1) or W_PACKED
    if SPLIT:
        a_e, a_o = _load_split(a_ptr, offs_m, mask_m, k0, K, stride_am, stride_ak,
                               A_KIND == 1, True, BLOCK_K // 2)
        w_e, w_o = _load_split(w_ptr, offs_n, mask_n, k0, K, stride_wn, stride_wk,
                               W_PACKED, False, BLOCK_K // 2)
        acc = _mma(acc, a_e, w_e, A_KIND, FLOAT_DOT_FP32, DOT_PRECISION)
        acc = _mma(acc, a_o, w_o, A_KIND, FLOAT_DOT_FP32, DOT_PRECISION)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        rows_a = offs_m[:, None].to(tl.int64) * stride_am
        a = tl.load(a_ptr + rows_a + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & kmask[None, :], other=0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=kmask[:, None] & mask_n[None, :], other=0)
        acc = _mma(acc, a, w, A_KIND, FLOAT_DOT_FP32, DOT_PRECISION)
    return acc


@triton.jit
def _scaled(acc, as_ptr, ws_ptr, offs_m, mask_m, offs_n, mask_n, seg_start,
            A_GROUP, W_GROUP, stride_asm, stride_wsn, A_KIND: tl.constexpr):
    """fp32 contribution of one K segment: float(acc) * (s_a[m] * s_w[n])."""
    sw = tl.load(ws_ptr + offs_n * stride_wsn + seg_start // W_GROUP, mask=mask_n, other=0.0)
    if A_KIND == 2:
        return acc * sw[None, :]
    sa_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm + seg_start // A_GROUP
    sa = tl.load(sa_ptrs, mask=mask_m, other=0.0)
    return acc.to(tl.float32) * (sa[:, None] * sw[None, :])


@triton.jit
def _qgemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K, SEG, A_GROUP, W_GROUP, M_BUCKET,
    stride_am, stride_ak, stride_asm, stride_wn, stride_wk, stride_wsn, stride_om, stride_on,
    A_KIND: tl.constexpr, W_PACKED: tl.constexpr, GROUPED: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_ACC: tl.constexpr, OUT_BF16: tl.constexpr,
    FLOAT_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row-tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    ACC_DTYPE: tl.constexpr = tl.float32 if A_KIND == 2 else tl.int32

    if GROUPED:
        # One flat K loop (BLOCK_K divides SEG): a segment's int32 sum is scaled into the
        # fp32 output when the segment ends. A loop per segment nested in a loop over
        # segments could not prefetch across segments (its inner loop is one or two steps
        # long); the flat loop's speed is not yet measured on a GPU.
        out = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            acc = _k_step(acc, a_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k0, K,
                          stride_am, stride_ak, stride_wn, stride_wk, A_KIND, W_PACKED,
                          FLOAT_DOT_FP32, DOT_PRECISION, BLOCK_K)
            if (k0 + BLOCK_K) % SEG == 0:
                out = out + _scaled(acc, as_ptr, ws_ptr, offs_m, mask_m, offs_n, mask_n,
                                    k0 + BLOCK_K - SEG, A_GROUP, W_GROUP, stride_asm,
                                    stride_wsn, A_KIND)
                acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            acc = _k_step(acc, a_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k0, K,
                          stride_am, stride_ak, stride_wn, stride_wk, A_KIND, W_PACKED,
                          FLOAT_DOT_FP32, DOT_PRECISION, BLOCK_K)
        if not STORE_ACC:
            out = _scaled(acc, as_ptr, ws_ptr, offs_m, mask_m, offs_n, mask_n, 0,
                          A_GROUP, W_GROUP, stride_asm, stride_wsn, A_KIND)

    optrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    omask = mask_m[:, None] & mask_n[None, :]
    if STORE_ACC:
        tl.store(optrs, acc, mask=omask)  # raw int32 sums, for the exactness tests
    else:
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if OUT_BF16:
            out = round_to_bf16(out)
        tl.store(optrs, out.to(out_ptr.dtype.element_ty), mask=omask)


def _tile_configs(tiles: tuple[configs.GemmTile, ...]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "GROUP_M": t.group_m},
                      num_warps=t.num_warps, num_stages=t.num_stages)
        for t in tiles
    ]


# M enters the key only as a power-of-two bucket: a new token count must not re-benchmark
# (that would break CUDA-graph capture and cost seconds per new shape).
_KEY = ["M_BUCKET", "N", "K", "SEG", "A_KIND", "W_PACKED", "GROUPED", "BLOCK_K", "STORE_ACC"]
# Three autotuners over one kernel: compute-bound int tiles, int tiles small enough for the
# grouped variant's two accumulators, and memory-bound weight-only tiles.
_int_gemm = triton.autotune(_tile_configs(configs.int_gemm_tiles()), key=_KEY)(_qgemm_kernel)
_wo_gemm = triton.autotune(_tile_configs(configs.weight_only_tiles()), key=_KEY)(_qgemm_kernel)
_grouped_gemm = triton.autotune(_tile_configs(configs.grouped_gemm_tiles()),
                                key=_KEY)(_qgemm_kernel)


def _logical_k(w_q: torch.Tensor, w_bits: int) -> int:
    return w_q.shape[1] * (2 if w_bits == 4 else 1)


def quant_matmul(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    a_bits: int,
    w_bits: int,
    out_dtype: torch.dtype,
    store_acc: bool = False,
) -> torch.Tensor:
    """(M, N) = dequant(a) · dequant(w_q)ᵀ + bias, in ``out_dtype``.

    ``a``: packed int4 (M, K/2) for ``a_bits`` 4, int8 (M, K) for 8, or float (M, K) for 16
    (weight-only; ``a_scale`` None). ``a_scale``: float32 (M, K/a_group) or (M, 1).
    ``w_q``/``w_scale``: the ``clq::quant_linear`` weight layout. ``store_acc`` returns the
    raw int32 A_int·W_intᵀ instead (per-token x per-channel only; used by tests).
    Raises :class:`~clq_compile.lowering.triton.support.Unsupported`.
    """
    if a.ndim != 2 or w_q.ndim != 2 or w_scale.ndim != 2:
        raise Unsupported("quant_matmul takes 2-D operands")
    k = _logical_k(w_q, w_bits)
    a_k = a.shape[1] * (2 if a_bits == 4 else 1)
    if a_k != k:
        raise Unsupported(f"activation K={a_k} does not match weight K={k}")
    m, n = a.shape[0], w_q.shape[0]
    a_groups = a_scale.shape[1] if a_scale is not None else 1
    plan: GemmPlan = plan_gemm(a_bits, w_bits, k, a_groups, w_scale.shape[1], out_dtype)
    if store_acc and (plan.grouped or plan.a_kind == "float"):
        raise Unsupported("store_acc needs integer activations and a single K segment")
    if a_bits != 16 and a_scale is None:
        raise Unsupported("integer activations need scales")
    out = torch.empty((m, n), device=a.device, dtype=torch.int32 if store_acc else out_dtype)
    if m == 0 or n == 0:
        return out
    w_scale = w_scale.to(torch.float32)
    a_scale_t = a_scale.to(torch.float32) if a_scale is not None else w_scale
    a_kind = _A_KIND_CODE[plan.a_kind]
    fp32_dot = a_kind == _A_FLOAT and (configs.interpreting() or a.dtype == torch.float32)
    kernel = (_wo_gemm if a_kind == _A_FLOAT
              else _grouped_gemm if plan.grouped else _int_gemm)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
    )
    launch, options = launcher(kernel)
    launch[grid](
        a, a_scale_t, w_q, w_scale, bias if bias is not None else w_scale, out,
        m, n, k, plan.seg, plan.a_group, plan.w_group, configs.m_bucket(int(m)),
        a.stride(0), a.stride(1), a_scale_t.stride(0), w_q.stride(0), w_q.stride(1),
        w_scale.stride(0), out.stride(0), out.stride(1),
        A_KIND=a_kind, W_PACKED=plan.w_packed, GROUPED=plan.grouped,
        HAS_BIAS=bias is not None, STORE_ACC=store_acc, OUT_BF16=out_dtype == torch.bfloat16,
        FLOAT_DOT_FP32=fp32_dot,
        DOT_PRECISION="ieee" if configs.interpreting() else "tf32x3",
        BLOCK_K=plan.block_k,
        **options,  # eagerly no FMA contraction: the epilogue stays bit-equal to its twin
    )
    return out
