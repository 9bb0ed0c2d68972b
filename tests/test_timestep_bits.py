"""AdaTSQ's timestep-aware activation precision (option ``timestep_bits``): the op's
per-sample widths, the nearest-timestep lookup, the beam against brute force, the
timestep input found from the graph, the option's errors, and end to end."""

import itertools

import pytest
import torch

import clq_compile as clq
from clq_compile.api import capture_calls
from clq_compile.build import build_plan, resolve
from clq_compile.calibration import flatten_calls
from clq_compile.errors import ConfigError
from clq_compile.model import QuantizedModel
from clq_compile.passes.infra import PassManager
from clq_compile.passes.rewrite import quant_linear_nodes
from clq_compile.passes.share_inputs import plan_passes
from clq_compile.plan import TimestepPolicy, timestep_rows
from clq_compile.quant import fake_quantize, quantize_weight
from clq_compile.spec import QuantSpec
from clq_compile.testing import TINY_MODELS, held_out_sqnr, plan_context
from clq_compile.timestep_bits import average_bits, find_timestep_input, pareto_beam


def _op(x, w_q, w_s, a_bits, a_clip, **kw):
    return torch.ops.clq.quant_linear(x, w_q, w_s, None, 4, a_bits, 0, a_clip, **kw)


def test_a8_rows_pick_each_samples_width_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g)
    w_q, w_s = quantize_weight(torch.randn(24, 64, generator=g), 4, 0)
    a4, a8 = _op(x, w_q, w_s, 4, 0.9), _op(x, w_q, w_s, 8, 1.0)
    mixed = _op(x, w_q, w_s, 4, 0.9, a8_rows=torch.tensor([True, False, True]))
    assert torch.equal(mixed[0], a8[0]) and torch.equal(mixed[2], a8[2])
    assert torch.equal(mixed[1], a4[1])
    assert (a8 - a4).abs().max() > 1e-2  # the two widths differ visibly
    assert torch.equal(_op(x, w_q, w_s, 4, 0.9, a8_rows=torch.tensor([True])), a8)
    # the 8-bit rows are the reference's own 8-bit fake quantization at clip 1
    from clq_compile.ops import dequantize, unpack_weight
    w = dequantize(unpack_weight(w_q, 4), w_s, 0)
    assert torch.allclose(a8, fake_quantize(x, 8, 0, 1.0) @ w.t(), atol=1e-5)


def test_a8_rows_errors():
    x = torch.randn(3, 5, 64)
    w_q, w_s = quantize_weight(torch.randn(24, 64), 4, 0)
    with pytest.raises(ValueError, match="a8_rows of shape"):
        _op(x, w_q, w_s, 4, 1.0, a8_rows=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="a8_rows raises"):
        _op(x, w_q, w_s, 8, 1.0, a8_rows=torch.tensor([True]))


def test_timestep_rows_take_the_nearest_calibrated_timestep():
    times = torch.tensor([900.0, 500.0, 100.0])
    a8 = torch.tensor([[True, False], [False, False], [True, True]])
    t = torch.tensor([1000, 480, 260, 10])  # nearest: 900, 500, 100 (160 < 240), 100
    assert torch.equal(timestep_rows(t, times, a8), a8[[0, 1, 2, 2]])
    assert torch.equal(timestep_rows(torch.tensor(880.0), times, a8), a8[[0]])  # one for all


@pytest.mark.parametrize("seed", range(4))
def test_pareto_beam_finds_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    steps, choices = 4, 4
    options = []
    for _ in range(steps):
        cost = torch.cat([torch.zeros(1), torch.randint(1, 5, (choices - 1,), generator=g)
                          .cumsum(0).float()])
        err = torch.rand(choices, generator=g)  # not monotone in cost: noise is allowed
        options.append([(float(c), float(e)) for c, e in zip(cost, err, strict=True)])
    for allowed in (0.0, 5.0, 12.0, 100.0):
        picks = pareto_beam(options, allowed)
        best = min((sum(options[u][k][1] for u, k in enumerate(p)), p)
                   for p in itertools.product(range(choices), repeat=steps)
                   if sum(options[u][k][0] for u, k in enumerate(p)) <= allowed)
        assert sum(options[u][k][0] for u, k in enumerate(picks)) <= allowed
        assert sum(options[u][k][1] for u, k in enumerate(picks)) == pytest.approx(best[0])
        narrow = pareto_beam(options, allowed, beam=2)  # truncated: feasible, maybe worse
        assert sum(options[u][k][0] for u, k in enumerate(narrow)) <= allowed


def test_timestep_input_is_found_from_the_graph_and_the_data():
    """Flux's rotary ids also reach sin/cos, but they do not vary across calls."""
    model, inputs = TINY_MODELS["flux"](batch=2)
    ctx = plan_context(model, [inputs(0), inputs(1)])
    assert find_timestep_input(ctx.gm, ctx.flat_calib).name == "timestep"
    same = [dict(inputs(i), timestep=torch.tensor([0.5, 0.5])) for i in range(2)]
    ctx = plan_context(model, same)
    with pytest.raises(ConfigError, match="timestep_bits needs the timestep"):
        find_timestep_input(ctx.gm, ctx.flat_calib)


@pytest.mark.parametrize(("options", "match"), [
    ({"timestep_bits": 3.5}, "timestep_bits=3.5 is not allowed"),
    ({"timestep_bits": 9}, "timestep_bits=9 is not allowed"),
    ({"timestep_bits": "6"}, "timestep_bits='6' is not allowed"),
    ({"timestep_bits": 6.0, "bits": "w4a8"}, "needs bits with 4-bit integer activations"),
    ({"timestep_bits": 6.0, "activations": "lzs"}, "needs bits with 4-bit integer"),
])
def test_option_errors(options, match):
    opts = {"bits": "w4a4", **options}
    with pytest.raises(ConfigError, match=match):
        resolve("rtn", opts.pop("bits"), **opts)


