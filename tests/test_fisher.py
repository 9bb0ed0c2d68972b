"""AdaTSQ's Fisher-weighted GPTQ Hessian (option ``hessian="fisher"``): the sensitivity
against an analytic case and against plain autograd on the eager model, the weighted
Hessian against its definition, and the option end to end."""

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import clq_compile as clq
from clq_compile.cbc import calibrate_blockwise
from clq_compile.fisher import fisher_weights, squared_output_gradients
from clq_compile.testing import held_out_sqnr, plan_context, tiny_pixart


class ScaledChain(nn.Module):
    """out = b(a(x))·s: ∂(v·out)/∂y is v·s at b and (v·s)·W_b at a, so each layer's mean
    squared gradient on call c is s_c² times a constant of the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x, s):
        return self.b(self.a(x)) * s


def test_alpha_is_each_calls_squared_output_gradient() -> None:
    torch.manual_seed(0)
    scales = (0.5, 1.0, 3.0)
    calls = [(torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(i)),
              torch.full((1,), s)) for i, s in enumerate(scales)]
    ctx = plan_context(ScaledChain().eval(), calls)
    plan = ctx.base_plan("rtn")
    for lp in plan.layers.values():  # the analysis may keep a toy's last layer in float
        lp.spec = ctx.spec
    alpha = fisher_weights(ctx, plan)
    s2 = torch.tensor(scales, dtype=torch.float64) ** 2
    for name in ("a", "b"):
        torch.testing.assert_close(alpha[name], s2 / s2.mean(), rtol=1e-5, atol=0)
    want = s2 / s2.mean()
    assert f"fisher α over 3 calls: {want.min():.2f}–{want.max():.2f}" in plan.layers["a"].notes[-1]


def test_sensitivity_matches_autograd_on_the_eager_model() -> None:
    """The plain-PyTorch reference: forward hooks on the model's own nn.Linear modules,
    the same probe v (seed 0, one per output), backward. Float32 autograd in two orders of
    evaluation: agreement to 1e-4 relative."""
    model, inputs = tiny_pixart()
    calls = [inputs(i) for i in range(2)]
    ctx = plan_context(model, calls)
    names = list(ctx.nodes)
    got = squared_output_gradients(ctx, names)
    modules = dict(model.named_modules())
    want = torch.zeros_like(got)
    for c, call in enumerate(calls):
        outs = {}
        hooks = [modules[n].register_forward_hook(
            lambda m, args, y, n=n, outs=outs: outs.__setitem__(n, y)) for n in names]
        grads = pytree.tree_map(lambda v: v.detach().requires_grad_() if isinstance(
            v, torch.Tensor) and v.is_floating_point() else v, call)
        out = model(**grads)[0]  # the inputs say return_dict=False
        for h in hooks:
            h.remove()
        ys = [outs[n] for n in names]
        v = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        gs = torch.autograd.grad((out.float() * v).sum(), ys, allow_unused=True)
        for r, g in enumerate(gs):
            want[r, c] = 0.0 if g is None else g.double().pow(2).mean()
    assert (want > 0).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_weighted_hessian_is_the_alpha_weighted_sum_per_layer() -> None:
    """Σ_c α_c·X_cᵀX_c per layer: against each call's own (unweighted) sum, collected on
    the same quantized prefix; a weight of 0 or 1 is exact."""
    model, inputs = tiny_pixart()
    calls = [inputs(i) for i in range(3)]
    ctx = plan_context(model, calls)
    plan = ctx.base_plan("rtn")
    names = [lp.name for lp in plan.quantized_layers()]
    weights = {n: torch.tensor([0.25, 0.0, 2.0] if i % 2 else [0.0, 1.0, 0.0],
                               dtype=torch.float64) for i, n in enumerate(names)}
    seen: dict = {}
    calibrate_blockwise(ctx, plan, lambda b: seen.update(b.hessians), hessians=weights)
    per_call = []
    for c in range(3):
        single = plan_context(model, [calls[c]])
        got: dict = {}
        calibrate_blockwise(single, single.base_plan("rtn"),
                            lambda b, got=got: got.update(b.hessians), hessians=True)
        per_call.append(got)
    assert set(seen) == set(names)
    for i, name in enumerate(names):
        group = plan.layers[name].group
        h = seen[name]
        assert h.tokens == sum(pc[group].tokens for pc in per_call)
        if i % 2:
            want = sum(a * pc[group].sum for a, pc in zip((0.25, 0.0, 2.0), per_call, strict=True))
            torch.testing.assert_close(h.sum, want, rtol=1e-9, atol=1e-9)
        else:
            assert torch.equal(h.sum, per_call[1][group].sum)


def test_fisher_gptq_end_to_end_and_refusals() -> None:
    model, inputs = tiny_pixart()
    calib = [inputs(i) for i in range(3)]
    kw = dict(recipe="rtn", bits="w4a8", weights="gptq", measure=False, extra_shapes=None)
    a, b = (clq.quantize(model, calib, hessian="fisher", **kw) for _ in range(2))
    uniform = clq.quantize(model, calib, **kw)
    layers = a.plan.quantized_layers()
    assert {lp.rounding for lp in layers} == {"gptq-fisher"}
    assert all(torch.equal(pw.w_q, b.plan.weights[n].w_q) for n, pw in a.plan.weights.items())
    differ = sum(not torch.equal(pw.w_q, uniform.plan.weights[n].w_q)
                 for n, pw in a.plan.weights.items())
    assert differ > len(layers) // 2
    table = clq.inspect(a)
    assert "gptq-fisher" in table and "fisher α over 3 calls" in table
    # still GPTQ: on this random-weight model within 1 dB of the uniform Hessian
    assert abs(held_out_sqnr(model, a, inputs) - held_out_sqnr(model, uniform, inputs)) < 1.0
    with pytest.raises(clq.ConfigError, match=r"hessian='fisher'.*weights='gptq'"):
        clq.quantize(model, calib, hessian="fisher")
    with pytest.raises(clq.ConfigError, match=r"hessian='fish'.*'uniform'"):
        clq.quantize(model, calib, weights="gptq", hessian="fish")
