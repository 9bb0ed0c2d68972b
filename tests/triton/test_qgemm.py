"""Quantized GEMM kernel: exact integer accumulation, the fp32 epilogue against its
twin, and the final output against ``clq::quant_linear``'s reference.

- Integer sums (int32 accumulator, ``store_acc``): bit-exact vs int64 sums.
- Scaled output vs ``reference.quant_matmul_reference``: bit-exact under the interpreter
  (same fp32 operations in the same order, see helpers.assert_twin).
- Scaled output vs ``ops.quant_linear_reference``: different but equally valid fp32
  evaluation orders (the reference sums dequantized fp32 products over K), so compared
  within the derived bound of helpers.matmul_bound (~(2K+G+8)·2^-24 relative to
  Σ|x||w|, plus one ulp of the output dtype).
"""

from __future__ import annotations

import pytest
import torch

from clq_compile.lowering.triton.act_quant import rotate_quantize
from clq_compile.lowering.triton.qgemm import quant_matmul
from clq_compile.lowering.triton.reference import (
    activation_ints,
    quant_matmul_reference,
    segment_sums,
)
from clq_compile.lowering.triton.support import Unsupported
from clq_compile.ops import quant_linear_reference, unpack_weight
from clq_compile.quant import dequantize, fake_quantize, pack_int4, quantize, quantize_weight
from tests.triton.helpers import (
    assert_equal,
    assert_twin,
    assert_within,
    integer_activation,
    matmul_bound,
    random_activation,
)

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_VARIANTS = {"w4a4": (4, 4), "w4a8": (4, 8), "w8a8": (8, 8), "w8a4": (8, 4)}


def _random_ints(shape: tuple[int, int], bits: int, seed: int) -> torch.Tensor:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8)


