"""One clq op at a time, on hand-written modules, so exactness can be asserted bit for bit.

A quant_linear fed straight from the graph input sees the same float32 input in ORT and
in torch, so nothing upstream can drift: the run-time scale (same IEEE ops in the same
order) and every integer code must be identical, flips = 0. The inputs are built to sit
exactly on rounding ties (x / s = k + ½, and one ulp either side), where dividing by the
scale and multiplying by its reciprocal disagree; so this also proves ORT's
QuantizeLinear divides and rounds half to even like ``torch.round(x / s)``.

The only remaining difference is the float32 dot product. Each side's error is at most
γ·(|x̂|·|Ŵ|ᵀ + |b|) elementwise with γ = n·u/(1 − n·u), u = 2⁻²⁴, n = K + 3 (K products
summed, plus the int32→float cast and two scale multiplies of the integer form), so the
two may differ by twice that (Higham, Accuracy and Stability, §3.1).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from clq_compile.lowering.onnx import export_onnx, ort_run, ort_session
from clq_compile.ops import unpack_weight, weight_group
from clq_compile.qlinear import sqnr
from clq_compile.quant import dequantize, fake_quantize, qrange, symmetric_scale
from clq_compile.testing import orthogonal_blocks
from tests.onnx.onnx_probes import activation_probes, compare_activations, probed_session, rel_err
from tests.onnx.onnx_tiny_layers import QLinear, as_qm

U = 2.0**-24


def tie_input(shape: tuple[int, ...], bits: int, group: int, clip: float,
              seed: int = 0) -> torch.Tensor:
    """Each quantization group holds its absmax first, then values at k + ½ scale steps,
    one ulp above or below, so every rounding decision is a tie or a hair from one."""
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    gs = group or k
    x = torch.zeros(*shape[:-1], k // gs, gs)
    amax = torch.rand(*shape[:-1], k // gs, generator=g) * 4 + 0.1
    sign = torch.where(torch.rand(amax.shape, generator=g) < 0.5, -1.0, 1.0)
    x[..., 0] = amax * sign
    s = symmetric_scale(x.reshape(shape), bits, group, clip).reshape(*amax.shape, 1)
    _, qmax = qrange(bits)  # |k + ½| < qmax keeps every tie below the group's absmax
    steps = torch.randint(-qmax, qmax - 1, (*amax.shape, gs - 1), generator=g).float() + 0.5
    ties = (steps * s).float()
    nudge = torch.randint(-1, 2, ties.shape, generator=g)
    up = torch.nextafter(ties, torch.full_like(ties, float("inf")))
    down = torch.nextafter(ties, torch.full_like(ties, float("-inf")))
    x[..., 1:] = torch.where(nudge > 0, up, torch.where(nudge < 0, down, ties))
    return x.reshape(shape)


def float_dot_bound(xq: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """2γ·(|x̂|·|Ŵ|ᵀ + |b|) for quantized activations x̂ and weight values Ŵ: how far two
    float32 evaluations of the layer may differ."""
    n = xq.shape[-1] + 3
    gamma = n * U / (1 - n * U)
    return 2 * gamma * (xq.double().abs() @ w.double().abs().t() + bias.double().abs())


def dot_bound(module: QLinear, x: torch.Tensor) -> torch.Tensor:
    w_bits, a_bits, a_group, a_clip = module.spec
    k = x.shape[-1]
    q = unpack_weight(module.w_q, w_bits)
    w = dequantize(q, module.w_scale, weight_group(k, module.w_scale))
    xq = x.float() if a_bits >= 16 else fake_quantize(x.float(), a_bits, a_group, a_clip)
    return float_dot_bound(xq, w, module.bias)


SPECS = [  # (w_bits, a_bits, w_group, a_group, a_clip)
    (4, 4, 0, 0, 1.0), (4, 8, 0, 0, 1.0), (8, 8, 0, 0, 1.0), (4, 16, 0, 0, 1.0),
    (8, 16, 0, 0, 1.0), (4, 4, 32, 0, 1.0), (4, 4, 0, 32, 0.8), (4, 4, 32, 64, 0.9),
    (4, 4, 64, 32, 1.0), (8, 8, 32, 32, 0.9), (4, 16, 32, 0, 1.0),
]


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "w{}a{}_g{}_{}_c{}".format(*s))
def test_layer_codes_bit_exact_on_ties(tmp_path, target, spec):
    w_bits, a_bits, w_group, a_group, a_clip = spec
    module = QLinear(128, 48, w_bits, a_bits, w_group, a_group, a_clip)
    x = tie_input((2, 5, 128), min(a_bits, 8), a_group, a_clip)
    qm = as_qm(module, x)
    path = export_onnx(qm, tmp_path / "layer.onnx", target=target)
    probes = activation_probes(qm.graph_module, ir.load(path))
    assert len(probes) == (1 if a_bits < 16 else 0)
    session = probed_session(path, probes)
    x3 = tie_input((3, 5, 128), min(a_bits, 8), a_group, a_clip, seed=1)  # other batch
    outputs, flips, forced = compare_activations(qm, session, probes, (x3,), {})
    assert flips.flipped == 0
    got = torch.from_numpy(outputs[0])
    ref = module(x3)
    assert ((got.double() - ref.double()).abs() <= dot_bound(module, x3)).all()


def test_tie_inputs_really_are_ties():
    """Guard for the test above: dividing and multiplying by the reciprocal must disagree
    on these inputs, or the bit-exact test could not tell the two apart."""
    x = tie_input((4, 8, 128), 4, 0, 1.0)
    s = symmetric_scale(x, 4, 0, 1.0)  # (..., 1): one scale per token
    div = torch.round(x / s)
    mul = torch.round(x * (1.0 / s))
    assert (div != mul).any()


@pytest.mark.parametrize("per_block", [False, True])
def test_transform_lowering_within_float_bound(tmp_path, per_block):
    """Gather and Mul are exact; the block rotation is a length-B float32 dot product, so
    ORT and torch differ by at most 2γ_B·(|y|·|R|) elementwise. A per-block rotation
    (K/B, B, B) is one batched MatMul against its K/B blocks."""

    class Rotate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            inner = QLinear(128, 8, 4, 4, rot_block=32)
            self.perm, self.smooth, self.rot = inner.perm, inner.smooth, inner.rot
            if per_block:
                self.rot = orthogonal_blocks(4, 32, seed=3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.clq.transform(x, self.perm, self.smooth, self.rot)

    module = Rotate()
    x = torch.randn(2, 5, 128)
    path = export_onnx(as_qm(module, x), tmp_path / "rot.onnx")
    x3 = torch.randn(3, 5, 128)
    got = torch.from_numpy(ort_run(ort_session(path), (x3,), {})[0])
    ref = module(x3)
    y = (x3[..., module.perm] * module.smooth).double()
    b = module.rot.shape[-1]
    gamma = b * U / (1 - b * U)
    blocks = y.reshape(3, 5, -1, b).abs()
    rot = module.rot.double().abs()
    mag = torch.einsum("...nb,nbc->...nc", blocks, rot) if per_block else blocks @ rot
    bound = 2 * gamma * mag.reshape(y.shape)
    assert ((got.double() - ref.double()).abs() <= bound).all()
    assert sqnr(ref, got) > 100  # and not a zero bound met by chance
    matmul_consts = [
        tuple(n.inputs[1].const_value.shape) for n in ir.load(path).graph
        if n.op_type == "MatMul" and n.inputs[1].const_value is not None
    ]
    # the blocks as stored, never a dense K×K matrix
    assert matmul_consts == [tuple(module.rot.shape)]


@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
def test_rotated_layer_matches_reference(tmp_path, target, per_block):
    """transform → quant_linear: the rotation's float32 rounding can flip a code at a tie
    (see test_onnx_models for the argument); forced and flip checks as there."""
    module = QLinear(128, 48, 4, 4, a_group=32, rot_block=32)
    if per_block:
        module.rot = orthogonal_blocks(4, 32, seed=3)
    x = torch.randn(2, 7, 128)
    qm = as_qm(module, x)
    path = export_onnx(qm, tmp_path / "rotated.onnx", target=target)
    probes = activation_probes(qm.graph_module, ir.load(path))
    outputs, flips, forced = compare_activations(
        qm, probed_session(path, probes), probes, (torch.randn(3, 7, 128),), {}
    )
    assert flips.fraction <= 1e-3 and flips.max_code_step <= 1
    assert rel_err(torch.from_numpy(outputs[0]), forced) <= 1e-6


def test_int4_weights_stay_packed_in_the_file(tmp_path):
    """The weight initializer is INT4 (K, N), and its bytes are the int4 values."""
    module = QLinear(128, 48, 4, 4)
    path = export_onnx(as_qm(module, torch.randn(2, 5, 128)), tmp_path / "w.onnx")
    consts = [v.const_value for v in ir.load(path).graph.initializers.values()]
    int4 = [c for c in consts if c.dtype == ir.DataType.INT4]
    assert len(int4) == 1
    assert tuple(int4[0].shape) == (128, 48)
    q = unpack_weight(module.w_q, 4)
    np.testing.assert_array_equal(int4[0].numpy().astype(np.int8), q.t().numpy())
