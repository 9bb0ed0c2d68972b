"""GEMM routes (lowering/triton/routes.py), the storage containers of the activation
quantizer, the factored Hadamard, and launch failures turning into logged fallbacks.

The int8 route runs the same integers through another main loop, so it must equal the
packed route bit for bit. The fp8 route's products and fp32 integer sums are exact too
(|q| <= 8 is exact in e4m3; sums of K products of at most 64 stay below 2**24), so it
differs from the integer epilogue only by the order in which ``torch._scaled_mm``
applies the two scales and the bias after its own bf16 rounding: at most 2 bf16 ulps.
"""

from __future__ import annotations

import logging

import pytest
import torch

from clq_compile.hadamard import hadamard
from clq_compile.lowering.triton import configs, dispatch, routes
from clq_compile.lowering.triton.act_quant import rotate_quantize, transform
from clq_compile.lowering.triton.support import Unsupported
from clq_compile.ops import transform_reference
from clq_compile.quant import quantize_weight, unpack_int4
from tests.triton.helpers import (
    assert_equal,
    assert_within,
    integer_activation,
    random_activation,
    ulp_bound,
)

_LOGGER = "clq_compile.lowering.triton.dispatch"


@pytest.mark.parametrize(("bits", "group"), [(4, 0), (4, 64), (8, 0), (8, 32)])
def test_int8_and_fp8_containers_hold_the_packed_integers(bits, group, device) -> None:
    x = random_activation(21, 256, torch.bfloat16, seed=bits + group).to(device)
    q, s = rotate_quantize(x, None, None, None, bits, group)
    expected = unpack_int4(q.cpu()) if bits == 4 else q.cpu()
    q8, s8 = rotate_quantize(x, None, None, None, bits, group, container="int8")
    assert q8.dtype == torch.int8 and q8.shape == (21, 256)
    assert_equal(q8, expected, "int8 container")
    assert_equal(s8, s.cpu(), "int8 container scales")
    if bits == 4:
        qf, sf = rotate_quantize(x, None, None, None, bits, group, container="fp8")
        assert qf.dtype == torch.float8_e4m3fn
        assert_equal(qf.float(), expected.float(), "fp8 container")
        assert_equal(sf, s.cpu(), "fp8 container scales")
    else:
        with pytest.raises(Unsupported, match="fp8 container"):
            rotate_quantize(x, None, None, None, bits, group, container="fp8")
    with pytest.raises(ValueError, match="container"):
        rotate_quantize(x, None, None, None, bits, group, container="int2")


@pytest.mark.parametrize(("w_bits", "a_bits", "a_group", "dtype"), [
    (4, 4, 0, torch.bfloat16), (4, 4, 64, torch.float16), (4, 8, 0, torch.float32),
    (8, 8, 0, torch.bfloat16),
])
def test_int8_route_is_bit_equal_to_packed(w_bits, a_bits, a_group, dtype, device) -> None:
    k, n = 256, 48
    x = random_activation(13, k, dtype, seed=3).to(device)
    w_q, w_s = quantize_weight(torch.randn(n, k), w_bits)
    bias = torch.randn(n).to(dtype).to(device)
    args = (w_q.to(device), w_s.to(device), bias, w_bits, a_bits, a_group, 0.9)
    packed = dispatch.quant_linear_triton(x, *args, route="packed")
    int8 = dispatch.quant_linear_triton(x, *args, route="int8")
    assert_equal(int8, packed.cpu(), "int8 route")


@pytest.mark.parametrize("k", [256, 4608])
def test_fp8_route_within_two_bf16_ulps_of_integer_epilogue(k, device) -> None:
    n = 64
    x = random_activation(17, k, torch.bfloat16, seed=k).to(device)
    w_q, w_s = quantize_weight(torch.randn(n, k), 4)
    bias = torch.randn(n).to(torch.bfloat16).to(device)
    args = (w_q.to(device), w_s.to(device), bias, 4, 4, 0, 1.0)
    packed = dispatch.quant_linear_triton(x, *args, route="packed")
    fp8 = dispatch.quant_linear_triton(x, *args, route="fp8")
    assert fp8.dtype == torch.bfloat16
    assert_within(fp8, packed, 2 * ulp_bound(torch.bfloat16, packed.cpu()), "fp8 route")


