"""Target "ort-cpu": integer forms ORT's CPU kernels run fast, same quantized arithmetic.

The bound is the one argued in ``test_onnx_models``: activation codes are computed with
the reference formula (QuantizeLinear's divide, uint8 carrier with zero point 128),
MatMulInteger's int32 sum is exact, and ``acc · s_token · s_channel`` differs from the
reference's float32 sum of dequantized products by float32 rounding only (≤ (K+3)·u per
product chain, the integer form being the more accurate of the two). MatMulNBits at
accuracy_level 0 dequantizes (q + 8 − 8)·scale exactly and multiplies in float32. So
the same FP32_TOL, flip and tie checks apply unchanged.
"""

from __future__ import annotations

import functools

import onnx
import onnx_ir as ir
import pytest
import torch

from clq_compile.lowering.onnx import export_onnx, ort_run, ort_session
from clq_compile.lowering.onnx.ort_cpu import form_of
from clq_compile.lowering.onnx.weights import nbits_block
from tests.onnx.onnx_probes import assert_exact, quant_linears
from tests.onnx.onnx_tiny_layers import QLinear, as_qm

BITS = ["w4a4", "w4a8", "w8a8", "w4a16"]


def fetch(gm: torch.nn.Module, target: str) -> torch.Tensor:
    return functools.reduce(getattr, target.split("."), gm)


def _ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _expected_forms(gm) -> dict[str, int]:
    forms: dict[str, int] = {}
    for n in quant_linears(gm):
        w_q, w_scale = (fetch(gm, a.target) for a in n.args[1:3])
        k = w_q.shape[1] * (2 if n.args[4] == 4 else 1)
        group = 0 if w_scale.shape[1] == 1 else k // w_scale.shape[1]
        form = form_of(n.args[4], n.args[5], k, group)
        forms[form] = forms.get(form, 0) + 1
    return forms


@pytest.mark.parametrize("bits", BITS)
def test_ort_cpu_matches_reference(export_case, bits):
    assert_exact(export_case("dit", bits, "ort-cpu"))


def test_ort_cpu_w4a4_on_pixart_flux(export_case):
    for arch in ("pixart", "flux"):
        assert_exact(export_case(arch, "w4a4", "ort-cpu"))


def test_ort_cpu_grouped_matches_reference(export_case):
    """Per-group scales: batched MatMulInteger over K-groups, partial sums scaled, reduced."""
    case = export_case("pixart", "w4a4", "ort-cpu", w_group=16, a_group=32, a_clip=0.9)
    assert_exact(case)
    assert _ops(ir.load(case.path)).get("ReduceSum", 0) == len(quant_linears(case.qm.graph_module))


@pytest.mark.parametrize("bits", BITS)
def test_ort_cpu_forms_follow_the_plan(export_case, bits):
    """Integer layers → MatMulIntegerToFloat on an INT4 (W4) or INT8 (W8) constant;
    W4A16 → MatMulNBits at accuracy_level 0; no float copy of any quantized weight."""
    case = export_case("dit", bits, "ort-cpu")
    gm = case.qm.graph_module
    model = ir.load(case.path)
    ops = _ops(model)
    forms = _expected_forms(gm)
    int_gemms = ops.get("MatMulInteger", 0) + ops.get("MatMulIntegerToFloat", 0)
    assert int_gemms == forms.get("int", 0)
    assert ops.get("MatMulNBits", 0) == forms.get("nbits", 0)
    assert ops.get("DequantizeLinear", 0) == forms.get("qdq", 0)
    for n in model.graph:
        if n.op_type == "MatMulNBits":
            assert n.attributes["accuracy_level"].as_int() == 0
            assert n.attributes["bits"].as_int() == 4
    consts = [v.const_value for v in model.graph.initializers.values()]
    int4 = sum(c.size for c in consts if c.dtype == ir.DataType.INT4)
    w4_int = sum(fetch(gm, n.args[1].target).numel() * 2 for n in quant_linears(gm)
                 if n.args[4] == 4 and n.args[5] < 16)
    assert int4 == w4_int  # every W4 integer-form weight is stored 4-bit, nothing else is


def test_ort_cpu_file_is_as_small_as_qdq(export_case):
    """Weights stay 4-bit in the file: the Cast to INT8 is not folded at export."""
    qdq = export_case("dit", "w4a4", "qdq").path.stat().st_size
    fast = export_case("dit", "w4a4", "ort-cpu").path.stat().st_size
    wide = export_case("dit", "w8a8", "ort-cpu").path.stat().st_size
    assert fast < 1.1 * qdq
    assert fast < wide


@pytest.mark.parametrize("k,expected", [(128, "nbits"), (96, "nbits"), (40, "qdq")])
def test_w4a16_falls_back_when_k_has_no_block(tmp_path, k, expected):
    """MatMulNBits needs a power-of-two block ≥ 16 dividing K; otherwise DQ + MatMul."""
    assert form_of(4, 16, k, 0) == expected
    assert (nbits_block(k, 0) >= 16) == (expected == "nbits")
    module = QLinear(k, 24, 4, 16)
    x = torch.randn(2, 5, k)
    path = export_onnx(as_qm(module, x), tmp_path / "w.onnx", target="ort-cpu")
    onnx.checker.check_model(str(path))
    ops = _ops(ir.load(path))
    assert ops.get("MatMulNBits", 0) == (expected == "nbits")
    x3 = torch.randn(3, 5, k)
    got = torch.from_numpy(ort_run(ort_session(path), (x3,), {})[0])
    ref = module(x3)
    assert float((got - ref).norm() / ref.norm()) <= 1e-6
