"""Reference quantization math: round trips, bounds, edge cases."""

import pytest
import torch

from clq_compile.errors import QuantizationError
from clq_compile.quant import (
    PER_TENSOR,
    dequantize,
    pack_int4,
    qrange,
    quantize,
    quantize_weight,
    symmetric_scale,
    unpack_int4,
)


def test_int4_pack_roundtrip_all_values():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    p = pack_int4(q)
    assert p.shape == (3, 16) and p.dtype == torch.int8
    assert torch.equal(unpack_int4(p), q)


def test_int4_pack_order_is_onnx_order():
    """Element 2i in the low nibble, 2i+1 in the high nibble (ONNX INT4)."""
    q = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    p = pack_int4(q).view(torch.uint8).to(torch.int32)
    lo, hi = p & 0xF, p >> 4
    assert torch.equal(lo, (q[:, 0::2].to(torch.int32) & 0xF))
    assert torch.equal(hi, (q[:, 1::2].to(torch.int32) & 0xF))


def test_pack_rejects_out_of_range_and_odd():
    with pytest.raises(QuantizationError):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(QuantizationError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [0, 16, PER_TENSOR])
def test_symmetric_roundtrip_error_within_half_step(bits, group):
    x = torch.randn(6, 64) * torch.linspace(0.1, 10, 64)
    qt = quantize(x, bits, group)
    lo, hi = qrange(bits)
    assert qt.q.min() >= lo and qt.q.max() <= hi
    err = (qt.dequantize() - x).abs()
    s = qt.scale.reshape(1, 1) if group == PER_TENSOR else qt.scale.repeat_interleave(
        64 if group == 0 else group, dim=-1
    ).reshape(x.shape)
    assert (err <= s / 2 + 1e-6).all()


def test_asymmetric_roundtrip_error_within_half_step():
    x = torch.rand(4, 32) * 5 + 1  # all positive: asymmetric uses the whole range
    qt = quantize(x, 4, 0, symmetric=False)
    err = (qt.dequantize() - x).abs()
    assert (err <= qt.scale / 2 + 1e-6).all()  # scale: (rows, 1 group)
    # one-sided data is represented better than by the symmetric quantizer
    assert err.pow(2).mean() < (quantize(x, 4, 0).dequantize() - x).pow(2).mean()


def test_all_zero_rows_quantize_to_zero():
    x = torch.zeros(3, 16)
    x[1] = torch.randn(16)
    qt = quantize(x, 4, 0)
    assert torch.isfinite(qt.scale).all()
    assert (qt.q[0] == 0).all() and (qt.q[2] == 0).all()
    assert torch.equal(qt.dequantize()[0], torch.zeros(16))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_rejected(bad):
    x = torch.randn(2, 8)
    x[0, 3] = bad
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        quantize(x, 4)


def test_clip_ratio_saturates_largest_values():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.1]])
    qt = quantize(x, 4, 0, clip=0.5)
    assert torch.allclose(qt.scale, torch.tensor([0.5 / 7]))
    assert qt.q[0, 0] == 7  # 1.0 / (0.5/7) = 14 saturates to qmax
    with pytest.raises(QuantizationError):
        symmetric_scale(x, 4, 0, clip=1.5)


def test_group_must_divide_k():
    with pytest.raises(QuantizationError, match="does not divide"):
        quantize(torch.randn(2, 10), 4, 4)


def test_rounding_is_half_to_even():
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    q = quantize(x, 4, 0).q  # scale = 7/7 = 1
    assert q.tolist() == [[7, 0, 2, 2, 0, -2]]


@pytest.mark.parametrize("bits,group", [(4, 0), (4, 32), (8, 0)])
def test_quantize_weight_layout(bits, group):
    w = torch.randn(24, 64)
    w_q, w_s = quantize_weight(w, bits, group)
    assert w_q.shape == (24, 32 if bits == 4 else 64) and w_q.dtype == torch.int8
    assert w_s.shape == (24, 1 if group == 0 else 64 // group) and w_s.dtype == torch.float32
    q = unpack_int4(w_q) if bits == 4 else w_q
    deq = dequantize(q, w_s, group)
    assert (deq - w).abs().max() <= w_s.max() / 2 + 1e-6
