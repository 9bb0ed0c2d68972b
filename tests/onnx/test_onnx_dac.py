"""D²Quant's ``dac`` (and ``dsq`` + ``dac``) in ONNX, both targets, on tiny PixArt.

A DAC bias is one float32 ``aten.add`` after the norm that follows an attention block
(``passes.post_norms``): ``(LayerNorm(x) + μ) · (1 + scale) + shift``. It does not fuse
into the next quantizer's prologue, so torchlib lowers the chain op for op
(LayerNormalization, Add μ, Mul, Add) in the graph's order; the second test pins that
order and μ's values. An IEEE float32 Add or Mul of the same operands is the same float
in ORT and torch (measured: 0 difference on every Add/Mul of the file fed ORT's own
inputs; LayerNormalization is 1-2 ulp from torch's, the same op every fused norm lowers
to). DSQ's per-channel scale joins the transform's ``smooth`` Mul (``clq_compile.dsq``),
also exact. So DAC adds nothing to the arithmetic ``test_onnx_models`` bounds, and its
check applies unchanged: ``onnx_probes.assert_exact`` with FP32_TOL = 1e-5 on the
teacher-forced output and local flips only on rounding ties (the derivation is in
``test_onnx_models``' docstring).

Why 12 calls at batch 3: a flip is rare (a value within ~1e-6 code units of a tie).
Measured on this model, ort-cpu, 200 calls each: 6 calls flip one code with DAC, 5
without, every one a tie (≤ 1.9e-6 code units from it) cascading to 1e-3..1e-2 on the
raw output. A review's 12 plain max-|diff| calls saw such flips with DAC and none
without by chance. Here "dsq+dac" hits one in these 12 calls (a value 0.5 code units to
float precision), which the check must accept; any flip off a tie, or a forced output
off by more than float rounding, fails on any call, and the last test shows the check
failing on a file whose bias is dropped or added after the modulation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx_ir as ir
import pytest
import torch

from tests.onnx.conftest import Case
from tests.onnx.onnx_probes import assert_exact_calls

OPTIONS = {"dac": {"dac": True}, "dsq+dac": {"dsq": True, "dac": True}}
CALLS = range(11, 23)  # 12 calls, batch onnx_probes.RUN_BATCH (3)
ADD = torch.ops.aten.add.Tensor
# How torchlib spells the graph's ops around a DAC add.
ONNX_OP = {"layer_norm": "LayerNormalization", "mul": "Mul", "add": "Add"}


def _dac_case(export_case, options: str, target: str) -> Case:
    case = export_case("pixart", "w4a4", target, **OPTIONS[options])
    assert case.qm.plan.dac, "no DAC bias on this model: the test checks nothing"
    return case


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_dac_export_matches_reference(export_case, options, target):
    case = _dac_case(export_case, options, target)
    if "dsq" in options:
        assert case.qm.plan.meta["dsq"]["layers"], "dsq applied to no layer"
    assert_exact_calls(case, CALLS)


def _dac_adds(gm: torch.fx.GraphModule) -> dict[str, tuple[str, list[str]]]:
    """Graph form: DAC bias buffer → (the op it is added to, the ops reading the sum)."""
    out = {}
    for n in gm.graph.nodes:
        if n.target is not ADD:
            continue
        consts = [a for a in n.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                  and a.target.startswith("clq_dac_")]
        if consts:
            (data,) = [a for a in n.args if a is not consts[0]]
            out[consts[0].target] = (data.target.__name__.split(".")[0],
                                     sorted(u.target.__name__.split(".")[0] for u in n.users))
    return out


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
def test_dac_bias_sits_where_the_graph_adds_it(export_case, target):
    """Each DAC bias is an initializer holding the plan's μ bit for bit, added by an Add
    to the same op's output, and read by the same ops, as in ``qm.graph_module``."""
    case = _dac_case(export_case, "dac", target)
    gm, model = case.qm.graph_module, ir.load(case.path)
    expected = _dac_adds(gm)
    assert len(expected) == len(case.qm.plan.dac)
    for name, (producer, users) in expected.items():
        value = model.graph.initializers[name]
        assert torch.equal(torch.tensor(value.const_value.numpy()), getattr(gm, name))
        (add,) = [u for u, _ in value.uses()]
        (data,) = [v for v in add.inputs if v is not value]
        assert add.op_type == "Add"
        assert data.producer().op_type == ONNX_OP[producer]
        assert sorted(c.op_type for c in add.outputs[0].consumers()) == [
            ONNX_OP[u] for u in users]


def _mutated(case: Case, tmp_path: Path, where: str) -> Case:
    """``case``'s file with every DAC bias dropped (``where`` "drop") or added after the
    adaLN modulation instead of before it ("after")."""
    model = ir.load(case.path)
    for name in _dac_adds(case.qm.graph_module):
        bias = model.graph.initializers[name]
        (add,) = [u for u, _ in bias.uses()]
        (norm,) = [v for v in add.inputs if v is not bias]
        total = add.outputs[0]
        ir.convenience.replace_all_uses_with(total, norm)
        if where == "after":  # LN · m, + shift, then + μ
            (mul,) = [c for c in norm.consumers() if c.op_type == "Mul"]
            (shifted,) = [c for c in mul.outputs[0].consumers() if c.op_type == "Add"]
            out = shifted.outputs[0]
            moved = ir.node("Add", [out, bias])
            model.graph.insert_after(shifted, moved)
            ir.convenience.replace_all_uses_with(out, moved.outputs[0])
            moved.replace_input_with(0, out)
        model.graph.remove(add, safe=True)
    path = tmp_path / f"{where}.onnx"
    ir.save(model, path)
    return dataclasses.replace(case, path=path)


@pytest.mark.parametrize("where", ["drop", "after"])
def test_dac_check_fails_on_a_misplaced_bias(export_case, tmp_path, where):
    """The check has teeth for DAC: the same file with the bias dropped, or added after
    the modulation (the order a review suspected), fails it on the first call."""
    case = _mutated(_dac_case(export_case, "dac", "qdq"), tmp_path, where)
    with pytest.raises(AssertionError):
        assert_exact_calls(case, CALLS[:1])