def _graph(model, calls, edit):
    """The rtn W4A4 plan of ``model``, edited, through the one plan-to-graph path."""
    config, spec = resolve("rtn", "w4a4")
    graphs, flat = capture_calls(model, calls)
    plan = build_plan(graphs[0].gm, spec, config, flatten_calls(graphs[0].gm, flat),
                      measure=False)
    edit(plan)
    graphs[0].gm = PassManager(plan_passes(plan))(graphs[0].gm).gm
    return QuantizedModel(graphs, plan)


def test_the_graph_runs_each_sample_at_its_timesteps_width():
    """A hand-made policy (all 4-bit at t=900, all 8-bit at t=100) against two plans
    without one: every block at W4A4, and every block at W4A8 (clip 1)."""
    model, inputs = TINY_MODELS["pixart"](batch=2)
    calls = [inputs(0), inputs(1)]

    def a8(plan):
        for lp in plan.quantized_layers():
            if lp.block is not None:
                lp.spec, lp.a_clip = QuantSpec(4, 8), 1.0

    def policy(plan):
        blocks = sorted({lp.block for lp in plan.quantized_layers() if lp.block is not None})
        plan.timesteps = TimestepPolicy("timestep", torch.tensor([900.0, 100.0]), blocks,
                                        torch.tensor([[False], [True]]).expand(2, len(blocks)))

    x = dict(inputs(7), timestep=torch.tensor([950, 20]))
    with torch.no_grad():
        out4 = _graph(model, calls, lambda plan: None)(**x)[0]
        out8 = _graph(model, calls, a8)(**x)[0]
        qm = _graph(model, calls, policy)
        mixed = qm(**x)[0]
    assert torch.equal(mixed[0], out4[0]) and torch.equal(mixed[1], out8[1])
    assert not torch.equal(out4[1], out8[1])
    flagged = [n for n in quant_linear_nodes(qm.graph_module) if "a8_rows" in n.kwargs]
    assert len(flagged) == sum(1 for n in quant_linear_nodes(qm.graph_module))


@pytest.fixture(scope="module")
def pixart_policy():
    model, inputs = TINY_MODELS["pixart"](batch=2)
    calls = [inputs(i) for i in range(3)]
    qm = clq.quantize(model, calls, recipe="rtn", timestep_bits=6.0, extra_shapes=None)
    plain = clq.quantize(model, calls, recipe="rtn", extra_shapes=None)
    return model, inputs, qm, plain


def test_end_to_end_policy_within_its_average(pixart_policy, tmp_path):
    model, inputs, qm, plain = pixart_policy
    meta, policy = qm.plan.meta["timestep_bits"], qm.plan.timesteps
    assert policy is not None and meta["bits"] <= 6.0
    times = torch.cat([inputs(i)["timestep"].float() for i in range(3)]).unique()
    assert sorted(policy.times.tolist()) == times.tolist()  # one row per calibrated timestep
    cells = policy.a8.float().mean().item()
    assert 0 < cells < 1  # a mixed policy at a 6-bit average
    assert meta["error_a8"] <= meta["error"] <= meta["error_a4"]
    # the recorded bits are the policy's own average (every eligible layer is in a block)
    assert meta["bits"] == pytest.approx(4 + 4 * cells)
    # at other timesteps (a sampler's), each takes its nearest calibrated row: above
    # the highest, one of them exactly, below the lowest
    near = policy.times[[0, 1, -1]] + torch.tensor([5.0, 0.0, -5.0])
    rows = policy.a8[[0, 1, -1]].float()
    assert average_bits(qm.plan, near) == pytest.approx(4 + 4 * rows.mean().item())
    assert held_out_sqnr(model, qm, inputs) > held_out_sqnr(model, plain, inputs)
    text = clq.inspect(qm)
    assert "timestep bits: " in text and "8-bit activations at" in text
    qm.save(tmp_path / "ts")
    loaded = clq.load(tmp_path / "ts")
    assert torch.equal(loaded.plan.timesteps.a8, policy.a8)
    x = inputs(9)
    with torch.no_grad():
        assert torch.equal(loaded(**x)[0], qm(**x)[0])


def test_deterministic(pixart_policy):
    model, inputs, qm, _ = pixart_policy
    again = clq.quantize(model, [inputs(i) for i in range(3)], recipe="rtn",
                         timestep_bits=6.0, extra_shapes=None)
    assert torch.equal(again.plan.timesteps.a8, qm.plan.timesteps.a8)


def test_nothing_to_assign_is_a_warning_and_an_inspect_note(caplog):
    """A budget that already promotes every layer to 8-bit activations leaves the policy
    nothing: the run says so at WARNING and in inspect, and the graph has no flags."""
    model, inputs = TINY_MODELS["dit"](batch=2)
    with caplog.at_level("WARNING", logger="clq_compile.timestep_bits"):
        qm = clq.quantize(model, [inputs(0)], recipe="rtn", budget=1.0, timestep_bits=6.0,
                          measure=False, extra_shapes=None)
    assert "no block has 4-bit-activation layers" in caplog.text
    assert qm.plan.timesteps is None
    assert "WARNING: timestep_bits=6 found no block" in clq.inspect(qm)
    assert not any("a8_rows" in n.kwargs for n in quant_linear_nodes(qm.graph_module))
