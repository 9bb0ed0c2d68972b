"""Op dispatch: registration, the Triton path of clq::quant_linear / clq::transform run on
CPU tensors under the interpreter, and logged reference fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

import clq_compile  # noqa: F401 - defines torch.ops.clq
from clq_compile.hadamard import hadamard
from clq_compile.lowering.triton import configs, dispatch
from clq_compile.lowering.triton.act_quant import rotate_quantize
from clq_compile.lzs import lzs_fake_quantize
from clq_compile.ops import quant_linear_reference, transform_reference, unpack_weight
from clq_compile.quant import dequantize, fake_quantize, quantize_weight
from clq_compile.testing import orthogonal_blocks
from clq_compile.twinlog import twinlog_weight
from tests.triton.helpers import (
    assert_equal,
    assert_quant_linear_agrees,
    assert_within,
    integer_activation,
    kernel_ints,
    matmul_bound,
    quant_linear_arguments,
    random_activation,
)

_LOGGER = "clq_compile.lowering.triton.dispatch"


def test_register_is_idempotent_and_adds_cuda_kernels() -> None:
    assert dispatch.register() is True
    assert dispatch.register() is True
    for op in ("clq::quant_linear", "clq::transform"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def test_register_without_triton_is_a_logged_noop(monkeypatch, caplog) -> None:
    monkeypatch.setattr(dispatch, "_registered", False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: (False, "triton is not installed"))
    with caplog.at_level(logging.INFO, logger=_LOGGER):
        assert dispatch.register() is False
    assert "triton is not installed" in caplog.text
    assert not dispatch.is_registered()


def test_cpu_op_keeps_the_reference() -> None:
    """Registering CUDA kernels must not change what the op computes on CPU."""
    dispatch.register()
    x = random_activation(6, 64, torch.float32, seed=0)
    w_q, w_s = quantize_weight(torch.randn(8, 64), 4)
    y = torch.ops.clq.quant_linear(x, w_q, w_s, None, 4, 4, 0, 1.0)
    assert_equal(y, quant_linear_reference(x, w_q, w_s, None, 4, 4, 0, 1.0), "CPU op")


# (w_bits, a_bits, a_group, w_group, dtype, leading shape): the bits pairs of DESIGN §1
# plus grouping and a 3-D (batch, tokens, K) input.
_CASES = [
    (4, 4, 0, 0, torch.bfloat16, (2, 9)),
    (4, 4, 64, 128, torch.float16, (17,)),
    (4, 8, 0, 0, torch.float32, (2, 5)),
    (8, 8, 0, 64, torch.bfloat16, (13,)),
    (4, 16, 0, 128, torch.bfloat16, (3,)),
]


@pytest.mark.parametrize(("w_bits", "a_bits", "a_group", "w_group", "dtype", "lead"), _CASES)
def test_quant_linear_triton_matches_op_reference(
    w_bits, a_bits, a_group, w_group, dtype, lead, device, caplog
) -> None:
    """The registered function end to end, within the summation bound of the reference
    (see helpers.matmul_bound), with no fallback taken."""
    k, n = 256, 48
    x = random_activation(int(torch.tensor(lead).prod()), k, dtype, seed=k).reshape(*lead, k)
    w_q, w_s = quantize_weight(torch.randn(n, k), w_bits, w_group)
    bias = torch.randn(n).to(dtype)
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.quant_linear_triton(x.to(device), w_q.to(device), w_s.to(device),
                                         bias.to(device), w_bits, a_bits, a_group, 0.9)
    assert "reference" not in caplog.text
    y_ref = quant_linear_reference(x, w_q, w_s, bias, w_bits, a_bits, a_group, 0.9)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    x2 = x.reshape(-1, k).float()
    x_deq = fake_quantize(x2, a_bits, a_group, 0.9) if a_bits < 16 else x2
    w_deq = dequantize(unpack_weight(w_q, w_bits), w_s, w_group)
    n_seg = k // min(a_group or k, w_group or k)
    bound = matmul_bound(x_deq.abs(), w_deq.abs(), bias, y_ref.reshape(-1, n), dtype, n_seg)
    assert_within(y.reshape(-1, n), y_ref.reshape(-1, n), bound, "quant_linear_triton")


def test_quant_linear_fallback_is_exact_and_logged_once(device, caplog) -> None:
    """Activation group 48 cannot be tiled: the reference runs, the reason is logged once
    per shape however many times the op is called."""
    k, n = 96, 16
    x = random_activation(4, k, torch.float32, seed=1)
    w_q, w_s = quantize_weight(torch.randn(n, k), 4)
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        for _ in range(3):
            y = dispatch.quant_linear_triton(x.to(device), w_q.to(device), w_s.to(device), None,
                                             4, 4, 48, 1.0)
    expected = quant_linear_reference(x.to(device), w_q.to(device), w_s.to(device), None,
                                      4, 4, 48, 1.0)
    assert_equal(y, expected.cpu(), "fallback")
    records = [r for r in caplog.records if "group 48" in r.getMessage()]
    assert len(records) == 1, caplog.text


def test_transform_triton_and_fallback(device, caplog) -> None:
    """Exact inputs through the kernel; a rotation block of 8 (below the tl.dot minimum)
    falls back to the reference with the reason logged."""
    x = integer_activation(7, 64, torch.bfloat16, seed=2)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    rot = hadamard(16)
    y = dispatch.transform_triton(x.to(device), perm.to(device), None, rot.to(device))
    assert_equal(y, transform_reference(x, perm, None, rot), "transform")
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y8 = dispatch.transform_triton(x.to(device), None, None, hadamard(8).to(device))
    expected = transform_reference(x.to(device), None, None, hadamard(8).to(device))
    assert_equal(y8, expected.cpu(), "transform fallback")
    assert "rotation block 8" in caplog.text


def test_cpu_without_interpreter_falls_back(monkeypatch, caplog) -> None:
    """Plain CPU tensors without TRITON_INTERPRET cannot run Triton: reference + reason."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    x = random_activation(3, 64, torch.float32, seed=3)
    w_q, w_s = quantize_weight(torch.randn(8, 64), 4)
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.quant_linear_triton(x, w_q, w_s, None, 4, 4, 0, 1.0)
    assert_equal(y, quant_linear_reference(x, w_q, w_s, None, 4, 4, 0, 1.0), "fallback")
    assert "TRITON_INTERPRET" in caplog.text


