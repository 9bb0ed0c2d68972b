"""Plain-PyTorch twins of the Triton kernels.

``rotate_quantize_reference`` is built from the project references
(``clq_compile.ops.transform_reference`` + ``clq_compile.quant``), so kernel == twin means
kernel == ground truth. The GEMM twins spell out the kernel's arithmetic: the exact integer
sums per K segment (int64, checked to fit int32) and the fp32 epilogue in the kernel's
operation order, so integer variants can be compared bit for bit.
"""

from __future__ import annotations

import torch

from clq_compile.lzs import lzs_decode, lzs_quantize
from clq_compile.ops import DEFAULT_NORM_EPS, apply_prologue, transform_reference, unpack_weight
from clq_compile.quant import pack_int4, quantize, unpack_int4

_INT32 = torch.iinfo(torch.int32)


def rotate_quantize_reference(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    smooth: torch.Tensor | None,
    rot: torch.Tensor | None,
    bits: int,
    group: int = 0,
    clip: float = 1.0,
    round_to_input_dtype: bool = True,
    prologue: str | None = None,
    lzs_group: int = 0,
    pro_mul: torch.Tensor | None = None,
    pro_add: torch.Tensor | None = None,
    norm_eps: float = DEFAULT_NORM_EPS,
    pro_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``act_quant.rotate_quantize``: prologue, transform, then
    ``clq_compile.quant`` (``clq_compile.lzs`` decoded, with ``lzs_group``). The
    modulation operands broadcast against x (the op's form, not the kernel's)."""
    k = x.shape[-1]
    x2 = apply_prologue(x, prologue, pro_mul, pro_add, norm_eps, pro_fp32).reshape(-1, k)
    if perm is None and smooth is None and rot is None:
        y = x2
    elif round_to_input_dtype:
        y = transform_reference(x2, perm, smooth, rot)
    else:
        y = transform_reference(x2.float(), perm, smooth, rot)
    if lzs_group:
        codes, flags, scale = lzs_quantize(y.float(), lzs_group, clip)
        return lzs_decode(codes, flags, lzs_group).to(torch.int8), scale
    qt = quantize(y.float(), bits, group, clip, check=False)
    q = pack_int4(qt.q) if bits == 4 else qt.q
    return q, qt.scale.reshape(x2.shape[0], -1)


def activation_ints(a: torch.Tensor, a_bits: int) -> torch.Tensor:
    """Integer activation values (M, K) from the kernel's layout."""
    return unpack_int4(a) if a_bits == 4 else a


def segment_sums(a_int: torch.Tensor, w_int: torch.Tensor, seg: int) -> torch.Tensor:
    """Exact Σ_k a[m,k]·w[n,k] over each K segment of ``seg`` elements: int32 (S, M, N).

    Computed in int64 (exact) and checked to fit int32, the kernel's accumulator."""
    k = a_int.shape[1]
    out = []
    for s in range(0, k, seg):
        acc = a_int[:, s : s + seg].long() @ w_int[:, s : s + seg].long().t()
        if acc.numel() and (acc.min() < _INT32.min or acc.max() > _INT32.max):
            raise OverflowError("integer accumulation exceeds int32")
        out.append(acc.to(torch.int32))
    return torch.stack(out)


def epilogue_reference(
    sums: torch.Tensor,
    a_scale: torch.Tensor | None,
    w_scale: torch.Tensor,
    seg: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The kernel's epilogue in its fp32 operation order: per segment
    ``out += float(acc) * (s_a[m] * s_w[n])`` (the first segment starts from 0, which is
    exact), then ``+ bias`` and one rounding to ``out_dtype``."""
    n_seg = sums.shape[0]
    k = n_seg * seg
    out = torch.zeros(sums.shape[1:], dtype=torch.float32)
    for i in range(n_seg):
        s = i * seg
        sw = w_scale[:, s // (k // w_scale.shape[1])].float()
        acc = sums[i].float()
        if a_scale is None:
            term = acc * sw[None, :]
        else:
            sa = a_scale[:, s // (k // a_scale.shape[1])].float()
            term = acc * (sa[:, None] * sw[None, :])
        out = term if i == 0 else out + term
    if bias is not None:
        out = out + bias.float()[None, :]
    return out.to(out_dtype)


def quant_matmul_reference(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    a_bits: int,
    w_bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Twin of ``qgemm.quant_matmul``. Bit-exact for integer activations; for float
    activations (weight-only) the per-segment fp32 dot is torch's, whose summation order
    differs from the kernel's (exact only when every partial sum is representable)."""
    w_int = unpack_weight(w_q, w_bits)
    k = w_int.shape[1]
    a_groups = a_scale.shape[1] if a_scale is not None else 1
    seg = min(k // a_groups, k // w_scale.shape[1])
    if a_bits == 16:
        a_f = a.float()
        w_f = w_int.float()
        sums = torch.stack([a_f[:, s : s + seg] @ w_f[:, s : s + seg].t()
                            for s in range(0, k, seg)])
        return epilogue_reference(sums, None, w_scale, seg, bias, out_dtype)
    sums = segment_sums(activation_ints(a, a_bits), w_int, seg)
    return epilogue_reference(sums, a_scale, w_scale, seg, bias, out_dtype)
