"""Mixed precision by sensitivity (options ``budget``, ``budget_bits``)."""

import logging

import pytest
import torch

import clq_compile as clq
from clq_compile.annotations import layer_names
from clq_compile.passes.rewrite import QUANT_LINEAR
from clq_compile.testing import held_out_sqnr, tiny_pixart


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart()



def test_budget_promotes_the_most_sensitive_layers_within_the_budget(pixart):
    model, inputs = pixart
    calib = [inputs(i) for i in range(3)]
    kw = dict(recipe="quarot", bits="w4a4", extra_shapes=None, measure=False)
    base = clq.quantize(model, calib, **kw)
    qm = clq.quantize(model, calib, budget=0.25, budget_bits="w8a8", **kw)
    meta = qm.plan.meta["budget"]
    sens = meta["sensitivity"]
    size = {lp.name: lp.in_features * lp.out_features for lp in base.plan.quantized_layers()}
    assert set(sens) == set(size)
    # worst first; a layer that does not fit in what is left is passed over
    left, want = 0.25 * sum(size.values()), []
    for name in sorted(sens, key=sens.get, reverse=True):
        if size[name] <= left:
            want.append(name)
            left -= size[name]
    assert meta["promoted"] == want and want
    promoted = [qm.plan.layers[n] for n in want]
    assert all(lp.spec.name == "w8a8" and (lp.w_clip, lp.a_clip) == (1.0, 1.0)
               for lp in promoted)
    # the graph runs them at 8 bits; inspect says which and why
    bits = {name: n.args[4] for n in qm.graph_module.graph.nodes
            if n.target == QUANT_LINEAR for name in layer_names(n)}
    assert {n for n, b in bits.items() if b == 8} == set(want)
    assert f"promoted to w8a8 (budget: #1 of {len(size)}" in clq.inspect(qm)
    assert held_out_sqnr(model, qm, inputs) > held_out_sqnr(model, base, inputs)


def test_a_planted_outlier_layer_is_the_most_sensitive():
    """Making one layer's weight 50x larger in a few input channels (outliers a 4-bit
    grid cannot hold) must rank it first."""
    model, inputs = tiny_pixart()
    with torch.no_grad():
        model.transformer_blocks[1].ff.net[2].weight[:, :4] *= 50
    qm = clq.quantize(model, [inputs(0), inputs(1)], recipe="rtn", bits="w4a4",
                      budget=0.05, measure=False, extra_shapes=None)
    sens = qm.plan.meta["budget"]["sensitivity"]
    assert max(sens, key=sens.get) == "transformer_blocks.1.ff.net.2"


def test_budget_to_full_precision_is_asked_for_not_a_coverage_warning(pixart, caplog):
    model, inputs = pixart
    with caplog.at_level(logging.WARNING):
        qm = clq.quantize(model, [inputs(0)], recipe="rtn", bits="w4a4", budget=0.2,
                          budget_bits="fp", measure=False, extra_shapes=None)
    kept = [lp for lp in qm.plan.layers.values() if "budget" in lp.skip_reason]
    assert kept and not any(lp.quantized for lp in kept)
    assert "beyond the skip policy" not in caplog.text and not qm.plan.meta["coverage"]


@pytest.mark.parametrize("opts,match", [
    ({"budget": 1.5}, r"budget=1.5"),
    ({"budget": 0.1, "budget_bits": "w4a4"}, r"budget_bits='w4a4'"),
    ({"budget": 0.1, "bits": "w8a8", "budget_bits": "w8a8"},
     r"budget_bits='w8a8' is not above bits='w8a8'"),
    ({"budget": 0.1, "bits": "w8a8", "budget_bits": "w4a8"},
     r"budget_bits='w4a8' is not above bits='w8a8'"),
])
def test_budget_options_are_validated(pixart, opts, match):
    model, inputs = pixart
    opts = {"bits": "w4a4", **opts}
    with pytest.raises(clq.ConfigError, match=match):
        clq.quantize(model, [inputs(0)], recipe="rtn", **opts)


def test_clq_budget_reuses_the_clps_measurement(pixart):
    """CLPS already measured each layer's downstream error (its target error at the chosen
    clips): the budget ranks by exactly those numbers instead of probing again."""
    model, inputs = pixart
    qm = clq.quantize(model, [inputs(0), inputs(1)], recipe="clq", bits="w4a4", budget=0.1,
                      w_grid=(1.0, 0.9), a_grid=(1.0,), measure=False, extra_shapes=None)
    sens = qm.plan.meta["budget"]["sensitivity"]
    clps = {lp.name: lp.err_after for lp in qm.plan.layers.values() if lp.err_after is not None}
    assert sens == clps and len(sens) == len(qm.plan.quantized_layers())


@pytest.mark.parametrize("bits,to", [
    ("w4a4", "w4a8"), ("w4a8", "w8a8"), ("w4a16", "fp"), ("w8a8", "fp")])
def test_auto_budget_takes_the_cheapest_step_up(pixart, bits, to):
    """a4 -> a8 first: at W4A4 the promoted layers keep their 4-bit weights (no bytes)."""
    model, inputs = pixart
    qm = clq.quantize(model, [inputs(0)], recipe="rtn", bits=bits, budget=0.1,
                      measure=False, extra_shapes=None)
    meta = qm.plan.meta["budget"]
    assert meta["to"] == to and meta["promoted"]
    if to != "fp":
        assert {qm.plan.layers[n].spec.name for n in meta["promoted"]} == {to}
