"""torch.ops.clq.* references against independent computations."""

import pytest
import torch

import clq_compile  # noqa: F401 - registers the ops
from clq_compile.hadamard import block_diag, hadamard
from clq_compile.quant import qrange, quantize_weight, unpack_int4


def _int_reference(x, w_q, w_s, bias, w_bits, a_bits):
    """Exact integer accumulation (int64) then scales: the kernel arithmetic."""
    _, qmax = qrange(a_bits)
    xf = x.float()
    s_x = torch.clamp(xf.abs().amax(-1, keepdim=True), min=1e-8) / qmax
    q_x = torch.clamp(torch.round(xf / s_x), -qmax - 1, qmax).to(torch.int64)
    q_w = (unpack_int4(w_q) if w_bits == 4 else w_q).to(torch.int64)
    acc = q_x @ q_w.T
    return acc.double() * s_x.double() * w_s.double().T + (0 if bias is None else bias.double())


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (4, 8), (8, 8)])
def test_quant_linear_equals_integer_arithmetic(w_bits, a_bits):
    """The float reference equals exact integer math up to fp32 rounding (rel. 1e-5):
    products of int4/int8 values are exact in fp32 only up to 2^24, so compare in
    relative terms against a float64 evaluation of the integer result."""
    x, w, b = torch.randn(2, 7, 64), torch.randn(48, 64), torch.randn(48)
    w_q, w_s = quantize_weight(w, w_bits, 0)
    y = torch.ops.clq.quant_linear(x, w_q, w_s, b, w_bits, a_bits, 0, 1.0)
    ref = _int_reference(x, w_q, w_s, b, w_bits, a_bits)
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5


def test_weight_only_path_uses_float_activations():
    x, w = torch.randn(5, 32), torch.randn(16, 32)
    w_q, w_s = quantize_weight(w, 4, 16)
    y = torch.ops.clq.quant_linear(x, w_q, w_s, None, 4, 16, 0, 1.0)
    w_deq = (unpack_int4(w_q).float().reshape(16, 2, 16) * w_s.unsqueeze(-1)).reshape(16, 32)
    assert torch.allclose(y, x @ w_deq.T, atol=1e-5)


def test_per_group_activation_differs_from_per_token_and_is_closer():
    x = torch.randn(64, 128)
    x[:, :8] *= 30  # outlier channels: per-group scales isolate them
    w = torch.randn(32, 128)
    w_q, w_s = quantize_weight(w, 8, 0)
    ref = x @ w.T
    tok = torch.ops.clq.quant_linear(x, w_q, w_s, None, 8, 4, 0, 1.0)
    grp = torch.ops.clq.quant_linear(x, w_q, w_s, None, 8, 4, 32, 1.0)
    assert (grp - ref).norm() < (tok - ref).norm()


def test_transform_matches_explicit_matrices():
    k = 64
    x = torch.randn(3, 4, k)
    perm = torch.randperm(k)
    smooth = torch.rand(k) + 0.5
    rot = hadamard(16)
    y = torch.ops.clq.transform(x, perm, smooth, rot)
    p = torch.eye(k)[:, perm]  # x @ p == x[..., perm]
    expect = x @ p @ torch.diag(smooth) @ block_diag(rot, k)
    assert torch.allclose(y, expect, atol=1e-5)
    assert torch.equal(torch.ops.clq.transform(x, None, None, None), x)


def test_ops_export_through_fake_impls():
    w_q, w_s = quantize_weight(torch.randn(8, 32), 4, 0)

    class M(torch.nn.Module):
        def forward(self, x):
            t = torch.ops.clq.transform(x, None, None, hadamard(16))
            return torch.ops.clq.quant_linear(t, w_q, w_s, None, 4, 4, 0, 1.0)

    ep = torch.export.export(M(), (torch.randn(2, 3, 32),))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.clq.quant_linear.default in targets
    assert ep.module()(torch.randn(2, 3, 32)).shape == (2, 3, 8)


def test_prologue_arguments_are_checked():
    """A modulation operand of another dtype would make the op's output dtype differ from
    its fake (x's): refused, saying why; an unknown prologue is named."""
    x = torch.randn(2, 3, 16)
    w_q, w_s = quantize_weight(torch.randn(8, 16), 4)
    op = torch.ops.clq.quant_linear.default
    with pytest.raises(ValueError, match="type promotion"):
        op(x, w_q, w_s, None, 4, 4, 0, 1.0, None, None, None, "layer_norm",
           pro_mul=torch.ones(2, 1, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="'rms_norm' not in"):
        torch.ops.clq.transform.default(x, None, None, None, "rms_norm")
    y = torch.ops.clq.transform.default(x, None, None, None, "layer_norm",
                                        pro_add=torch.ones(16))
    assert torch.equal(y, torch.nn.functional.layer_norm(x, (16,)) + 1)