@pytest.mark.parametrize(("a_bits", "a_group", "route", "b"), [
    (4, 0, None, 64), (4, 0, "int8", 256), (4, 0, "fp8", 16), (8, 64, None, 256),
    (16, 0, None, 64),
])
def test_quant_linear_with_fused_transform(a_bits, a_group, route, b, device, caplog) -> None:
    """The input transform inside quant_linear (one kernel: gather, smooth, rotate,
    quantize; H256 factored) on exact inputs (integers, power-of-two smoothing, Hadamard
    entries ±2^-j): the transformed values are exact, so the integers equal the
    reference's and the output is within the GEMM's summation bound."""
    k, n, dtype = 256, 32, torch.bfloat16
    x = integer_activation(6, k, dtype, seed=b)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(k, generator=g)
    smooth = 2.0 ** torch.randint(-2, 3, (k,), generator=g).float()
    rot = hadamard(b)
    w_q, w_s = quantize_weight(torch.randn(n, k, generator=g), 4)
    t = [v.to(device) for v in (perm, smooth, rot)]
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.quant_linear_triton(x.to(device), w_q.to(device), w_s.to(device), None,
                                         4, a_bits, a_group, 1.0, *t, route=route)
    assert "reference" not in caplog.text
    y_ref = quant_linear_reference(x, w_q, w_s, None, 4, a_bits, a_group, 1.0, perm, smooth, rot)
    xt = transform_reference(x, perm, smooth, rot).float()
    x_deq = fake_quantize(xt, a_bits, a_group, 1.0) if a_bits < 16 else xt
    w_deq = dequantize(unpack_weight(w_q, 4), w_s, 0)
    bound = matmul_bound(x_deq.abs(), w_deq.abs(), None, y_ref, dtype, k // (a_group or k))
    assert_within(y.cpu(), y_ref, bound, "quant_linear with transform")


def test_modulation_per_frame_falls_back_with_the_reason(device, caplog) -> None:
    """A modulation operand shaped (1, T, K) against x (B, T, K) is neither per sample nor
    per token: the kernels decline it (their rows index one operand row per run of x's
    rows); the reference runs, exactly, and says why."""
    k, n = 64, 16
    x = random_activation(2 * 5, k, torch.float32, seed=3).reshape(2, 5, k)
    mul = torch.randn(1, 5, k, generator=torch.Generator().manual_seed(4))
    w_q, w_s = quantize_weight(torch.randn(n, k), 4)
    args = (x.to(device), w_q.to(device), w_s.to(device), None, 4, 4, 0, 1.0, None, None,
            None, "layer_norm")
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.quant_linear_triton(*args, pro_mul=mul.to(device))
    assert "is not one row per sample or token" in caplog.text
    assert_equal(y, quant_linear_reference(*args, pro_mul=mul.to(device)).cpu(), "fallback")


@pytest.mark.parametrize("route", [None, "int8", "fp8"])
def test_quant_linear_with_gelu_prologue(route, device, caplog) -> None:
    """GELU + transform + quantize in one kernel, then the route's GEMM. Triton's and
    torch's GELU are different fp32 approximations (which differ again between CPUs'
    vector kernels), so a value at a rounding tie may take the neighbouring code: flips
    only there, and the output within the GEMM's bound plus their effect
    (helpers.assert_quant_linear_agrees). One flipped code alone puts this output at
    38-48 dB SQNR (by where it lands), so a 40 dB floor held only while none flipped."""
    k, n, dtype = 256, 48, torch.bfloat16
    x = random_activation(12, k, dtype, seed=5)
    w_q, w_s = quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(6)), 4)
    rot = hadamard(128)
    args = quant_linear_arguments(x.to(device), w_q.to(device), w_s.to(device), None, 4, 4, 0,
                                  1.0, None, None, rot.to(device), "gelu_tanh")
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.quant_linear_triton(**args, route=route)
    assert "reference" not in caplog.text
    q, scale = rotate_quantize(args["x"], None, None, args["rot"], 4, container=route or "packed",
                               prologue="gelu_tanh")
    assert_quant_linear_agrees(y, args, (kernel_ints(q, 4, route or "packed"), scale),
                               f"gelu prologue, route {route}")


