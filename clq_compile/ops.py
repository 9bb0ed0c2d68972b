"""``torch.ops.clq.*``: the quantized ops rewritten graphs hold.

Each op has a plain-PyTorch reference (the CPU implementation, and the ground truth that
Triton kernels and the ONNX lowering are tested against) and a fake implementation, so
graphs holding the ops still export, compile and serialize. Device back ends register
their own kernels for these ops (``lowering/triton``) and fall back to these references.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from clq_compile.hadamard import block_hadamard
from clq_compile.lzs import lzs_fake_quantize
from clq_compile.quant import dequantize, fake_quantize, unpack_int4
from clq_compile.spec import A_FORMATS, W_FORMATS
from clq_compile.twinlog import twinlog_values

# Ops a quant_linear may apply to x first (the op that produced its input, fused into the
# quantizer): the GELUs (name -> F.gelu's ``approximate``) and a LayerNorm over the last
# dim without affine parameters (the norm before adaLN modulation).
GELU_PROLOGUES = {"gelu": "none", "gelu_tanh": "tanh"}
PROLOGUES = (*GELU_PROLOGUES, "layer_norm")
DEFAULT_NORM_EPS = 1e-5  # torch.nn.LayerNorm's


def apply_prologue(x: Tensor, prologue: str | None, pro_mul: Tensor | None = None,
                   pro_add: Tensor | None = None, norm_eps: float = DEFAULT_NORM_EPS,
                   pro_fp32: bool = False) -> Tensor:
    """``prologue``, then ``* pro_mul``, then ``+ pro_add`` (adaLN's ``1 + scale`` and
    ``shift``), each in x's dtype, as the unfused graph computes them; with ``pro_fp32``
    each in float32 (operands float32) and the result cast to x's dtype once, as Wan's
    ``(norm(x.float()) * (1 + scale) + shift).type_as(x)``."""
    dtype = torch.float32 if pro_fp32 else x.dtype
    for name, t in (("pro_mul", pro_mul), ("pro_add", pro_add)):
        if t is not None and t.dtype != dtype:
            raise ValueError(f"{name} is {t.dtype}, the prologue computes in {dtype} (no "
                             "type promotion; pro_fp32 selects float32)")
    y = x.float() if pro_fp32 else x
    if prologue in GELU_PROLOGUES:
        y = torch.nn.functional.gelu(y, approximate=GELU_PROLOGUES[prologue])
    elif prologue == "layer_norm":
        y = torch.nn.functional.layer_norm(y, (y.shape[-1],), eps=norm_eps)
    elif prologue is not None:
        raise ValueError(f"prologue {prologue!r} not in {(None, *PROLOGUES)}")
    if pro_mul is not None:
        y = y * pro_mul
    if pro_add is not None:
        y = y + pro_add
    return y.to(x.dtype)


def modulation_rows(operand: Sequence[int], x: Sequence[int]) -> tuple[int, int] | None:
    """(rows, per) when an operand shaped ``operand`` broadcasts against x (..., K) as
    ``rows`` rows of K values, each serving ``per`` consecutive rows of x.reshape(-1, K):
    its leading dims are x's, the rest but the last are 1 (adaLN's (B, 1, K) per sample,
    (K,) for all, (B, T, K) per token). None for any other broadcast."""
    if not operand or len(operand) > len(x) or not statically_known_true(operand[-1] == x[-1]):
        return None
    lead, own = tuple(x[:-1]), (1,) * (len(x) - len(operand)) + tuple(operand[:-1])
    j = 0
    while j < len(lead) and statically_known_true(own[j] == lead[j]):
        j += 1
    if not all(statically_known_true(d == 1) for d in own[j:]):
        return None
    return math.prod(lead[:j]), math.prod(lead[j:])


def sample_mask(rows: Tensor, x: Tensor) -> Tensor:
    """``rows`` (bool per sample, or one for all) shaped to broadcast against x's rows."""
    n = rows.numel()
    if rows.dim() > 1 or (n != 1 and (x.dim() < 2 or n != x.shape[0])):
        raise ValueError(f"a8_rows of shape {tuple(rows.shape)} does not match an input of "
                         f"shape {tuple(x.shape)}: expected one flag, or one per sample "
                         "(dim 0)")
    return rows.to(device=x.device, dtype=torch.bool).reshape(-1, *[1] * (x.dim() - 1))