def _layout(q: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int4(q) if bits == 4 else q


# Ragged shapes: none of M, N is a multiple of the 32x32 interpreter tile except the last;
# K = 96 and 160 leave a partial 64-wide K tile.
_SHAPES = [(1, 16, 64), (17, 33, 96), (33, 20, 160), (48, 64, 256)]


@pytest.mark.parametrize("variant", list(_VARIANTS))
@pytest.mark.parametrize(("m", "n", "k"), _SHAPES)
def test_int32_accumulation_bit_exact(variant, m, n, k, device) -> None:
    """Unpacking (sign extension, nibble order), masking and the int8 dots sum exactly."""
    w_bits, a_bits = _VARIANTS[variant]
    a_int = _random_ints((m, k), a_bits, seed=m + k)
    w_int = _random_ints((n, k), w_bits, seed=n + k)
    ones_a = torch.ones(m, 1, device=device)
    acc = quant_matmul(_layout(a_int, a_bits).to(device), ones_a,
                       _layout(w_int, w_bits).to(device), torch.ones(n, 1, device=device), None,
                       a_bits=a_bits, w_bits=w_bits, out_dtype=torch.float32, store_acc=True)
    assert_equal(acc, segment_sums(a_int, w_int, k)[0], f"{variant} int32 sums")


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_int32_accumulation_extremes(variant, device) -> None:
    """All operands at the most negative code: the largest sums, and every nibble's
    sign bit set (a logical instead of arithmetic shift would show here)."""
    w_bits, a_bits = _VARIANTS[variant]
    m, n, k = 16, 16, 128
    a_int = torch.full((m, k), -(1 << (a_bits - 1)), dtype=torch.int8)
    w_int = torch.full((n, k), -(1 << (w_bits - 1)), dtype=torch.int8)
    w_int[::2] = (1 << (w_bits - 1)) - 1
    acc = quant_matmul(_layout(a_int, a_bits).to(device), torch.ones(m, 1, device=device),
                       _layout(w_int, w_bits).to(device), torch.ones(n, 1, device=device), None,
                       a_bits=a_bits, w_bits=w_bits, out_dtype=torch.float32, store_acc=True)
    assert_equal(acc, segment_sums(a_int, w_int, k)[0], f"{variant} extreme sums")


# (variant, a_group, w_group, out dtype, bias): per token x per channel, activation groups,
# weight groups, both (nested 64 in 128), all output dtypes.
_EPILOGUE_CASES = [
    ("w4a4", 0, 0, "bf16", True),
    ("w4a4", 64, 0, "fp32", False),
    ("w4a4", 0, 128, "fp16", True),
    ("w4a4", 64, 128, "bf16", True),
    ("w4a8", 0, 0, "fp16", False),
    ("w4a8", 128, 64, "bf16", True),
    ("w8a8", 0, 0, "fp32", True),
    ("w8a8", 0, 64, "bf16", False),
    ("w8a4", 64, 64, "fp32", True),
]


@pytest.mark.parametrize(("variant", "a_group", "w_group", "dt", "has_bias"), _EPILOGUE_CASES)
def test_scaled_output(variant, a_group, w_group, dt, has_bias, device) -> None:
    """Full path (act-quant kernel -> GEMM kernel) on a ragged shape: bit-exact vs the
    twin, and within the summation bound of the clq::quant_linear reference."""
    w_bits, a_bits = _VARIANTS[variant]
    m, n, k = 37, 40, 256
    dtype = _DT[dt]
    x = random_activation(m, k, dtype, seed=k + a_group)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(w_group))
    bias = torch.randn(n).to(dtype) if has_bias else None
    w_q, w_scale = quantize_weight(w, w_bits, w_group)
    a, a_scale = rotate_quantize(x.to(device), None, None, None, a_bits, a_group)
    y = quant_matmul(a, a_scale, w_q.to(device), w_scale.to(device),
                     None if bias is None else bias.to(device),
                     a_bits=a_bits, w_bits=w_bits, out_dtype=dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    twin = quant_matmul_reference(a.cpu(), a_scale.cpu(), w_q, w_scale, bias,
                                  a_bits=a_bits, w_bits=w_bits, out_dtype=dtype)
    assert_twin(y, twin, f"{variant} epilogue")

    y_ref = quant_linear_reference(x, w_q, w_scale, bias, w_bits, a_bits, a_group, 1.0)
    x_deq = fake_quantize(x.float(), a_bits, a_group)
    w_deq = dequantize(unpack_weight(w_q, w_bits), w_scale, w_group)
    n_seg = k // min(a_group or k, w_group or k)
    bound = matmul_bound(x_deq.abs(), w_deq.abs(), bias, y_ref, dtype, n_seg)
    assert_within(y, y_ref, bound, f"{variant} vs quant_linear reference")


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize(("w_group", "dt"), [(0, "bf16"), (64, "fp16"), (0, "fp32")])
def test_weight_only_exact_inputs(w_bits, w_group, dt, device) -> None:
    """W4A16 / W8A16 with integer activations: int x int products and their partial sums
    are exact in fp32, so the float dot is order-independent and the whole kernel must
    equal its twin bit for bit (ragged M, N and a partial K tile)."""
    m, n, k = 5, 40, 192
    dtype = _DT[dt]
    x = integer_activation(m, k, dtype, seed=k, hi=30)
    w_q, w_scale = quantize_weight(torch.randn(n, k), w_bits, w_group)
    bias = torch.randn(n).to(dtype)
    y = quant_matmul(x.to(device), None, w_q.to(device), w_scale.to(device), bias.to(device),
                     a_bits=16, w_bits=w_bits, out_dtype=dtype)
    twin = quant_matmul_reference(x, None, w_q, w_scale, bias, a_bits=16, w_bits=w_bits,
                                  out_dtype=dtype)
    assert_twin(y, twin, f"w{w_bits}a16 epilogue")


@pytest.mark.parametrize(("w_bits", "w_group", "dt", "m"), [(4, 0, "bf16", 1), (4, 128, "bf16", 16),
                                                            (8, 0, "fp32", 33), (4, 64, "fp16", 7)])
def test_weight_only_vs_op_reference(w_bits, w_group, dt, m, device) -> None:
    """Random activations: within the summation bound of clq::quant_linear (a_bits=16)."""
    n, k = 48, 256
    dtype = _DT[dt]
    x = random_activation(m, k, dtype, seed=m)
    w_q, w_scale = quantize_weight(torch.randn(n, k), w_bits, w_group)
    y = quant_matmul(x.to(device), None, w_q.to(device), w_scale.to(device), None,
                     a_bits=16, w_bits=w_bits, out_dtype=dtype)
    y_ref = quant_linear_reference(x, w_q, w_scale, None, w_bits, 16, 0, 1.0)
    w_deq = dequantize(unpack_weight(w_q, w_bits), w_scale, w_group)
    n_seg = k // (w_group or k)
    bound = matmul_bound(x.float().abs(), w_deq.abs(), None, y_ref, dtype, n_seg)
    assert_within(y, y_ref, bound, f"w{w_bits}a16 vs quant_linear reference")


def test_twin_agrees_with_integer_sums() -> None:
    """The twin's int path is the project's dequantized math made exact: with unit scales
    it returns the int64 sums themselves (guards the twin, not the kernel)."""
    a_int = _random_ints((8, 64), 4, seed=1)
    w_int = _random_ints((6, 64), 4, seed=2)
    y = quant_matmul_reference(pack_int4(a_int), torch.ones(8, 1), pack_int4(w_int),
                               torch.ones(6, 1), None, a_bits=4, w_bits=4,
                               out_dtype=torch.float32)
    assert_equal(y, (a_int.long() @ w_int.long().t()).float(), "twin sums")
    assert_equal(activation_ints(pack_int4(a_int), 4), a_int, "unpack")


def test_unsupported_group_raises(device) -> None:
    """A group the K tile cannot follow (48: tiles would be 16 deep) is refused with the
    reason; the dispatch layer turns that into a logged reference fallback."""
    w_q, w_scale = quantize_weight(torch.randn(8, 96), 4, 48)
    a = torch.zeros(4, 48, dtype=torch.int8, device=device)
    with pytest.raises(Unsupported, match="K tiles"):
        quant_matmul(a, torch.ones(4, 1, device=device), w_q.to(device), w_scale.to(device),
                     None, a_bits=4, w_bits=4, out_dtype=torch.float32)


@pytest.mark.parametrize("k", [64, 128, 224])
@pytest.mark.parametrize("n", [16, 45, 64])
@pytest.mark.parametrize("m", [1, 16, 31, 47])
def test_w4a4_shape_sweep(m, n, k, device) -> None:
    """W4A4 (act-quant + GEMM) over ragged sizes around the 32x32x64 interpreter tile:
    quantized activations exact vs clq_compile.quant, output exact vs the twin."""
    x = random_activation(m, k, torch.bfloat16, seed=m * 1000 + n * 10 + k)
    w_q, w_scale = quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(n)),
                                   4)
    a, a_scale = rotate_quantize(x.to(device), None, None, None, 4)
    a_ref = quantize(x.float(), 4)
    assert_equal(a, pack_int4(a_ref.q), "packed activations")
    assert_equal(a_scale, a_ref.scale, "activation scales")
    y = quant_matmul(a, a_scale, w_q.to(device), w_scale.to(device), None,
                     a_bits=4, w_bits=4, out_dtype=torch.bfloat16)
    twin = quant_matmul_reference(pack_int4(a_ref.q), a_ref.scale, w_q, w_scale, None,
                                  a_bits=4, w_bits=4, out_dtype=torch.bfloat16)
    assert_twin(y, twin, "w4a4 output")
