"""Property tests of the quantization math and int4 packing over random shapes, group
sizes and odd K, each against a plain restatement of the convention (DESIGN.md §4)
written here independently of ``clq_compile.quant``. Integer results must be bit-exact."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clq_compile.errors import QuantizationError
from clq_compile.ops import quant_linear_reference
from clq_compile.passes.skip_policy import shape_skip_reason
from clq_compile.quant import (
    EPS,
    dequantize,
    fake_quantize,
    pack_int4,
    quantize,
    quantize_weight,
    unpack_int4,
)
from clq_compile.spec import QuantSpec

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def plain_codes(x: torch.Tensor, bits: int, group: int, clip: float):
    """The convention spelled out: per row (group 0) or per K-group, scale =
    max(clip·absmax, EPS)/qmax in float32, codes = clamp(round_half_even(x/scale))."""
    qmax = 2 ** (bits - 1) - 1
    k = x.shape[-1]
    g = k if group == 0 else group
    xg = x.float().reshape(*x.shape[:-1], k // g, g)
    scale = torch.clamp(xg.abs().amax(-1) * clip, min=EPS) / qmax
    codes = torch.clamp(torch.round(xg / scale.unsqueeze(-1)), -qmax - 1, qmax)
    return codes.reshape(x.shape).to(torch.int8), scale


@st.composite
def tensors(draw, even_k: bool = False):
    rows = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 4))
    group = draw(st.sampled_from([2, 4, 8, 16, 32]))
    k = groups * group
    if not even_k and draw(st.booleans()):
        k, group = k + 1, 0  # odd K: only per-row scales apply
    per_row = group == 0 or draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):
        x[:, draw(st.integers(0, k - 1))] *= 100.0  # an outlier channel
    return x, 0 if per_row else group


@SETTINGS
@given(tensors(), st.sampled_from([4, 8]), st.sampled_from([1.0, 0.9, 0.5]))
def test_quantize_matches_the_plain_convention(xg, bits, clip):
    x, group = xg
    qt = quantize(x, bits, group, clip)
    codes, scale = plain_codes(x, bits, group, clip)
    assert torch.equal(qt.q, codes)
    assert torch.equal(qt.scale, scale)


@SETTINGS
@given(tensors(), st.sampled_from([4, 8]))
def test_fake_quantize_error_is_at_most_half_a_step(xg, bits):
    """With clip 1 nothing saturates: every value lands within scale/2 of its code."""
    x, group = xg
    _, scale = plain_codes(x, bits, group, 1.0)
    k = x.shape[-1]
    g = k if group == 0 else group
    step = scale.unsqueeze(-1).expand(*scale.shape, g).reshape(x.shape)
    err = (fake_quantize(x, bits, group, 1.0) - x).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-30).all()


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_int4_pack_roundtrip_and_nibble_order(rows, half_k, seed):
    q = torch.randint(-8, 8, (rows, 2 * half_k), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.int8)
    p = pack_int4(q)
    assert p.shape == (rows, half_k) and p.dtype == torch.int8
    assert torch.equal(unpack_int4(p), q)
    u = p.view(torch.uint8).to(torch.int16)
    low = ((u & 0xF) ^ 8) - 8  # sign-extend each nibble by hand
    high = ((u >> 4) ^ 8) - 8
    assert torch.equal(low.to(torch.int8), q[:, 0::2])  # element 2i: low nibble
    assert torch.equal(high.to(torch.int8), q[:, 1::2])


@SETTINGS
@given(st.integers(1, 4), st.integers(0, 20))
def test_odd_k_cannot_be_int4_packed_and_is_a_recorded_skip(rows, half_k):
    k = 2 * half_k + 1
    with pytest.raises(QuantizationError, match="even"):
        pack_int4(torch.zeros(rows, k, dtype=torch.int8))
    assert "odd" in shape_skip_reason(k, QuantSpec(4, 4))
    assert shape_skip_reason(k, QuantSpec(8, 8)) == ""  # int8 needs no packing


@SETTINGS
@given(tensors(even_k=True), st.sampled_from([4, 8]), st.sampled_from([4, 8, 16]),
       st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_quant_linear_reference_is_a_plain_dequantized_matmul(xg, w_bits, a_bits, n, seed):
    """y = Q_a(x) · (codes · scale)ᵀ + b, the activation per token (group 0) here;
    float32 matmul of identical operands, so the tolerance is float32 rounding alone."""
    x, group = xg
    k = x.shape[-1]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    w_q, w_scale = quantize_weight(w, w_bits, group)
    y = quant_linear_reference(x, w_q, w_scale, b, w_bits, a_bits, 0, 1.0)
    w_codes, w_s = plain_codes(w, w_bits, group, 1.0)
    w_hat = dequantize(w_codes, w_s, group)
    x_hat = x.float() if a_bits == 16 else dequantize(*plain_codes(x, a_bits, 0, 1.0), 0)
    expect = x_hat @ w_hat.t() + b
    assert torch.allclose(y, expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max()) + 1e-6)