@pytest.mark.parametrize(("route", "group", "w_group"), [(None, 16, 0), ("int8", 32, 64)])
def test_quant_linear_lzs(route, group, w_group, device, caplog) -> None:
    """a_format "lzs": int8 codes truncated per group by the quantize kernel (bit-exact,
    test_act_quant.test_lzs_bit_exact), then the int8 GEMM of the route; the output is
    within the GEMM's summation bound of the reference, which multiplies the same decoded
    values in float."""
    k, n, dtype = 256, 48, torch.bfloat16
    x = random_activation(10, k, dtype, seed=7).reshape(2, 5, k)
    w_q, w_s = quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(8)),
                               4, w_group)
    rot = hadamard(64)
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.quant_linear_triton(x.to(device), w_q.to(device), w_s.to(device), None,
                                         4, 4, group, 0.9, None, None, rot.to(device), None,
                                         "lzs", route=route)
    assert "reference" not in caplog.text
    y_ref = quant_linear_reference(x, w_q, w_s, None, 4, 4, group, 0.9, None, None, rot,
                                   None, "lzs")
    xt = transform_reference(x, None, None, rot).float().reshape(-1, k)
    x_deq = lzs_fake_quantize(xt, group, 0.9)
    w_deq = dequantize(unpack_weight(w_q, 4), w_s, w_group)
    bound = matmul_bound(x_deq.abs(), w_deq.abs(), None, y_ref.reshape(-1, n), dtype,
                         k // (w_group or k))
    assert_within(y.reshape(-1, n).cpu(), y_ref.reshape(-1, n), bound, "LZS quant_linear")
    y_int = quant_linear_reference(x, w_q, w_s, None, 4, 4, group, 0.9, None, None, rot)
    assert not torch.equal(y_ref, y_int)  # the format reached the reference


def test_twinlog_weights_fall_back_with_the_reason(device, caplog) -> None:
    """The GEMMs take integer weights with scales: a twin-log table runs the reference,
    logged once, with the same output."""
    k, n = 128, 32
    x = random_activation(6, k, torch.float32, seed=9)
    w_q, table = twinlog_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(9)))
    args = (w_q.to(device), table.to(device), None, 4, 4, 0, 1.0, None, None, None, None,
            "int", "twinlog")
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.quant_linear_triton(x.to(device), *args)
    assert "twinlog weights" in caplog.text
    expected = quant_linear_reference(x, w_q, table, None, 4, 4, 0, 1.0, w_format="twinlog")
    assert_equal(y.cpu(), expected, "twin-log fallback")


def test_per_block_rotation_falls_back_with_the_reason(device, caplog) -> None:
    """rotation="adaptive" gives each block of K its own matrix (K/B, B, B); the kernels
    load one B×B tile for all blocks, so both ops run the reference, logged, same output."""
    k, n = 128, 16
    x = random_activation(5, k, torch.float32, seed=10)
    rot = orthogonal_blocks(k // 32, 32, seed=10)
    w_q, w_s = quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(10)), 4)
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.quant_linear_triton(x.to(device), w_q.to(device), w_s.to(device), None,
                                         4, 4, 0, 1.0, None, None, rot.to(device))
        t = dispatch.transform_triton(x.to(device), None, None, rot.to(device))
    assert caplog.text.count("per-block rotation (4, 32, 32)") == 2, caplog.text
    assert_equal(y.cpu(), quant_linear_reference(x, w_q, w_s, None, 4, 4, 0, 1.0, None, None,
                                                 rot), "per-block fallback")
    assert_equal(t.cpu(), transform_reference(x, None, None, rot), "per-block transform")


def test_per_sample_activation_bits_fall_back_with_the_reason(device, caplog) -> None:
    """``timestep_bits`` gives each sample its own activation width (``a8_rows``); the
    kernels quantize every row to one width, so the reference runs, logged, same output."""
    k, n = 128, 16
    x = random_activation(6, k, torch.float32, seed=11).reshape(2, 3, k)
    rows = torch.tensor([True, False])
    w_q, w_s = quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(11)), 4)
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        y = dispatch.quant_linear_triton(x.to(device), w_q.to(device), w_s.to(device), None,
                                         4, 4, 0, 0.9, a8_rows=rows.to(device))
    assert "per-sample activation bits" in caplog.text, caplog.text
    assert_equal(y.cpu(), quant_linear_reference(x, w_q, w_s, None, 4, 4, 0, 0.9,
                                                 a8_rows=rows), "per-sample widths fallback")
