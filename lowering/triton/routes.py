"""GEMM routes for a quantized linear, and the rule that picks one per call.

Hopper has no int4 tensor-core instruction, and Triton's int4 path unpacks in registers
and issues two half-depth int8 dots. Two routes skip that:

- ``"fp8"``: 4-bit activations and weights are stored as float8 e4m3 (every integer in
  [-8, 7] is exact in e4m3) and multiplied by ``torch._scaled_mm`` with row-wise scales
  (per token x per channel). Products are exact and the fp32 accumulation of integers is
  exact while K·64 < 2**24; only the epilogue differs from the integer reference
  (cuBLASLt's own order of ``acc * s_a * s_w``, then the bf16 rounding), so the result
  is within a few bf16 ulps of it, not bit-equal.
- ``"int8"``: 4-bit values stored one per int8 byte run through the non-split W8A8 main
  loop (the pipelined one); the sums are the same integers, so it is bit-exact.
- ``"packed"``: the packed int4 kernel (least memory; the route off Hopper).

Rule (:func:`choose`): on sm_90+, W4A4 per token x per channel with bf16 activations and
K, N multiples of 16 takes "fp8"; other integer-activation calls on sm_90+ take "int8";
everything else "packed". Unpacked weights are made once per weight tensor and cached
(:data:`weight_cache_bytes` says how much that holds), since per-call unpacking would
re-read the weights every step.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from clq_compile.lowering.triton.derived import derived, tensor_bytes
from clq_compile.lowering.triton.support import CONTAINERS
from clq_compile.quant import unpack_int4

log = logging.getLogger(__name__)
ROUTES = CONTAINERS  # each route names the quantizer's container for it
_bias_in_epilogue = True  # cleared once if this torch's row-wise _scaled_mm refuses a bias
HOPPER = (9, 0)


def choose(
    capability: tuple[int, int] | None, dtype: torch.dtype, w_bits: int, a_bits: int,
    a_group: int, w_groups: int, k: int, n: int,
) -> str:
    """The route for one call (see the module docstring for the rule); ``capability`` is
    the CUDA device's, None off CUDA."""
    if capability is None or capability < HOPPER or a_bits == 16:
        return "packed"
    if (w_bits == 4 and a_bits == 4 and not a_group and w_groups == 1
            and dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0):
        return "fp8"
    return "int8"


def unpacked_weight(w_q: Tensor, w_bits: int, container: str, cached: bool = True) -> Tensor:
    """(N, K) weight integers one per element, as int8 or float8 e4m3; cached per tensor
    (``cached=False``: made anew, for a caller that keeps it itself)."""
    if w_bits == 8:
        if container != "int8":
            raise ValueError("8-bit weights are not exact in float8 e4m3")
        return w_q

    def unpack(w: Tensor) -> Tensor:
        u = unpack_int4(w)
        return u.to(torch.float8_e4m3fn) if container == "fp8" else u.contiguous()

    return derived(w_q, ("unpacked", container), unpack) if cached else unpack(w_q)


def weight_cache_bytes() -> int:
    return tensor_bytes("unpacked")


def fp8_matmul(
    a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """(M, N) = (a · wᵀ) ⊙ s_a ⊙ s_w + bias with ``a`` (M, K) and ``w`` (N, K) e4m3 holding
    int4 values (``w`` from :func:`unpacked_weight`).

    The bias goes into cuBLASLt's epilogue: a separate add was 20% of the GPU time of a
    W4A4 PixArt-α forward on the H200 (profile in benchmarks/results/e2e_nvidia-h200.json).
    A torch build whose row-wise kernel refuses a bias gets the add afterwards."""
    global _bias_in_epilogue
    kw = dict(scale_a=a_scale.reshape(-1, 1).float(), scale_b=w_scale.reshape(1, -1).float(),
              out_dtype=torch.bfloat16)
    if bias is not None and _bias_in_epilogue:
        try:
            return torch._scaled_mm(a, w.t(), bias=bias.to(torch.bfloat16), **kw).to(out_dtype)
        except RuntimeError as e:
            _bias_in_epilogue = False
            log.warning("torch._scaled_mm refused a bias (%s); adding it separately", e)
    y = torch._scaled_mm(a, w.t(), **kw)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)
