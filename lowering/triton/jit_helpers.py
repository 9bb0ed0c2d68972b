"""``@triton.jit`` helpers shared by the kernels: exact rounding and int4 unpacking.

Both roundings are written with plain fp32/int32 arithmetic instead of libdevice or a
``.to(tl.bfloat16)`` cast, because the interpreter (our CI) has no libdevice and its
fp32 -> bf16 cast truncates; these formulations give the same bits on both, so the path
the CPU tests check is the path the GPU runs.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl
from torch.library import wrap_triton


def launcher(kernel: Any) -> tuple[Any, dict[str, Any]]:
    """(what to launch, its compile options). Eagerly: the kernel itself, FMA contraction
    off, so roundings and epilogues stay the separate IEEE ops of their PyTorch twins.
    Under a trace (``wrap_triton`` gives its traceable wrapper) the compiler that receives
    the kernel, Inductor, compiles it with its own options, so none are passed: there it
    runs with Triton's default fp fusion unless ``TRITON_DEFAULT_FP_FUSION=0`` is set
    (benchmarks/run_gpu.sh sets it), up to an fp32 ulp in a contracted multiply-add."""
    launch = wrap_triton(kernel)
    return launch, ({"enable_fp_fusion": False} if launch is kernel else {})


@triton.jit
def round_half_even(v):
    """Round fp32 ``v`` to the nearest integer, ties to even (== torch.round).

    Adding 1.5 * 2**23 pushes the fraction bits out of the fp32 mantissa, so the IEEE
    round-to-nearest-even of the addition does the rounding; subtracting restores the
    value. Exact for |v| < 2**22 — callers clamp to the integer range first (clamping
    before rounding equals rounding before clamping because the bounds are integers).
    """
    return (v + 12582912.0) - 12582912.0


@triton.jit
def round_to_bf16(v):
    """The bf16 value nearest to fp32 ``v`` (ties to even), returned as fp32.

    Storing the result into a bf16 tensor is then exact whatever the store's own rounding
    is (the interpreter truncates). NaN passes through; overflow rounds to inf as IEEE does.
    """
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) & -65536
    return tl.where(v != v, v, rounded.to(tl.float32, bitcast=True))


@triton.jit
def unpack_lo(p):
    """Low nibble of int8 ``p`` sign-extended: element 2i of the ONNX INT4 order."""
    return (p << 4) >> 4


@triton.jit
def unpack_hi(p):
    """High nibble of int8 ``p`` sign-extended (arithmetic shift): element 2i+1."""
    return p >> 4