def test_route_rule() -> None:
    bf16 = torch.bfloat16
    hopper, ada = (9, 0), (8, 9)
    assert routes.choose(None, bf16, 4, 4, 0, 1, 1152, 4608) == "packed"  # off CUDA
    assert routes.choose(ada, bf16, 4, 4, 0, 1, 1152, 4608) == "packed"
    assert routes.choose(hopper, bf16, 4, 4, 0, 1, 1152, 4608) == "fp8"
    assert routes.choose(hopper, torch.float16, 4, 4, 0, 1, 1152, 4608) == "int8"
    assert routes.choose(hopper, bf16, 4, 4, 64, 1, 1152, 4608) == "int8"  # grouped
    assert routes.choose(hopper, bf16, 4, 8, 0, 1, 1152, 4608) == "int8"
    assert routes.choose(hopper, bf16, 4, 16, 0, 1, 1152, 4608) == "packed"  # weight-only
    assert routes.choose(hopper, bf16, 4, 4, 0, 1, 1144, 4608) == "int8"  # K % 16


def test_unpacked_weight_cache_follows_the_tensor() -> None:
    w_q, _ = quantize_weight(torch.randn(32, 64), 4)
    a = routes.unpacked_weight(w_q, 4, "int8")
    assert routes.unpacked_weight(w_q, 4, "int8") is a  # cached
    assert_equal(a, unpack_int4(w_q), "unpacked")
    before = routes.weight_cache_bytes()
    assert before >= a.numel()
    w_q.zero_()  # in-place change bumps _version: the cache must not serve stale values
    assert_equal(routes.unpacked_weight(w_q, 4, "int8"), torch.zeros(32, 64, dtype=torch.int8),
                 "after in-place change")
    del w_q, a
    assert routes.weight_cache_bytes() < before  # the entry goes with its weight
    w8, _ = quantize_weight(torch.randn(8, 32), 8)
    assert routes.unpacked_weight(w8, 8, "int8") is w8
    with pytest.raises(ValueError, match="e4m3"):
        routes.unpacked_weight(w8, 8, "fp8")


def test_factored_hadamard_256_bit_exact_on_exact_inputs(device) -> None:
    """B=256 (entries ±1/16) runs as a 16×16 dot plus four butterflies: on integer inputs
    every partial sum is exact, so it matches the dense fp32 reference bit for bit."""
    x = integer_activation(11, 512, torch.float32, seed=5)
    rot = hadamard(256)
    y = transform(x.to(device), None, None, rot.to(device))
    assert_equal(y, transform_reference(x, None, None, rot), "factored H256")


def test_non_hadamard_rotation_above_dense_limit_is_refused(device, caplog) -> None:
    q64 = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]
    x = random_activation(9, 128, torch.float32, seed=1)
    y = transform(x.to(device), None, None, q64.to(device))  # dense path still takes 64
    # a 64-term fp32 (tf32x3 on GPU) dot: 2·(B+2)·2^-24 relative to sum |x_j q_j|
    scale = (x.abs().reshape(9, -1, 64).double() @ q64.abs().double()).reshape(9, 128)
    assert_within(y, transform_reference(x, None, None, q64), 132 * 2.0**-24 * scale,
                  "dense 64")
    q128 = torch.linalg.qr(torch.randn(128, 128, generator=torch.Generator().manual_seed(1)))[0]
    with pytest.raises(Unsupported, match="not the Sylvester Hadamard"):
        transform(x.to(device), None, None, q128.to(device))
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.transform_triton(x.to(device), None, None, q128.to(device))
    expected = transform_reference(x.to(device), None, None, q128.to(device))  # same device
    assert_equal(y, expected.cpu(), "fallback")
    assert "Sylvester" in caplog.text


def test_launch_out_of_resources_falls_back(monkeypatch, device, caplog) -> None:
    """Every config too big for the GPU (triton raises OutOfResources at launch): the
    op runs the reference and says why, instead of crashing the model."""
    from triton.runtime.errors import OutOfResources

    from clq_compile.lowering.triton import act_quant
    from clq_compile.ops import quant_linear_reference

    def too_big(*args, **kwargs):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(act_quant, "rotate_quantize", too_big)
    x = random_activation(5, 64, torch.float32, seed=2)
    w_q, w_s = quantize_weight(torch.randn(16, 64), 4)
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.quant_linear_triton(x.to(device), w_q.to(device), w_s.to(device), None,
                                         4, 4, 0, 1.0, route="packed")
    expected = quant_linear_reference(x.to(device), w_q.to(device), w_s.to(device), None,
                                      4, 4, 0, 1.0)
    assert_equal(y, expected.cpu(), "fallback")
    assert "OutOfResources" in caplog.text


def test_m_bucket_keys_autotuning_by_power_of_two() -> None:
    assert [configs.m_bucket(m) for m in (1, 2, 3, 17, 4096, 4097, 10**6)] == [
        1, 2, 4, 32, 4096, 8192, 16384]
