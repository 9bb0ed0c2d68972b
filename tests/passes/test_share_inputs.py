"""Quantize each activation once: sibling quant_linears merge, single-use transforms fuse,
and the graph computes exactly what one quant_linear per layer computes."""

import copy
import dataclasses

import pytest
import torch

from clq_compile.annotations import layer_names
from clq_compile.api import plan_model
from clq_compile.passes.graph_utils import gelu_kind
from clq_compile.passes.infra import PassManager
from clq_compile.passes.rewrite import QUANT_LINEAR, TRANSFORM, RewriteLinears
from clq_compile.passes.share_inputs import plan_passes
from clq_compile.signature import bind, params_of
from clq_compile.testing import tiny_flux, tiny_pixart


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def _per_layer_and_shared(model, inputs, plan_edit=None, **opts):
    gm, plan = plan_model(model, [inputs(i) for i in range(2)], **opts)
    if plan_edit is not None:
        plan_edit(plan)
    per_layer = PassManager([RewriteLinears(plan)])(copy.deepcopy(gm)).gm
    shared = PassManager(plan_passes(plan))(gm).gm
    call = bind(params_of(model.forward), (), inputs(5))
    with torch.no_grad():
        return plan, per_layer, shared, per_layer(**call)[0], shared(**call)[0]


@pytest.mark.parametrize("factory", [tiny_pixart, tiny_flux])
@pytest.mark.parametrize(("recipe", "bits"), [("quarot", "w4a4"), ("rtn", "w8a8")])
def test_shared_graph_is_bit_identical_with_fewer_quantizers(factory, recipe, bits):
    """Concatenating weights along N leaves each output column the same integer dot
    product times the same scales, and the fused transform is the same op sequence: the
    output must equal the per-layer graph's bit for bit."""
    model, inputs = factory()
    plan, per_layer, shared, ref, out = _per_layer_and_shared(model, inputs, recipe=recipe,
                                                              bits=bits)
    assert torch.equal(out, ref)
    n_layers = len(plan.quantized_layers())
    q_nodes = _nodes(shared, QUANT_LINEAR)
    assert len(_nodes(per_layer, QUANT_LINEAR)) == n_layers
    assert sorted(n for q in q_nodes for n in layer_names(q)) == \
        sorted(lp.name for lp in plan.quantized_layers())
    assert len(q_nodes) < n_layers  # q/k/v (and cross-attention k/v) share a quantizer
    # one quant_linear per distinct input: every (input, quantizer) key appears once
    keys = [(q.args[0], *q.args[4:8], *q.args[8:]) for q in q_nodes]
    assert len(keys) == len(set(keys))
    # every transform had one consumer left after merging, so none stays a node
    assert not _nodes(shared, TRANSFORM)
    assert all(len(q.args) >= 11 for q in q_nodes) == (recipe == "quarot")
    # the MLPs' GELUs moved into their down-projections' quantizers
    assert sum(q.args[11:] in (("gelu",), ("gelu_tanh",)) for q in q_nodes) > 0
    assert not any(gelu_kind(q.args[0]) for q in q_nodes)
    # and each block's norms with their adaLN modulation into q/k/v's and the MLP's
    assert sum(q.args[11:] == ("layer_norm",) for q in q_nodes) >= 2 * len(model.transformer_blocks)


def test_qkv_of_a_block_become_one_node_with_its_transform():
    model, inputs = tiny_pixart()
    _, _, shared, _, _ = _per_layer_and_shared(model, inputs, recipe="quarot", bits="w4a4")
    qkv = [f"transformer_blocks.0.attn1.to_{c}" for c in "qkv"]
    (node,) = [q for q in _nodes(shared, QUANT_LINEAR) if layer_names(q)[0] == qkv[0]]
    assert layer_names(node) == qkv
    assert node.args[1].op == "get_attr"  # the concatenated packed weight is a constant
    w_q = shared.get_buffer(node.args[1].target)
    assert w_q.shape[0] == sum(model.transformer_blocks[0].attn1.to_q.weight.shape[:1] * 3)
    assert node.args[10] is not None  # the rotation is fused in
    assert node.args[11:] == ("layer_norm",)  # and so are norm1 and the adaLN modulation
    assert node.args[0].op == "placeholder" or "layer_norm" not in str(node.args[0].target)


def test_different_clips_decline_and_keep_the_transform_node():
    """CLPS may give q, k and v different activation clips: those cannot share integers.
    q and v still merge; k keeps its own quantizer; the transform, read by two
    quantizers, stays one node."""
    model, inputs = tiny_pixart()
    k_name = "transformer_blocks.0.attn1.to_k"

    def edit(plan):
        plan.layers[k_name] = dataclasses.replace(plan.layers[k_name], a_clip=0.9)

    _, _, shared, ref, out = _per_layer_and_shared(model, inputs, edit, recipe="quarot",
                                                   bits="w4a4")
    assert torch.equal(out, ref)
    groups = [layer_names(q) for q in _nodes(shared, QUANT_LINEAR)]
    assert [k_name] in groups
    assert ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_v"] in groups
    t = [n for n in _nodes(shared, TRANSFORM) if len(n.users) == 2]
    assert len(t) == 1 and all(u.target == QUANT_LINEAR for u in t[0].users)


def test_lowrank_keeps_the_transform_for_its_branch():
    model, inputs = tiny_pixart()
    _, _, shared, ref, out = _per_layer_and_shared(model, inputs, recipe="quarot",
                                                   bits="w4a4", lowrank=4)
    assert torch.equal(out, ref)
    assert _nodes(shared, TRANSFORM)  # the branch reads the transformed x
    assert any(len(layer_names(q)) == 3 for q in _nodes(shared, QUANT_LINEAR))