def weight_group(k: int, w_scale: Tensor) -> int:
    """Group size implied by a weight-scale tensor of shape (N, n_groups): 0 = per channel."""
    n_groups = w_scale.shape[-1]
    return 0 if n_groups == 1 else k // n_groups


def unpack_weight(w_q: Tensor, w_bits: int) -> Tensor:
    """Integer weight values (N, K) in an int8 container."""
    return unpack_int4(w_q) if w_bits == 4 else w_q


def transform_reference(
    x: Tensor, perm: Tensor | None, smooth: Tensor | None, rot: Tensor | None,
    prologue: str | None = None, pro_mul: Tensor | None = None, pro_add: Tensor | None = None,
    norm_eps: float = DEFAULT_NORM_EPS, pro_fp32: bool = False,
) -> Tensor:
    x = apply_prologue(x, prologue, pro_mul, pro_add, norm_eps, pro_fp32)
    y = x.to(torch.float32, copy=True)  # never alias the input (custom-op rule)
    if perm is not None:
        y = y.index_select(-1, perm)
    if smooth is not None:
        y = y * smooth
    if rot is not None:
        y = block_hadamard(y, rot.float())
    return y.to(x.dtype)


@torch.library.custom_op("clq::transform", mutates_args=())
def transform(x: Tensor, perm: Tensor | None, smooth: Tensor | None, rot: Tensor | None,
              prologue: str | None = None, pro_mul: Tensor | None = None,
              pro_add: Tensor | None = None, norm_eps: float = DEFAULT_NORM_EPS,
              pro_fp32: bool = False) -> Tensor:
    """Online input transform x ↦ ((x[..., perm] * smooth) · blockdiag(rot)).

    ``perm`` is an int64 channel order, ``smooth`` a per-channel float scale (in permuted
    order; SmoothQuant's 1/s, QuaRot's random signs), ``rot`` one B×B block repeated along K
    or (K/B, B, B), each run of B channels by its own block.
    Any of them may be None. ``prologue``, ``pro_mul``, ``pro_add``, ``norm_eps``: the op
    that produced x, applied first (:func:`apply_prologue`; see ``quant_linear``).
    """
    return transform_reference(x, perm, smooth, rot, prologue, pro_mul, pro_add, norm_eps,
                               pro_fp32)


@transform.register_fake
def _(x: Tensor, perm: Tensor | None, smooth: Tensor | None, rot: Tensor | None,
      prologue: str | None = None, pro_mul: Tensor | None = None, pro_add: Tensor | None = None,
      norm_eps: float = DEFAULT_NORM_EPS, pro_fp32: bool = False) -> Tensor:
    return torch.empty_like(x)


def quant_linear_reference(
    x: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    w_bits: int,
    a_bits: int,
    a_group: int,
    a_clip: float,
    perm: Tensor | None = None,
    smooth: Tensor | None = None,
    rot: Tensor | None = None,
    prologue: str | None = None,
    a_format: str = "int",
    w_format: str = "int",
    a8_rows: Tensor | None = None,
    pro_mul: Tensor | None = None,
    pro_add: Tensor | None = None,
    norm_eps: float = DEFAULT_NORM_EPS,
    pro_fp32: bool = False,
) -> Tensor:
    x = apply_prologue(x, prologue, pro_mul, pro_add, norm_eps, pro_fp32)
    if perm is not None or smooth is not None or rot is not None:
        x = transform_reference(x, perm, smooth, rot)
    w = reference_weight(w_q, w_scale, w_bits, w_format, x.shape[-1])
    xf = reference_activation(x, a_bits, a_group, a_clip, a_format, a8_rows)
    return reference_product(xf, w, bias, x.dtype)


# The reference in three pieces, so a clip search can keep the ones its trials share
# (qlinear.LinearMemo) and still compute exactly what the op computes.
def reference_weight(w_q: Tensor, w_scale: Tensor, w_bits: int, w_format: str,
                     k: int) -> Tensor:
    """The weight's float32 values (N, K)."""
    if w_format == "twinlog":
        return twinlog_values(w_q, w_scale)
    if w_format != "int":
        raise ValueError(f"w_format {w_format!r} not in {W_FORMATS}")
    return dequantize(unpack_weight(w_q, w_bits), w_scale, weight_group(k, w_scale))


