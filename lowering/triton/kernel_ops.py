"""The kernels as ``torch.library.triton_op``s, so that a trace sees them.

A ``custom_op`` is opaque: Inductor calls it as an extern kernel, through Python, every
call. A triton_op's body is traced instead, and each launch in it (``wrap_triton``)
becomes a user-defined Triton kernel that Inductor compiles into its own output code, with
no Python dispatch per call and nothing in the way of CUDA graphs.

The bodies therefore only launch. Every decision that reads a value or asks the GPU (the
route, the rotation's kernel form, the unpacked weight, whether a call is supported) is
made before the op: by ``dispatch`` on each eager call, or once at compile time by
``lower.LowerToKernels``. Eagerly the op runs its body with ``wrap_triton`` off, so the
kernels launch directly (under ``TRITON_INTERPRET=1`` too: that is how CPU tests run it).

Import this module only after choosing interpret vs compile (``TRITON_INTERPRET``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.library import triton_op

from clq_compile.lowering.triton import act_quant, qgemm, routes
from clq_compile.lowering.triton.support import modulation_operand
from clq_compile.ops import apply_prologue


@triton_op("clq_triton::quant_linear", mutates_args={})
def quant_linear(
    x: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    perm: Tensor | None,
    smooth: Tensor | None,
    rot_tile: Tensor | None,
    rot_outer: int,
    pro_mul: Tensor | None,
    pro_add: Tensor | None,
    route: str,
    w_bits: int,
    a_bits: int,
    a_group: int,
    a_clip: float,
    prologue: str | None,
    lzs_group: int,
    norm_eps: float,
    pro_fp32: bool,
) -> Tensor:
    """``clq::quant_linear`` on the kernels, decided (``dispatch.plan_linear``): transform
    and quantize x (one launch; none for weight-only ``a_bits`` 16), then the route's GEMM.
    ``w`` is the route's weight (``LinearCall.weight``), ``rot_tile``/``rot_outer`` the
    rotation in kernel form (``act_quant.rotation_operand``), ``pro_mul``/``pro_add`` the
    prologue's modulation as the op takes it (broadcasting against x)."""
    with _on_device(x):
        return _quant_linear(x, w, w_scale, bias, perm, smooth, rot_tile, rot_outer, pro_mul,
                             pro_add, route, w_bits, a_bits, a_group, a_clip, prologue,
                             lzs_group, norm_eps, pro_fp32)


def _quant_linear(
    x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, perm: Tensor | None,
    smooth: Tensor | None, rot_tile: Tensor | None, rot_outer: int, pro_mul: Tensor | None,
    pro_add: Tensor | None, route: str, w_bits: int, a_bits: int, a_group: int,
    a_clip: float, prologue: str | None, lzs_group: int, norm_eps: float, pro_fp32: bool,
) -> Tensor:
    k = x.shape[-1]
    n = w.shape[0]
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], n))
    if a_bits == 16:  # weight-only: no quantizer to fuse the prologue into
        x2 = apply_prologue(x, prologue, pro_mul, pro_add, norm_eps, pro_fp32).reshape(-1, k)
        if perm is not None or smooth is not None or rot_tile is not None:
            x2 = act_quant.transform(x2, perm, smooth, rot_tile, rot_outer=rot_outer)
        y = qgemm.quant_matmul(x2, None, w, w_scale, bias, a_bits=16, w_bits=w_bits,
                               out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], n)
    mul_rows, add_rows = _modulation_form(x, pro_mul, pro_add, pro_fp32)
    # Rounded to x's dtype before quantizing, as clq::transform's output would be.
    a, a_scale = act_quant.rotate_quantize(x.reshape(-1, k), perm, smooth, rot_tile, a_bits,
                                           a_group, a_clip, container=route,
                                           prologue=prologue, lzs_group=lzs_group,
                                           rot_outer=rot_outer, pro_mul=mul_rows,
                                           pro_add=add_rows, norm_eps=norm_eps,
                                           pro_fp32=pro_fp32)
    if route == "fp8":
        y = routes.fp8_matmul(a, a_scale, w, w_scale, bias, x.dtype)
    elif route == "int8":
        y = qgemm.quant_matmul(a, a_scale, w, w_scale, bias, a_bits=8, w_bits=8,
                               out_dtype=x.dtype)
    else:
        y = qgemm.quant_matmul(a, a_scale, w, w_scale, bias, a_bits=a_bits, w_bits=w_bits,
                               out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], n)


@triton_op("clq_triton::transform", mutates_args={})
def transform(
    x: Tensor, perm: Tensor | None, smooth: Tensor | None, rot_tile: Tensor | None,
    rot_outer: int, pro_mul: Tensor | None, pro_add: Tensor | None, prologue: str | None,
    norm_eps: float, pro_fp32: bool,
) -> Tensor:
    """``clq::transform`` on the row kernel, the rotation in kernel form, the prologue's
    modulation as the op takes it."""
    with _on_device(x):
        mul_rows, add_rows = _modulation_form(x, pro_mul, pro_add, pro_fp32)
        return act_quant.transform(x, perm, smooth, rot_tile, rot_outer=rot_outer,
                                   prologue=prologue, pro_mul=mul_rows, pro_add=add_rows,
                                   norm_eps=norm_eps, pro_fp32=pro_fp32)


def _modulation_form(x: Tensor, pro_mul: Tensor | None, pro_add: Tensor | None, pro_fp32: bool
                 ) -> tuple[Tensor | None, Tensor | None]:
    dtype = torch.float32 if pro_fp32 else x.dtype
    return modulation_operand(pro_mul, x.shape, dtype), modulation_operand(pro_add, x.shape,
                                                                           dtype)


def _on_device(x: Tensor) -> contextlib.AbstractContextManager:
    """Launch on x's GPU, not the current one (a model on cuda:1 with cuda:0 current)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
