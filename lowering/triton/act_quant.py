"""Fused online transform + activation quantization (one kernel, one launch).

Per (BLOCK_M, BLOCK_K) tile: gather channels by ``perm``, multiply by ``smooth``, rotate
each B-block by a ``tl.dot`` against the B×B rotation tile, then either store the result
(transform only: serves ``clq::transform``) or quantize it symmetric per token / per
group and store int8 or packed int4 plus float32 scales.

Per-token scales need the row's absmax before any value can be quantized, so that mode
makes two passes over the row inside the kernel (absmax, then recompute and quantize: the
second read mostly hits L2). Per-group mode is a single pass when the tile holds whole
groups. Scales and integers are bit-exact with ``clq_compile.quant`` (same fp32 ops,
IEEE division, ties-to-even rounding); see tests/triton/test_act_quant.py.

Import this module only after choosing interpret vs compile (``TRITON_INTERPRET``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from clq_compile.hadamard import hadamard
from clq_compile.lowering.triton import configs
from clq_compile.lowering.triton.derived import derived
from clq_compile.lowering.triton.jit_helpers import launcher, round_half_even, round_to_bf16
from clq_compile.lowering.triton.support import (
    CONTAINERS,
    RowPlan,
    Unsupported,
    plan_prologue,
    plan_quantize,
    plan_rows,
)
from clq_compile.ops import DEFAULT_NORM_EPS
from clq_compile.quant import EPS

# tl.dot precision of the fp32 rotation. "tf32x3" (three tf32 MMAs) keeps ~fp32 accuracy
# on tensor cores, so the fused result tracks the fp32 reference; "tf32" is ~3x less MMA
# work with ~2^-11 relative error per product (below the bf16 rounding the graph applies
# anyway) for when the kernel turns out compute-bound. The interpreter computes in numpy
# fp32 whatever is asked.
ROT_PRECISIONS = ("tf32x3", "tf32", "ieee")
DEFAULT_ROT_PRECISION = "ieee" if configs.interpreting() else "tf32x3"
_ROUND_NONE, _ROUND_BF16, _ROUND_FP16 = 0, 1, 2
_PROLOGUE_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "layer_norm": 3}  # ops.PROLOGUES


@triton.jit
def _butterflies(x, INNER: tl.constexpr, OUTER: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Multiply each length-(INNER·OUTER) block of x's rows by H_OUTER ⊗ I_INNER
    (normalized): one Walsh–Hadamard butterfly (a + b, a − b) per bit of the outer index,
    pairing elements INNER·2^s apart; exact adds, no B×B tile in shared memory."""
    for s in tl.static_range(OUTER.bit_length() - 1):
        y = tl.reshape(x, (BLOCK_M * BLOCK_K // (2 * INNER << s), 2, INNER << s))
        a, b = tl.split(tl.permute(y, (0, 2, 1)))
        y = tl.permute(tl.join(a + b, a - b), (0, 2, 1))
        x = tl.reshape(y, (BLOCK_M, BLOCK_K))
    return x * (1.0 / OUTER**0.5)


@triton.jit
def _round_as(x, CODE: tl.constexpr):
    """fp32 values rounded to bf16 (CODE 1) or fp16 (2), kept in fp32; 0: unchanged."""
    if CODE == 1:
        x = round_to_bf16(x)
    elif CODE == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _row_stats(x_ptr, offs_m, mask_m, K, stride_xm, stride_xk, eps, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Each row's mean and 1/sqrt(var + eps) (biased variance, as LayerNorm's), in fp32:
    one pass, tiles merged by Chan's update, so a large mean costs no precision."""
    mean = tl.zeros((BLOCK_M,), tl.float32)
    m2 = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.minimum(K - k0, BLOCK_K).to(tl.float32)
        t_mean = tl.sum(x, axis=1) / n_b
        d = tl.where(mask, x - t_mean[:, None], 0.0)
        n_a = k0 * 1.0
        delta = t_mean - mean
        mean = mean + delta * (n_b / (n_a + n_b))
        m2 = m2 + tl.sum(d * d, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
    var = m2 / K
    return mean, tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _prologue(x, PROLOGUE: tl.constexpr, IN_ROUND: tl.constexpr):
    """GELU (1: erf, 2: tanh form) in fp32, rounded to x's dtype as the unfused op's output
    is. tanh(u) = 2·sigmoid(2u) − 1: Triton has no tanh of its own. LayerNorm (3) is
    applied by the caller, which has the row statistics."""
    if PROLOGUE == 1:
        x = _round_as(0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476)), IN_ROUND)
    elif PROLOGUE == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = _round_as(0.5 * x * (2.0 * tl.sigmoid(2.0 * u)), IN_ROUND)
    return x


@triton.jit
def _modulated(x, stats, mod_ptr, offs_m, cols, mask, stride_mod, mod_per,
               IN_ROUND: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr,
               PROLOGUE: tl.constexpr):
    """The prologue's LayerNorm (``stats``: mean, rstd), ``* mul``, ``+ add``, each
    rounded to x's dtype as the unfused ops' outputs are; ``mod_ptr`` (mul, add) hold
    (rows, K) operands, each its own row ``m // per`` serving x's row m (``mod_per``)."""
    if PROLOGUE == 3:
        mean, rstd = stats
        x = _round_as((x - mean[:, None]) * rstd[:, None], IN_ROUND)
    mul_ptr, add_ptr = mod_ptr
    stride_mul, stride_add = stride_mod
    mul_per, add_per = mod_per
    if HAS_MUL:
        mrow = (offs_m // mul_per).to(tl.int64)[:, None] * stride_mul
        x = _round_as(x * tl.load(mul_ptr + mrow + cols[None, :], mask=mask, other=0.0)
                      .to(tl.float32), IN_ROUND)
    if HAS_ADD:
        arow = (offs_m // add_per).to(tl.int64)[:, None] * stride_add
        x = _round_as(x + tl.load(add_ptr + arow + cols[None, :], mask=mask, other=0.0)
                      .to(tl.float32), IN_ROUND)
    # Columns past K must stay 0 (they enter the absmax): the norm and add move them.
    return tl.where(mask, x, 0.0)


@triton.jit
def _transformed_tile(
    x_ptr, perm_ptr, smooth_ptr, rot, offs_m, mask_m, k0, K, stride_xm, stride_xk,
    stats, mod_ptr, stride_mod, mod_per,
    HAS_PERM: tl.constexpr, HAS_SMOOTH: tl.constexpr, ROT_B: tl.constexpr,
    ROT_OUTER: tl.constexpr, ROUND_TO: tl.constexpr, ROT_PRECISION: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_ROUND: tl.constexpr, PRO_ROUND: tl.constexpr,
    HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 tile of ((P(x)[:, perm] * smooth) · blockdiag(rot)) for columns
    k0..k0+BLOCK_K, P the prologue (per element, or per row for the norm, so it commutes
    with the gather; the modulation operands are gathered alike)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    if HAS_PERM:
        cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    else:
        cols = offs_k.to(tl.int64)
    mask = mask_m[:, None] & mask_k[None, :]
    ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk
    # The prologue's steps round to PRO_ROUND (x's dtype; none when it runs in fp32,
    # then its result rounds to x's dtype once).
    x = _prologue(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), PROLOGUE, PRO_ROUND)
    if PROLOGUE == 3 or HAS_MUL or HAS_ADD:
        x = _modulated(x, stats, mod_ptr, offs_m, cols, mask, stride_mod, mod_per, PRO_ROUND,
                       HAS_MUL, HAS_ADD, PROLOGUE)
    if PRO_ROUND != IN_ROUND:
        x = _round_as(x, IN_ROUND)
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        x = x * s[None, :]
    if ROT_B > 0:
        # Dense: one dot against the B×B tile. Factored (Sylvester Hadamard, B > 16):
        # H_B = H_{B/16} ⊗ H_16, a dot against the 16×16 tile then log2(B/16) butterflies.
        DOT_B: tl.constexpr = ROT_B // ROT_OUTER
        blocks = tl.reshape(x, (BLOCK_M * BLOCK_K // DOT_B, DOT_B))
        x = tl.reshape(tl.dot(blocks, rot, input_precision=ROT_PRECISION), (BLOCK_M, BLOCK_K))
        if ROT_OUTER > 1:
            x = _butterflies(x, DOT_B, ROT_OUTER, BLOCK_M, BLOCK_K)
    # Match the unfused graph, where clq::transform returns the activation dtype.
    return _round_as(x, ROUND_TO)


@triton.jit
def _quantize_tile(x, scale, QMAX: tl.constexpr):
    """round_half_even(clamp(x / scale)) as int32; ``scale`` already broadcast to x."""
    v = tl.math.div_rn(x, scale)
    v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0)
    return round_half_even(v).to(tl.int32)


@triton.jit
def _scale_of(amax, clip, QMAX: tl.constexpr, EPS_: tl.constexpr):
    """max(clip * absmax, EPS) / qmax with an IEEE division, as clq_compile.quant does."""
    return tl.math.div_rn(tl.maximum(amax * clip, EPS_), QMAX * 1.0)


@triton.jit
def _lzs_truncate(q, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 codes in [-127, 127] as LZS keeps them (clq_compile.lzs): per group, the
    magnitudes lose their low FLAG = max(bitlen(max |q|) - 3, 0) bits, sign kept. The
    result is the decoded value ``code << FLAG``, still an int8."""
    mag = tl.reshape(tl.abs(q), (BLOCK_M, BLOCK_K // GROUP, GROUP))
    m = tl.max(mag, axis=2)
    flag = (m >= 8).to(tl.int32) + (m >= 16).to(tl.int32) + (m >= 32).to(tl.int32) + \
        (m >= 64).to(tl.int32)
    f = tl.broadcast_to(flag[:, :, None], (BLOCK_M, BLOCK_K // GROUP, GROUP))
    kept = tl.reshape((mag >> f) << f, (BLOCK_M, BLOCK_K))
    return tl.where(q < 0, -kept, kept)


@triton.jit
def _store_q(q_ptr, q, offs_m, mask_m, k0, K, stride_qm, BITS: tl.constexpr,
             STORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store int32 ``q``: packed int4 pairs (element 2i low nibble, 2i+1 high) when BITS
    is 4 and STORE is 0, else one element per column as int8 (STORE 0/1) or as float8
    e4m3 (STORE 2; exact for |q| <= 16, so only for 4-bit values)."""
    row = offs_m[:, None].to(tl.int64) * stride_qm
    if BITS == 4 and STORE == 0:
        lo, hi = tl.split(tl.reshape(q, (BLOCK_M, BLOCK_K // 2, 2)))
        byte = ((lo & 15) | (hi << 4)).to(tl.int8)
        offs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        tl.store(q_ptr + row + offs[None, :], byte, mask=mask_m[:, None] & (offs[None, :] < K // 2))
    else:
        offs = k0 + tl.arange(0, BLOCK_K)
        if STORE == 2:
            val = q.to(tl.float32).to(tl.float8e4nv)
        else:
            val = q.to(tl.int8)
        tl.store(q_ptr + row + offs[None, :], val, mask=mask_m[:, None] & (offs[None, :] < K))


def _row_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": t.block_m}, num_warps=t.num_warps, num_stages=t.num_stages)
            for t in configs.row_tiles()]


@triton.autotune(configs=_row_configs(), key=[
    "M_BUCKET", "K", "BLOCK_K", "MODE", "BITS", "GROUP", "ROT_B", "ROT_OUTER", "HAS_PERM",
    "HAS_SMOOTH", "ROT_PRECISION", "ROUND_TO", "STORE", "PROLOGUE", "PRO_ROUND", "HAS_MUL",
    "HAS_ADD",
])
@triton.jit
def _rows_kernel(
    x_ptr, perm_ptr, smooth_ptr, rot_ptr, out_ptr, scale_ptr, mul_ptr, add_ptr,
    M, K, stride_xm, stride_xk, stride_om, stride_sm, stride_mul, stride_add, mul_per,
    add_per, eps, clip, M_BUCKET,
    HAS_PERM: tl.constexpr, HAS_SMOOTH: tl.constexpr, ROT_B: tl.constexpr,
    ROT_OUTER: tl.constexpr,  # 1: dense B×B dot; >1: factored Hadamard, see _butterflies
    ROUND_TO: tl.constexpr, OUT_ROUND: tl.constexpr, ROT_PRECISION: tl.constexpr,
    MODE: tl.constexpr,  # 0 transform only, 1 quantize per token, 2 per group, 3 LZS
    BITS: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr, EPS_: tl.constexpr,
    STORE: tl.constexpr,  # see _store_q
    PROLOGUE: tl.constexpr, IN_ROUND: tl.constexpr,  # see _prologue
    PRO_ROUND: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr,  # _transformed_tile
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if PROLOGUE == 3:  # LayerNorm: the row statistics first (one more read of the row)
        stats = _row_stats(x_ptr, offs_m, mask_m, K, stride_xm, stride_xk, eps, BLOCK_M,
                           BLOCK_K)
    else:
        stats = (0.0, 0.0)
    mod_ptr, stride_mod = (mul_ptr, add_ptr), (stride_mul, stride_add)
    mod_per = (mul_per, add_per)
    if ROT_B > 0:
        rb = tl.arange(0, ROT_B // ROT_OUTER)
        rot = tl.load(rot_ptr + rb[:, None] * (ROT_B // ROT_OUTER) + rb[None, :]).to(tl.float32)
    else:
        rot = 0.0

    if MODE == 1 or MODE == 3:
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _transformed_tile(x_ptr, perm_ptr, smooth_ptr, rot, offs_m, mask_m, k0, K,
                                  stride_xm, stride_xk, stats, mod_ptr, stride_mod, mod_per,
                                  HAS_PERM, HAS_SMOOTH, ROT_B, ROT_OUTER, ROUND_TO,
                                  ROT_PRECISION, PROLOGUE, IN_ROUND, PRO_ROUND, HAS_MUL,
                                  HAS_ADD,
                                  BLOCK_M, BLOCK_K)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = _scale_of(amax, clip, QMAX, EPS_)
        tl.store(scale_ptr + offs_m.to(tl.int64) * stride_sm, scale, mask=mask_m)

    for k0 in range(0, K, BLOCK_K):
        x = _transformed_tile(x_ptr, perm_ptr, smooth_ptr, rot, offs_m, mask_m, k0, K,
                              stride_xm, stride_xk, stats, mod_ptr, stride_mod, mod_per,
                              HAS_PERM, HAS_SMOOTH, ROT_B, ROT_OUTER, ROUND_TO, ROT_PRECISION,
                              PROLOGUE, IN_ROUND, PRO_ROUND, HAS_MUL, HAS_ADD, BLOCK_M,
                              BLOCK_K)
        if MODE == 0:
            if OUT_ROUND == 1:
                x = round_to_bf16(x)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_k[None, :]
            tl.store(ptrs, x.to(out_ptr.dtype.element_ty),
                     mask=mask_m[:, None] & (offs_k[None, :] < K))
        elif MODE == 1:
            q = _quantize_tile(x, tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_K)), QMAX)
            _store_q(out_ptr, q, offs_m, mask_m, k0, K, stride_om, BITS, STORE, BLOCK_M, BLOCK_K)
        elif MODE == 3:
            q = _quantize_tile(x, tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_K)), QMAX)
            q = _lzs_truncate(tl.maximum(q, -QMAX), GROUP, BLOCK_M, BLOCK_K)
            _store_q(out_ptr, q, offs_m, mask_m, k0, K, stride_om, BITS, STORE, BLOCK_M, BLOCK_K)
        else:
            xg = tl.reshape(x, (BLOCK_M, BLOCK_K // GROUP, GROUP))
            gscale = _scale_of(tl.max(tl.abs(xg), axis=2), clip, QMAX, EPS_)  # (BLOCK_M, groups)
            gs = tl.broadcast_to(gscale[:, :, None], (BLOCK_M, BLOCK_K // GROUP, GROUP))
            q = _quantize_tile(xg, gs, QMAX)
            q = tl.reshape(q, (BLOCK_M, BLOCK_K))
            _store_q(out_ptr, q, offs_m, mask_m, k0, K, stride_om, BITS, STORE, BLOCK_M, BLOCK_K)
            offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
            sptrs = scale_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_g[None, :]
            tl.store(sptrs, gscale, mask=mask_m[:, None] & (offs_g[None, :] < K // GROUP))


def _precision(name: str | None) -> str:
    if name is None:
        return DEFAULT_ROT_PRECISION
    if name not in ROT_PRECISIONS:
        raise ValueError(f"rotation precision {name!r} not in {ROT_PRECISIONS}")
    return name


def _round_code(dtype: torch.dtype) -> int:
    return {torch.bfloat16: _ROUND_BF16, torch.float16: _ROUND_FP16}.get(dtype, _ROUND_NONE)


def rotation_operand(rot: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """(the tile the kernel loads, ROT_OUTER). A Sylvester Hadamard above FACTOR_INNER runs
    factored (any block size fits every GPU); another matrix runs dense up to
    MAX_DENSE_ROT. Checked once per rotation tensor and device: the check reads the
    values, so it must run on a real tensor, outside CUDA-graph capture and outside a
    trace (``lower.LowerToKernels`` runs it on the graph constant at compile time).
    Raises :class:`Unsupported`."""
    def make(r: torch.Tensor) -> tuple[torch.Tensor, int]:
        b = r.shape[0]
        if r.ndim != 2 or r.shape[1] != b:
            return r, 1  # not one square block: plan_rows refuses it, saying why
        dense = r.to(device=device, dtype=torch.float32).contiguous()
        if b > configs.FACTOR_INNER and torch.equal(dense, hadamard(b).to(device)):
            inner = configs.FACTOR_INNER
            return hadamard(inner).to(device).contiguous(), b // inner
        if b > configs.MAX_DENSE_ROT:
            raise Unsupported(f"rotation block {b} is not the Sylvester Hadamard; a dense "
                              f"B×B tile above {configs.MAX_DENSE_ROT} does not fit shared "
                              "memory")
        return dense, 1

    return derived(rot, ("rotation", str(device)), make)


def _kernel_form(rot: torch.Tensor | None, rot_outer: int | None, device: torch.device
                 ) -> tuple[torch.Tensor | None, int]:
    if rot is None:
        return None, 1
    return (rot, rot_outer) if rot_outer is not None else rotation_operand(rot, device)


def _rot_shape(rot_tile: torch.Tensor | None, rot_outer: int) -> tuple[int, ...] | None:
    if rot_tile is None:
        return None
    return tuple(d * rot_outer for d in rot_tile.shape)


def _pro_rows(*operands: torch.Tensor | None) -> tuple[int, ...]:
    """Rows of the given modulation operands in kernel form (for ``plan_prologue``)."""
    return tuple(t.shape[0] for t in operands if t is not None)


def _launch(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    smooth: torch.Tensor | None,
    rot_tile: torch.Tensor | None,
    rot_outer: int,
    plan: RowPlan,
    out: torch.Tensor,
    scale: torch.Tensor | None,
    clip: float,
    round_to: int,
    rot_precision: str | None,
    store: int = 0,
    prologue: str | None = None,
    lzs_group: int = 0,
    pro_mul: torch.Tensor | None = None,
    pro_add: torch.Tensor | None = None,
    norm_eps: float = DEFAULT_NORM_EPS,
    pro_fp32: bool = False,
) -> None:
    x2 = x.reshape(-1, plan.k)
    m = x2.shape[0]
    if m == 0:
        return
    mode = 0 if plan.bits == 0 else 3 if lzs_group else (2 if plan.group else 1)
    dummy = x2  # never dereferenced when the matching flag is off
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    launch, options = launcher(_rows_kernel)
    launch[grid](
        x2,
        perm.to(x.device).contiguous() if perm is not None else dummy,
        smooth.to(x.device).contiguous() if smooth is not None else dummy,
        rot_tile if rot_tile is not None else dummy,
        out,
        scale if scale is not None else dummy,
        pro_mul if pro_mul is not None else dummy,
        pro_add if pro_add is not None else dummy,
        m, plan.k, x2.stride(0), x2.stride(1), out.stride(0),
        scale.stride(0) if scale is not None else 0,
        pro_mul.stride(0) if pro_mul is not None else 0,
        pro_add.stride(0) if pro_add is not None else 0,
        *(m // t.shape[0] if t is not None else 1 for t in (pro_mul, pro_add)),
        float(norm_eps),
        float(clip), configs.m_bucket(int(m)),
        HAS_PERM=perm is not None, HAS_SMOOTH=smooth is not None, ROT_B=plan.rot_block,
        ROT_OUTER=rot_outer,
        ROUND_TO=round_to, OUT_ROUND=_round_code(out.dtype) if plan.bits == 0 else 0,
        ROT_PRECISION=_precision(rot_precision), MODE=mode, BITS=plan.bits,
        QMAX=(1 << (plan.bits - 1)) - 1 if plan.bits else 0, GROUP=max(plan.group, lzs_group, 1),
        EPS_=EPS, STORE=store, PROLOGUE=_PROLOGUE_CODES[prologue],
        IN_ROUND=_round_code(x.dtype),
        PRO_ROUND=_ROUND_NONE if pro_fp32 else _round_code(x.dtype), HAS_MUL=pro_mul is not None,
        HAS_ADD=pro_add is not None, BLOCK_K=plan.block_k,
        **options,  # eagerly: keep x*smooth and the rounding trick separate IEEE ops
    )


def rotate_quantize(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    smooth: torch.Tensor | None,
    rot: torch.Tensor | None,
    bits: int,
    group: int = 0,
    clip: float = 1.0,
    round_to_input_dtype: bool = True,
    rot_precision: str | None = None,
    container: str = "packed",
    prologue: str | None = None,
    lzs_group: int = 0,
    rot_outer: int | None = None,
    pro_mul: torch.Tensor | None = None,
    pro_add: torch.Tensor | None = None,
    norm_eps: float = DEFAULT_NORM_EPS,
    pro_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``transform(x)`` along the last dim in one kernel.

    Returns (int8 (M, K) or packed int4 (M, K/2), float32 scales (M, n_groups)) with M the
    product of the leading dims. ``round_to_input_dtype`` rounds the transformed values
    to x's dtype before quantizing, reproducing the unfused ``clq::transform`` ->
    ``clq::quant_linear`` graph exactly; off, the fused kernel keeps them in fp32.
    ``rot_precision``: see ``ROT_PRECISIONS`` (default tf32x3 on GPU). ``container``:
    how the integers are stored (``CONTAINERS``): "packed" (int4 pairs / int8), "int8" (one
    int8 per element, for the int8 GEMM route) or "fp8" (float8 e4m3, exact for 4-bit
    values, for ``torch._scaled_mm``). ``prologue``: ``clq_compile.ops.PROLOGUES``, applied
    to x first and rounded to its dtype, then ``* pro_mul`` and ``+ pro_add`` in kernel
    form (``support.modulation_operand``; LayerNorm eps ``norm_eps``; ``pro_fp32``: see
    ``clq_compile.ops.apply_prologue``). ``lzs_group``
    (16 or 32; ``bits`` 8, per token): QuaRTZ's leading-zero suppression of the int8
    codes, stored decoded (``code << FLAG``, exact in int8) for the int8 GEMM:
    ``Σ (c << f)·w`` over a group is that group's partial sum shifted by ``f``, and NVIDIA
    tensor cores have no 4-bit multiply with a per-group shift to run the coded form on.
    ``rot_outer`` given: ``rot`` is already in kernel form (:func:`rotation_operand`), so
    no value is read on the host and a trace (make_fx, Inductor) records the launch as a
    user-defined Triton kernel. Raises :class:`~clq_compile.lowering.triton.support.Unsupported`.
    """
    rot, rot_outer = _kernel_form(rot, rot_outer, x.device)
    plan = plan_quantize(x, perm, smooth, _rot_shape(rot, rot_outer), bits, group, clip,
                         container, prologue, lzs_group, _pro_rows(pro_mul, pro_add))
    m = x.numel() // plan.k if plan.k else 0
    store = CONTAINERS.index(container)
    width = plan.k // 2 if bits == 4 and store == 0 else plan.k
    dtype = torch.float8_e4m3fn if store == 2 else torch.int8
    q = torch.empty((m, width), dtype=dtype, device=x.device)
    n_groups = plan.k // plan.group if plan.group else 1
    scale = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    round_to = _round_code(x.dtype) if round_to_input_dtype else _ROUND_NONE
    _launch(x, perm, smooth, rot, rot_outer, plan, q, scale, clip, round_to,
            rot_precision, store, prologue, lzs_group, pro_mul, pro_add, norm_eps, pro_fp32)
    return q, scale


def transform(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    smooth: torch.Tensor | None,
    rot: torch.Tensor | None,
    rot_precision: str | None = None,
    rot_outer: int | None = None,
    prologue: str | None = None,
    pro_mul: torch.Tensor | None = None,
    pro_add: torch.Tensor | None = None,
    norm_eps: float = DEFAULT_NORM_EPS,
    pro_fp32: bool = False,
) -> torch.Tensor:
    """``clq::transform`` on the row kernel: computed in fp32, returned in x's dtype.
    ``rot_outer``, the prologue and its operands (in kernel form): as in
    :func:`rotate_quantize`."""
    rot, rot_outer = _kernel_form(rot, rot_outer, x.device)
    plan_prologue(x, prologue, _pro_rows(pro_mul, pro_add))
    plan = plan_rows(x, perm, smooth, _rot_shape(rot, rot_outer), 0, 0)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, perm, smooth, rot, rot_outer, plan, out.view(-1, plan.k), None, 1.0,
            _ROUND_NONE, rot_precision, prologue=prologue, pro_mul=pro_mul, pro_add=pro_add,
            norm_eps=norm_eps, pro_fp32=pro_fp32)
    return out
