"""CLPS target choice on a planted chain; CBC feeding quantized-prefix activations."""

import pytest
import torch
from torch import nn

import clq_compile as clq
from clq_compile.annotations import layer_names
from clq_compile.calibration import flatten_calls
from clq_compile.cbc import calibrate_blockwise
from clq_compile.ops import apply_prologue, transform_reference
from clq_compile.testing import plan_context
from tests.passes.toy import ToyDiT, toy_inputs

D = 32


class PlantedChain(nn.Module):
    """``src`` feeds ``a`` and ``b``. The input has one huge channel, so per-token int4
    wipes out the small ones; ``src``'s second half of outputs depends only on the small
    channels and ``b`` reads only that half: quantizing ``src`` hurts ``b`` most."""

    def __init__(self):
        super().__init__()
        self.src, self.a, self.b = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        with torch.no_grad():
            self.src.weight[D // 2:, 0] = 0.0
            self.src.weight[: D // 2, 0] = 1.0
            self.a.weight[:, D // 2:] = 0.0
            self.b.weight[:, : D // 2] = 0.0

    def forward(self, x):
        h = self.src(x)
        return x + self.a(h) + self.b(h)


def planted_calls(n=3):
    calls = []
    for i in range(n):
        x = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(i))
        x[..., 0] *= 100.0
        calls.append((x,))
    return calls


def test_clps_picks_the_planted_worst_downstream_layer():
    torch.manual_seed(0)
    model = PlantedChain().eval()
    _, plan = clq.api.plan_model(model, planted_calls(), recipe="clq", bits="w4a4", obs=False)
    lp = plan.layers["src"]
    assert lp.target == "b"
    assert lp.err_after <= lp.err_before
    assert plan.layers["b"].target == "b"  # nothing downstream: its own output


def _block_inputs(prefix):
    """Absmax of the input of each block's first attention, as CBC saw it."""
    torch.manual_seed(0)
    model = ToyDiT(depth=3).eval()
    calls = [toy_inputs(seed=s) for s in range(2)]
    ctx = plan_context(model, calls)
    plan = ctx.base_plan("rtn")
    seen = {}

    def decide(block):
        first = next(n for n in block.layers if n.endswith("attn.to_q"))
        seen[first.split(".")[1]] = block.stats[plan.layers[first].group].absmax.clone()

    calibrate_blockwise(ctx, plan, decide, prefix=prefix)
    return model, calls, seen


def _interpret_inputs(qm, names, calls):
    """Inputs of the clq.quant_linear nodes computing the named layers (after the prologue
    and input transform the node may hold), by a plain FX Interpreter."""
    got = {}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.target != torch.ops.clq.quant_linear.default:
                return out
            kw = {k: self.env[v] if isinstance(v, torch.fx.Node) else v
                  for k, v in n.kwargs.items() if k in ("pro_mul", "pro_add", "norm_eps")}
            x = apply_prologue(self.env[n.args[0]], (*n.args[11:], None)[0], **kw)
            if len(n.args) > 8:
                x = transform_reference(x, *(None if a is None else self.env[a]
                                             for a in n.args[8:11]))
            am = x.float().reshape(-1, D).abs().amax(0)
            for name in set(layer_names(n)) & names:
                prev = got.get(name)
                got[name] = am if prev is None else torch.maximum(prev, am)
            return out

    for c in calls:
        flat = flatten_calls(qm.graph_module, [qm.call_spec.normalize((), c)[0]])[0]
        Spy(qm.graph_module).run(*flat)
    return got


def test_cbc_feeds_the_quantized_prefix():
    model, calls, seen = _block_inputs("all")
    qm = clq.quantize(model, calls, recipe="rtn", bits="w4a4", measure=False,
                      extra_shapes=None)
    names = [f"blocks.{b}.attn.to_q" for b in range(3)]
    expect = _interpret_inputs(qm, set(names), calls)
    for b in range(3):
        assert torch.allclose(seen[str(b)], expect[names[b]], rtol=1e-5, atol=1e-6), b


@pytest.mark.parametrize("prefix", ["none", "last"])
def test_cbc_prefix_modes(prefix):
    model, calls, seen = _block_inputs(prefix)
    _, _, seen_all = _block_inputs("all")
    fp = {}
    hooks = [model.blocks[b].attn.to_q.register_forward_pre_hook(
        lambda m, a, b=b: fp.__setitem__(b, torch.maximum(
            fp.get(b, torch.zeros(D)), a[0].abs().reshape(-1, D).amax(0))))
        for b in range(3)]
    with torch.no_grad():
        for c in calls:
            model(**c)
    for h in hooks:
        h.remove()
    assert torch.allclose(seen["0"], fp[0])  # nothing quantized before block 0
    if prefix == "none":
        for b in range(3):
            assert torch.allclose(seen[str(b)], fp[b], rtol=1e-5, atol=1e-6)
    else:
        # block 1 sees block 0 quantized in both modes; block 2 sees only block 1
        assert torch.allclose(seen["1"], seen_all["1"], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(seen["2"], seen_all["2"], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(seen["2"], fp[2], rtol=1e-5, atol=1e-6)
