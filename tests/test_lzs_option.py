"""``activations="lzs"``: QuaRTZ's leading-zero suppression as a recipe option, through
the plan, the rewritten graph (``clq.quant_linear(..., a_format="lzs")``), ``inspect``
and save/load. The coding itself is tested in test_lzs.py, its kernels in
tests/triton (test_act_quant, test_dispatch) and its ONNX form in tests/onnx."""

from __future__ import annotations

import pytest
import torch

import clq_compile as clq
from clq_compile.build import resolve
from clq_compile.errors import ConfigError
from clq_compile.lzs import lzs_matmul, lzs_quantize
from clq_compile.ops import quant_linear_reference
from clq_compile.passes.rewrite import quant_linear_nodes
from clq_compile.quant import quantize_weight, unpack_int4
from clq_compile.spec import QuantSpec
from clq_compile.testing import held_out_sqnr, tiny_pixart


def test_op_reference_equals_the_integer_gemm() -> None:
    """The op's float reference (decoded values · scale, float matmul) against QuaRTZ's
    integer form (per-group partial sums shifted by FLAG, int32, then scaled): the same
    products, summed in another order, so they agree to float32 summation error
    (relative 1e-5 at K = 256 leaves room for u·K ≈ 1.5e-5 in the worst case but the
    measured error is ~1e-7)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 256, generator=g), torch.randn(24, 256, generator=g)
    x[:, 7] *= 30  # an outlier channel, so FLAGs differ across groups
    w_q, w_s = quantize_weight(w, 4)
    for group in (16, 32):
        y = quant_linear_reference(x, w_q, w_s, None, 4, 4, group, 0.9, a_format="lzs")
        codes, flags, scale = lzs_quantize(x, group, 0.9)
        exact = lzs_matmul(codes, flags, scale, unpack_int4(w_q), w_s, group)
        assert (y - exact).abs().max() <= 1e-5 * exact.abs().max()
    with pytest.raises(ValueError, match="a_format"):
        quant_linear_reference(x, w_q, w_s, None, 4, 4, 16, 1.0, a_format="fp4")


@pytest.mark.parametrize(("options", "match"), [
    ({"activations": "fp4"}, r"activations='fp4'.*\['int', 'lzs'\]"),
    ({"activations": "lzs", "bits": "w4a8"}, r"activations='lzs'.*a_bits=8"),
    ({"activations": "lzs", "a_group": 64}, r"a_group=64.*\[16, 32\]"),
    ({"activations": "lzs", "bits": "w4a16"}, r"activations='lzs'.*a_bits=16"),
])
def test_bad_options_name_the_problem(options, match) -> None:
    options = dict(options)
    bits = options.pop("bits", "w4a4")
    with pytest.raises(ConfigError, match=match):
        resolve("rtn", bits, **options)


def test_spec_checks_the_format() -> None:
    with pytest.raises(ConfigError, match="a_format"):
        QuantSpec(4, 4, 0, 16, "fp4")
    with pytest.raises(ConfigError, match="a_group"):
        QuantSpec(4, 4, 0, 0, "lzs")
    assert QuantSpec(4, 4, 0, 16, "lzs").name == "w4a4-lzs16"
    assert QuantSpec(4, 4, 0, 16, "lzs").with_groups(w_group=32).a_format == "lzs"


@pytest.fixture(scope="module")
def lzs_model():
    model, inputs = tiny_pixart()
    calib = [inputs(i) for i in range(2)]
    qm = clq.quantize(model, calib, recipe="quarot", activations="lzs", a_group=32,
                      extra_shapes=None)
    base = clq.quantize(model, calib, recipe="quarot", extra_shapes=None)
    return model, inputs, qm, base


def test_graph_plan_and_inspect_carry_the_format(lzs_model) -> None:
    model, inputs, qm, base = lzs_model
    nodes = quant_linear_nodes(qm.graph_module)
    formats = [{k: v for k, v in n.kwargs.items() if k.endswith("_format")} for n in nodes]
    assert nodes and all(f == {"a_format": "lzs"} for f in formats)
    # the norms with their modulation moved in (kwargs beside the format)
    assert any("pro_mul" in n.kwargs for n in nodes)
    # siblings (q, k, v) still share one quantizer, as without LZS
    assert len(nodes) == len(quant_linear_nodes(base.graph_module))
    specs = {lp.spec for lp in qm.plan.layers.values() if lp.quantized}
    assert specs == {QuantSpec(4, 4, 0, 32, "lzs")}
    table = clq.inspect(qm)
    assert "A:lzs32" in table and "A:tok" not in table
    with torch.no_grad():  # the format reaches the output
        assert not torch.equal(qm(**inputs(9))[0], base(**inputs(9))[0])
    assert held_out_sqnr(model, qm, inputs) > 20.0  # measured 28-29 dB (int4: 31-32)


def test_save_load_round_trip(lzs_model, tmp_path) -> None:
    _, inputs, qm, _ = lzs_model
    qm.save(tmp_path / "m")
    loaded = clq.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs(4))[0], qm(**inputs(4))[0])


def test_budget_promotes_lzs_layers_to_int8_per_token() -> None:
    """An LZS group is the coding's: a layer promoted to a8 is quantized per token."""
    model, inputs = tiny_pixart(layers=1)
    qm = clq.quantize(model, [inputs(0)], recipe="rtn", activations="lzs", budget=0.3,
                      measure=False, extra_shapes=None)
    promoted = qm.plan.meta["budget"]["promoted"]
    assert promoted
    for name, lp in qm.plan.layers.items():
        if name in promoted:
            assert lp.spec == QuantSpec(4, 8)
        elif lp.quantized:
            assert lp.spec == QuantSpec(4, 4, 0, 16, "lzs")
