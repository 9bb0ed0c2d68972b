"""``weights="twinlog"``: LRQ-DiT's twin-log weights as a recipe option, through the op
(``w_format="twinlog"``: packed codes and a per-row table), the plan, the graph,
``inspect``, the budget and save/load. The quantizer itself is tested in
test_twinlog.py, the Triton fallback in tests/triton/test_dispatch.py and the ONNX form
in tests/onnx/test_onnx_twinlog.py."""

from __future__ import annotations

import pytest
import torch

import clq_compile as clq
from clq_compile.build import resolve
from clq_compile.errors import ConfigError, QuantizationError
from clq_compile.ops import quant_linear_reference
from clq_compile.passes.rewrite import quant_linear_nodes
from clq_compile.quant import fake_quantize
from clq_compile.spec import QuantSpec
from clq_compile.testing import held_out_sqnr, tiny_pixart
from clq_compile.twinlog import twinlog_quantize, twinlog_values, twinlog_weight


def test_op_layout_decodes_to_the_quantizer_values() -> None:
    """Packed codes less 8 and the table, decoded by the op, are the quantizer's own
    values; the op multiplies them with the quantized activation."""
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.Laplace(0.0, 0.02).sample((24, 96))
    x = torch.randn(5, 96, generator=g)
    w_q, table = twinlog_weight(w)
    assert w_q.dtype == torch.int8 and w_q.shape == (24, 48) and table.shape == (24, 16)
    values = twinlog_quantize(w, 4).dequantize().float()
    assert torch.equal(twinlog_values(w_q, table), values)
    y = quant_linear_reference(x, w_q, table, None, 4, 4, 0, 1.0, w_format="twinlog")
    assert torch.equal(y, fake_quantize(x, 4) @ values.t())
    with pytest.raises(QuantizationError, match=r"\(N, 16\)"):
        twinlog_values(w_q, table[:, :8])
    with pytest.raises(ValueError, match="w_format"):
        quant_linear_reference(x, w_q, table, None, 4, 4, 0, 1.0, w_format="nf4")


def test_memo_is_by_content_and_hands_out_copies() -> None:
    w = torch.randn(16, 32)
    a_q, a_t = twinlog_weight(w)
    a_q.zero_()  # a caller's copy: the memo must not change
    b_q, b_t = twinlog_weight(w.clone())
    assert torch.equal(b_t, a_t) and not torch.equal(b_q, a_q)
    w2 = w.clone()
    w2[0, 0] += 1.0
    assert not torch.equal(twinlog_weight(w2)[1], b_t)


@pytest.mark.parametrize(("bits", "options", "match"), [
    ("w4a4", {"weights": "twinlog", "w_group": 64}, r"weights='twinlog'.*w_group=64"),
    ("w8a8", {"weights": "twinlog"}, r"weights='twinlog'.*'w8a8'"),
    ("w4a4", {"weights": "nf4"}, r"weights='nf4'.*'twinlog'"),
])
def test_bad_options_name_the_problem(bits, options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve("rtn", bits, **options)


def test_spec() -> None:
    with pytest.raises(ConfigError, match="w_format"):
        QuantSpec(8, 8, w_format="twinlog")
    with pytest.raises(ConfigError, match="w_format"):
        QuantSpec(4, 4, w_format="nf4")
    spec = QuantSpec(4, 4, 0, 16, "lzs", "twinlog")
    assert spec.name == "w4a4-twinlog-lzs16"
    assert spec.op_kwargs == {"a_format": "lzs", "w_format": "twinlog"}
    _, resolved = resolve("clq", "w4a8", weights="twinlog")
    assert resolved == QuantSpec(4, 8, w_format="twinlog")


@pytest.fixture(scope="module")
def twinlog_model():
    model, inputs = tiny_pixart()
    qm = clq.quantize(model, [inputs(0), inputs(1)], recipe="clq", weights="twinlog",
                      lowrank=4, extra_shapes=None)
    return model, inputs, qm


def test_graph_plan_and_inspect(twinlog_model) -> None:
    model, inputs, qm = twinlog_model
    nodes = quant_linear_nodes(qm.graph_module)
    assert nodes and all(n.kwargs == {"w_format": "twinlog"} for n in nodes)
    quantized = [lp for lp in qm.plan.layers.values() if lp.quantized]
    assert {lp.spec for lp in quantized} == {QuantSpec(4, 4, w_format="twinlog")}
    assert all(lp.w_clip == 1.0 for lp in quantized)  # CLPS leaves twin-log ranges alone
    assert "W:twinlog" in clq.inspect(qm)
    # measured 32.9 dB with clq's integer weights at 31.3 (both without lowrank); floor
    # well below both, above what a wrong table (a shuffled code) would give
    assert held_out_sqnr(model, qm, inputs) > 25.0


def test_save_load_round_trip(twinlog_model, tmp_path) -> None:
    _, inputs, qm = twinlog_model
    qm.save(tmp_path / "m")
    loaded = clq.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs(4))[0], qm(**inputs(4))[0])


def test_budget_keeps_twinlog_weights() -> None:
    model, inputs = tiny_pixart(layers=1)
    qm = clq.quantize(model, [inputs(0)], recipe="rtn", weights="twinlog", budget=0.3,
                      measure=False, extra_shapes=None)
    promoted = set(qm.plan.meta["budget"]["promoted"])
    assert promoted
    for name, lp in qm.plan.layers.items():
        if lp.quantized:
            want = QuantSpec(4, 8 if name in promoted else 4, w_format="twinlog")
            assert lp.spec == want
