"""OBS: permutations, Hadamard folding, shared transforms, rotation-only exactness."""

import pytest
import torch

import clq_compile as clq
from clq_compile.annotations import layer_names
from clq_compile.api import plan_model
from clq_compile.cbc import GroupStats
from clq_compile.passes.infra import PassManager
from clq_compile.passes.obs import obs_transform, permutation, quarot_transform
from clq_compile.passes.rewrite import RewriteLinears
from clq_compile.qlinear import apply_transform, fold_weight, sqnr
from clq_compile.signature import bind, params_of
from clq_compile.testing import tiny_flux, tiny_pixart


def test_sorted_permutation_orders_scores_descending():
    scores = torch.rand(64)
    p = permutation(scores, "sorted", 16)
    assert torch.equal(scores[p], torch.sort(scores, descending=True).values)


def test_zigzag_is_a_permutation_that_spreads_outliers():
    scores = torch.rand(128)
    scores[:8] += 100.0  # eight outlier channels
    p = permutation(scores, "zigzag", 16)
    assert torch.equal(torch.sort(p).values, torch.arange(128))
    per_block = (p.reshape(8, 16) < 8).sum(dim=1)  # outliers landing in each block
    assert per_block.tolist() == [1] * 8
    assert permutation(scores, "none", 16) is None


@pytest.mark.parametrize("tp", [
    obs_transform(torch.rand(96), "zigzag", 128),  # falls back to B=32
    obs_transform(torch.rand(96), "sorted", 32),
    quarot_transform(96, 1 << 14, seed=1),
])
def test_transform_then_folded_weight_is_exact(tp):
    x, w = torch.randn(5, 96), torch.randn(40, 96)
    y = apply_transform(x, tp) @ fold_weight(w, tp).T
    assert torch.allclose(y, x @ w.T, atol=1e-4)


def test_block_fallback_is_recorded():
    tp = obs_transform(torch.rand(96), "zigzag", 128)
    assert tp.block == 32 and "does not divide" in tp.note


@pytest.mark.parametrize("recipe,opts", [
    ("clq", {"clps": False}), ("clq", {"clps": False, "order": "sorted"}),
    ("quarot", {}), ("smoothquant", {}),
    ("quarot", {"dsq": True}), ("rtn", {"dsq": True}),  # DSQ's s_c joins the smooth
])
@pytest.mark.parametrize("factory", [tiny_pixart, tiny_flux])
def test_rotation_only_leaves_output_unchanged(factory, recipe, opts):
    """Transforms are orthogonal and/or diagonal and folded exactly: the output may move
    only by float32 rounding, ~1e-6 relative; 1e-4 leaves margin for accumulation."""
    model, inputs = factory()
    calib = [inputs(i) for i in range(2)]
    gm, plan = plan_model(model, calib, recipe=recipe, bits="w4a4", **opts)
    assert plan.transforms
    gm = PassManager([RewriteLinears(plan, weights="float")])(gm).gm
    n_t = sum(1 for n in gm.graph.nodes if n.target == torch.ops.clq.transform.default)
    assert n_t == len({lp.group for lp in plan.quantized_layers() if plan.transform_of(lp)})
    if opts.get("dsq"):
        assert any("dsq" in tp.kind for tp in plan.transforms.values())
    x = inputs(5)
    call = bind(params_of(model.forward), (), x)  # the graph takes the full keyword layout
    with torch.no_grad():
        ref, out = model(**x)[0], gm(**call)[0]
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def test_shared_input_layers_share_one_transform():
    """One transform per input group: a node of its own, or fused into the one
    quant_linear that reads it (q/k/v share one)."""
    model, inputs = tiny_pixart()
    qm = clq.quantize(model, [inputs(0)], recipe="clq", bits="w4a4", clps=False,
                      extra_shapes=None)
    nodes = qm.graph_module.graph.nodes
    transforms = [n for n in nodes if n.target == torch.ops.clq.transform.default]
    q = [n for n in nodes if n.target == torch.ops.clq.quant_linear.default]
    fused = [n for n in q if any(a is not None for a in n.args[8:])]
    groups = {lp.group for lp in qm.plan.quantized_layers()}
    assert len(transforms) + len(fused) == len(groups)
    qkv = [f"transformer_blocks.0.attn1.to_{c}" for c in "qkv"]
    assert sum(layer_names(n) == qkv for n in fused) == 1


def test_percentile_score_ignores_a_single_token_spike():
    """max |x| ranks a channel first for one spiking token; a percentile score does not."""
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    x[:, 5] *= 8.0  # a channel that is large on every token
    x[17, 9] = 400.0  # one token spikes in another channel
    st = GroupStats(absmax=x.abs().amax(dim=0), samples=[x[:128], x[128:]])
    assert int(st.score(None).argmax()) == 9
    assert int(st.score(0.99).argmax()) == 5
    assert torch.allclose(st.score(0.5), x.abs().median(dim=0).values, rtol=0.05)


def test_clq_percentile_option_builds_a_working_model():
    model, inputs = tiny_pixart()
    calib, held = [inputs(i) for i in range(3)], inputs(10)
    qm = clq.quantize(model, calib, recipe="clq", bits="w4a8", percentile=0.999, clps=False,
                      measure=False, extra_shapes=None)
    with torch.no_grad():
        ref, out = model(**held)[0], qm(**held)[0]
    # W4A8 on the random-weight tiny PixArt measures ~34 dB; a wrong permutation or a
    # transform that does not match its folded weights would drop it to near 0 dB.
    assert sqnr(ref, out) > 20.0
    assert qm.plan.transforms, "OBS planned no transform"