def reference_activation(x: Tensor, a_bits: int, a_group: int, a_clip: float,
                         a_format: str = "int", a8_rows: Tensor | None = None) -> Tensor:
    """The (transformed) activation as the product sees it: float32, fake-quantized."""
    xf = x.float()
    if a8_rows is not None and (a_format != "int" or a_bits >= 8):
        raise ValueError(f"a8_rows raises integer activations below 8 bits to 8; got "
                         f"a_bits={a_bits}, a_format={a_format!r}")
    if a_format == "lzs":
        return lzs_fake_quantize(xf, a_group, a_clip)
    if a_format != "int":
        raise ValueError(f"a_format {a_format!r} not in {A_FORMATS}")
    if a8_rows is not None:
        return torch.where(sample_mask(a8_rows, xf), fake_quantize(xf, 8, a_group, 1.0),
                           fake_quantize(xf, a_bits, a_group, a_clip))
    return fake_quantize(xf, a_bits, a_group, a_clip) if a_bits < 16 else xf


def reference_product(xf: Tensor, w: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    y = xf @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


@torch.library.custom_op("clq::quant_linear", mutates_args=())
def quant_linear(
    x: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    w_bits: int,
    a_bits: int,
    a_group: int,
    a_clip: float,
    perm: Tensor | None = None,
    smooth: Tensor | None = None,
    rot: Tensor | None = None,
    prologue: str | None = None,
    a_format: str = "int",
    w_format: str = "int",
    a8_rows: Tensor | None = None,
    pro_mul: Tensor | None = None,
    pro_add: Tensor | None = None,
    norm_eps: float = DEFAULT_NORM_EPS,
    pro_fp32: bool = False,
) -> Tensor:
    """y = Q_a(T(P(x))) · Q_w(W)ᵀ + b with a dynamically quantized activation.

    ``w_q``: int8 (N, K/2) packed int4 when ``w_bits`` is 4, else int8 (N, K).
    ``w_scale``: float32 (N, K/group) (N, 1) per output channel.
    ``a_bits`` 16 keeps the activation in float (weight-only); otherwise the activation is
    quantized symmetric per token (``a_group`` 0) or per K-group, with scale
    ``max(a_clip * absmax, EPS) / qmax``.
    ``perm``/``smooth``/``rot``: the input transform ``T`` of ``clq::transform`` (identity
    when all None), computed exactly as that op computes it, then quantized: a transform
    with one consumer runs inside the activation quantizer (one kernel, one read of x).
    ``prologue`` (``PROLOGUES``), ``pro_mul``, ``pro_add``, ``norm_eps``: the op that
    produced x, fused into its quantizer and applied first (:func:`apply_prologue`): the
    GELU before an MLP's down-projection, or the LayerNorm (eps ``norm_eps``) and adaLN
    modulation ``* (1 + scale) + shift`` before q/k/v or an MLP (``pro_mul``/``pro_add``
    in x's dtype, broadcasting against x; ``pro_fp32``: all of it in float32, operands
    float32, cast to x's dtype once).
    ``a_format`` "lzs": the activation is coded by QuaRTZ's leading-zero suppression
    (``clq_compile.lzs``, ``a_bits`` 4, ``a_group`` its group) instead of as integers.
    ``w_format`` "twinlog": ``w_q`` holds LRQ-DiT twin-log codes (less 8, packed int4)
    and ``w_scale`` each row's table of 16 values (``clq_compile.twinlog``).
    ``a8_rows``: bool per sample (x's dim 0; one value: every sample): those samples'
    activations are quantized to 8 bits at clip 1 instead (``timestep_bits``: the
    precision a timestep's policy picks, as data, no branch per call).
    """
    return quant_linear_reference(x, w_q, w_scale, bias, w_bits, a_bits, a_group, a_clip,
                                  perm, smooth, rot, prologue, a_format, w_format, a8_rows,
                                  pro_mul, pro_add, norm_eps, pro_fp32)


@quant_linear.register_fake
def _(
    x: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    w_bits: int,
    a_bits: int,
    a_group: int,
    a_clip: float,
    perm: Tensor | None = None,
    smooth: Tensor | None = None,
    rot: Tensor | None = None,
    prologue: str | None = None,
    a_format: str = "int",
    w_format: str = "int",
    a8_rows: Tensor | None = None,
    pro_mul: Tensor | None = None,
    pro_add: Tensor | None = None,
    norm_eps: float = DEFAULT_NORM_EPS,
    pro_fp32: bool = False,
) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))
