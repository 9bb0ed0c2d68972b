"""torch.compile(backend="clq"): fullgraph on diffusers models and the two traps
(unguarded weights, regional compilation)."""

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
import torch._dynamo
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import clq_compile as clq
from clq_compile.annotations import layer_names
from clq_compile.qlinear import sqnr
from clq_compile.testing import TINY_MODELS, recording_backend, tiny_pixart
from tests.onnx.onnx_probes import FP32_TOL, rel_err


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _count_backend_calls(monkeypatch):
    import clq_compile.backend as be

    calls = []
    real = be.clq_backend

    def counting(gm, example_inputs, **kw):
        calls.append(gm)
        return real(gm, example_inputs, **kw)

    monkeypatch.setattr(be, "clq_backend", counting)
    return calls, counting


def test_registered_as_entry_point():
    names = {e.name for e in entry_points(group="torch_dynamo_backends")}
    assert "clq" in names
    assert "clq" in torch._dynamo.list_backends()


def test_works_without_importing_clq_compile():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
        class Blocks(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = torch.nn.ModuleList([m])
            def forward(self, x):
                return self.blocks[0](x)
        x = torch.randn(2, 8, 64)
        assert "clq_compile" not in sys.modules
        with torch.no_grad():
            out = torch.compile(Blocks(), backend="clq", options={"bits": "w8a8"})(x)
        assert "clq_compile" in sys.modules  # loaded through the entry point
        print(float((out - Blocks()(x)).norm() / Blocks()(x).norm()))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 0.05


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3", "flux"])
def test_fullgraph_on_diffusers(name, monkeypatch):
    calls, counting = _count_backend_calls(monkeypatch)
    model, inputs = TINY_MODELS[name]()
    x = inputs(2)
    with torch.no_grad():
        ref = model(**x)[0]
        out = torch.compile(model, backend=counting, fullgraph=True,
                            options={"recipe": "rtn", "bits": "w8a8"})(**x)[0]
    assert len(calls) == 1
    plan = calls[0].meta["clq_plan"]
    layers = [name for n in calls[0].graph.nodes
              if n.target == torch.ops.clq.quant_linear.default for name in layer_names(n)]
    assert sorted(layers) == sorted(lp.name for lp in plan.quantized_layers()) != []
    assert sqnr(ref, out) > 25.0


def test_inplace_weight_update_is_not_stale():
    """Dynamo does not guard weights: an in-place change (LoRA fuse) must repack."""
    model, inputs = tiny_pixart()
    x = inputs(1)
    compiled = torch.compile(model, backend="clq", fullgraph=True, options={"bits": "w8a8"})
    with torch.no_grad():
        compiled(**x)
        lin = model.transformer_blocks[1].ff.net[2]
        lin.weight.mul_(3.0)
        lin.weight[:, :5] = 0.0
        ref = model(**x)[0]
        out = compiled(**x)[0]
    assert sqnr(ref, out) > 25.0


def _fresh(model, x, bits="w8a8"):
    """What a newly compiled copy of ``model`` (as it is now) returns on ``x``."""
    copy = copy_module(model)
    with torch.no_grad():
        return torch.compile(copy, backend="clq", fullgraph=True, options={"bits": bits})(**x)[0]


def copy_module(model):
    import copy

    return copy.deepcopy(model)


def _compiled(model, x):
    compiled = torch.compile(model, backend="clq", fullgraph=True, options={"bits": "w8a8"})
    with torch.no_grad():
        before = compiled(**x)[0]
    return compiled, before


def test_weight_update_through_data_is_not_stale():
    """``w.data += delta`` (PEFT merge, diffusers fuse_lora) leaves ``_version`` alone."""
    model, inputs = tiny_pixart()
    x = inputs(1)
    compiled, before = _compiled(model, x)
    lin = model.transformer_blocks[0].attn1.to_q
    lin.weight.data += 0.5 * torch.randn_like(lin.weight)
    with torch.no_grad():
        out = compiled(**x)[0]
    assert not torch.equal(out, before)
    assert torch.equal(out, _fresh(model, x))


def test_two_data_reassignments_are_not_stale():
    """``w.data = new`` twice can land a fresh tensor (version 0) on an address seen
    before, holding other values; forced here with two tensors over one numpy buffer."""
    model, inputs = tiny_pixart()
    x = inputs(1)
    compiled, _ = _compiled(model, x)
    lin = model.transformer_blocks[1].ff.net[2]
    buf = torch.randn_like(lin.weight).numpy()
    outs = []
    for _ in range(2):
        lin.weight.data = torch.from_numpy(buf)  # same address, a new version counter
        with torch.no_grad():
            outs.append(compiled(**x)[0])
        assert torch.equal(outs[-1], _fresh(model, x))
        buf *= 2.0  # what a reused address holds next time: other values
    assert not torch.equal(outs[0], outs[1])


def test_load_state_dict_is_not_stale():
    model, inputs = tiny_pixart()
    x = inputs(1)
    compiled, before = _compiled(model, x)
    other, _ = tiny_pixart(seed=3)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        out = compiled(**x)[0]
    assert not torch.equal(out, before)
    assert torch.equal(out, _fresh(model, x))


def test_repack_by_version_reads_no_weight_and_sees_in_place_updates(monkeypatch):
    """``repack="version"`` (serving): no fingerprint per call, the same output as the
    default; in-place ops and load_state_dict repack; a ``.data`` write is not seen, as
    documented."""
    import copy

    import clq_compile.weight_cache as wc

    model, inputs = tiny_pixart()
    x = inputs(1)
    _, before = _compiled(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="clq", fullgraph=True,
                             options={"bits": "w8a8", "repack": "version"})
    reads = []
    monkeypatch.setattr(wc, "fingerprint", lambda w: reads.append(w) or 0.0)
    with torch.no_grad():
        assert torch.equal(compiled(**x)[0], before)
        lin = model.transformer_blocks[1].ff.net[2]
        lin.weight.mul_(3.0)
        inplace = compiled(**x)[0]
        model.load_state_dict(tiny_pixart(seed=3)[0].state_dict())
        loaded = compiled(**x)[0]
        as_loaded = copy.deepcopy(model)
        lin.weight.data += 1.0  # not seen: same tensor, same _version
        stale = compiled(**x)[0]
    assert not reads
    monkeypatch.undo()
    assert not torch.equal(inplace, before)
    assert torch.equal(loaded, _fresh(as_loaded, x))
    assert torch.equal(stale, loaded)


def test_peft_lora_fuse_is_not_stale():
    """A real PEFT LoRA on the compiled model, merged into the base weights."""
    peft = pytest.importorskip("peft", reason="peft is a dev dependency; run pip install -e .[dev]")
    model, inputs = tiny_pixart()
    x = inputs(1)
    from peft.tuners.lora import LoraLayer

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "ff.net.2"],
                             init_lora_weights=False)
    model = peft.inject_adapter_in_model(config, model)
    compiled, _ = _compiled(model, x)
    with torch.no_grad():
        unfused = model(**x)[0]
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    for m in layers:
        m.merge()  # PEFT's own merge: base_layer.weight.data += B·A·scale
    with torch.no_grad():
        fused = model(**x)[0]
        out = compiled(**x)[0]
    assert torch.allclose(fused, unfused, atol=1e-4)  # fusing keeps the float function
    assert sqnr(fused, out) > 30  # and the compiled model follows it


def test_regional_compilation_uses_each_blocks_weights(monkeypatch):
    """One compiled graph serves every block; results must equal whole-model RTN."""
    calls, counting = _count_backend_calls(monkeypatch)
    model, inputs = tiny_pixart(layers=4)
    x = inputs(3)
    whole = clq.quantize(model, [x], recipe="rtn", bits="w4a4", measure=False,
                         extra_shapes=None)
    with torch.no_grad():
        expect = whole(**x)[0]
        for blk in model.transformer_blocks:
            blk.compile(backend=counting, fullgraph=True, options={"bits": "w4a4"})
        out = model(**x)[0]
    # Identical blocks share one graph; block 0 alone recompiles because its input comes
    # from the patch embedding with other strides (a Dynamo stride guard, not weights).
    assert len(calls) < len(model.transformer_blocks)
    rel = float((out - expect).norm() / expect.norm())
    assert rel < 1e-4, rel


def test_calibration_inputs_through_options(monkeypatch):
    calls, counting = _count_backend_calls(monkeypatch)
    model, inputs = tiny_pixart()
    calib = [inputs(i) for i in range(3)]
    with torch.no_grad():
        torch.compile(model, backend=counting, fullgraph=True,
                      options={"recipe": "rtn", "bits": "w4a4", "calib": calib})(**inputs(4))
    plan = calls[0].meta["clq_plan"]
    assert all(lp.sqnr_db is not None and lp.sqnr_db > 5 for lp in plan.quantized_layers())


def test_clq_recipe_through_backend_matches_quantize():
    """Calibration calls are mapped onto Dynamo's placeholders by source name, so the
    backend plans exactly what clq.quantize plans."""
    model, inputs = tiny_pixart()
    calib = [inputs(i) for i in range(2)]
    opts = {"w_grid": (1.0, 0.9), "a_grid": (1.0, 0.9)}
    with torch.no_grad():
        out = torch.compile(model, backend="clq", fullgraph=True,
                            options={"recipe": "clq", "bits": "w4a4", "calib": calib,
                                     **opts})(**inputs(9))[0]
    qm = clq.quantize(model, calib, recipe="clq", bits="w4a4", measure=False, extra_shapes=None,
                      **opts)
    assert torch.equal(out, qm(**inputs(9))[0])


def test_calibrating_recipe_without_calibration_is_a_clear_error():
    model, inputs = tiny_pixart()
    with pytest.raises(clq.CalibrationError, match="recipe 'clq' needs calibration inputs"):
        with torch.no_grad():
            torch.compile(model, backend="clq", options={"recipe": "clq"})(**inputs(0))


ACTIVATIONS = ("x", "pro_mul", "pro_add")  # clq.quant_linear's float inputs the graph computes


def _by_name(op, args: tuple, kwargs: dict) -> dict:
    """An op call's arguments by name (its schema's), copied: Inductor reuses buffers."""
    named = {a.name: args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
             for i, a in enumerate(op._schema.arguments)}
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in named.items()}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


class _ClqCalls(TorchDispatchMode):
    """Records each clq op call of a compiled graph run (arguments by name, output).
    Given another run's calls (``forced``), each call returns instead the output of that
    run's call of the same layer (same weights, in order), and is paired with it: the
    graph around the ops then computes on the other run's values."""

    def __init__(self, forced: list | None = None):
        super().__init__()
        self.calls, self.pairs, self.forced = [], [], forced and list(forced)

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if op.namespace != "clq":
            return op(*args, **kwargs)
        assert op is torch.ops.clq.quant_linear.default, f"{op}: no layer to match it by"
        call = _by_name(op, args, kwargs)
        if self.forced is None:
            self.calls.append((call, op(*args, **kwargs).clone()))
            return self.calls[-1][1].clone()
        i = next((i for i, (other, _) in enumerate(self.forced)
                  if all(_same(call[k], other[k]) for k in ("w_q", "w_scale"))), None)
        assert i is not None, f"no call of the other run has the weights of {call['w_q'].shape}"
        twin = self.forced.pop(i)
        self.pairs.append((call, twin[0]))
        return twin[1].clone()


def _assert_inductor_matches_eager(eager, inductor, flat: list) -> None:
    """The Inductor run of the rewritten graph against the eager run, teacher-forced: the
    eager graph is run on the Inductor run's clq op outputs, so both follow one trajectory
    even where float rounding flipped a quantized code. Then each clq op must get the same
    weights and options in both runs, and the same float inputs to FP32_TOL relative."""
    with _ClqCalls() as compiled:
        out = inductor(*flat)
    with _ClqCalls(forced=compiled.calls) as forced:
        ref = eager(*flat)
    assert compiled.calls and len(forced.pairs) == len(compiled.calls)
    for mine, theirs in forced.pairs:
        layer = f"the layer with weights {tuple(mine['w_q'].shape)}"
        for name, value in mine.items():
            if name in ACTIVATIONS and isinstance(value, torch.Tensor):
                err = rel_err(theirs[name], value)
                assert err <= FP32_TOL, f"{name} of {layer}: relative error {err:.1e}"
            else:
                assert _same(theirs[name], value), f"{name} of {layer} differs"
    for got, want in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref), strict=True):
        assert rel_err(got, want) <= FP32_TOL


def test_inductor_compiles_the_rewritten_graph_and_still_repacks():
    """options={"inductor": True}: the graph minus its weight packers goes to Inductor
    (on CPU: C++ for everything but the clq ops, which stay extern kernels); packing runs
    outside it, so an in-place weight change still repacks.

    Against the eager backend, compared per op (``_assert_inductor_matches_eager``): the
    clq ops are one kernel in both runs; between them Inductor's C++ (its vectorization
    chosen by the CPU's ISA) and ATen's kernels may reorder a softmax's or a norm's
    reduction and evaluate exp/tanh by other routines: a few roundings per element, so
    a segment's output moves by c·√n·u relative (n ≤ 256 terms, u = 2⁻²⁴: ~1e-6), under
    FP32_TOL = 1e-5 (measured ≤ 7e-8 on 40 inputs, with AVX2 and with
    ATEN_CPU_CAPABILITY=default), while a wrong op, argument or stale weight moves it by
    far more. On the plain outputs no fixed floor holds: such a move can flip an 8-bit
    code at a rounding tie and the network carries it on (the old floor, 80 dB: on 40
    inputs at their own timesteps, one fell below it with AVX2 (72.4 dB), three with
    ATEN_CPU_CAPABILITY=default). Timestep 0: the sinusoidal embedding sin(t·f),
    cos(t·f) is then exact whatever the exp and sin routines; at t ~ 1000 it multiplies
    the paths' 1-ulp differences in f by t (embeddings measured 3e-5 apart), a
    conditioning FP32_TOL does not cover. After the weight change both runs must still
    agree (both repacked), and sit at the new float model's W8A8 noise (53 dB measured;
    a packing left stale by such a change: 18 dB)."""
    runs, keep = recording_backend()
    model, inputs = tiny_pixart()
    x = inputs(2)
    x["timestep"] = torch.zeros_like(x["timestep"])
    with torch.no_grad():
        torch.compile(model, backend=keep, fullgraph=True,
                      options={"bits": "w8a8", "inductor": False})(**x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=keep, fullgraph=True,
                                 options={"bits": "w8a8", "inductor": True})
        compiled(**x)
        assert [r.inductor for r, _ in runs] == [False, True]
        (eager, flat), (inductor, flat_inductor) = runs
        assert all(a is b for a, b in zip(flat, flat_inductor, strict=True))
        _assert_inductor_matches_eager(eager, inductor, flat)
        lin = model.transformer_blocks[1].ff.net[2]
        lin.weight.mul_(3.0)
        _assert_inductor_matches_eager(eager, inductor, flat)
        ref = model(**x)[0]
        assert sqnr(ref, compiled(**x)[0]) > 25.0


@pytest.mark.parametrize(("options", "match"), [
    ({"mode": "fastest"}, "mode='fastest'"),
    ({"inductor": False, "mode": "reduce-overhead"}, "needs inductor=True"),
    ({"inductor": "yes"}, "inductor='yes'"),
    ({"kernels": "auto"}, "kernels='auto'"),
    ({"weights": "twinlog"}, "weights='twinlog' is solved from the weights once"),
    ({"dac": True}, "dac=True is solved from the weights once"),
    ({"dsq": True}, "dsq=True is solved from the weights once"),
    ({"timestep_bits": 6.0}, "timestep_bits=6.0 reads the timestep"),
    ({"repack": "never"}, "repack='never'"),
])
def test_backend_options_are_checked(options, match):
    model, inputs = tiny_pixart()
    with pytest.raises(clq.ConfigError, match=match):
        torch.compile(model, backend="clq", options=options)(**inputs(1))


def test_lzs_activations_through_the_backend():
    """An activation format reaches the backend's graph (re-packed weights, same op)
    and gives what clq.quantize gives for the same recipe."""
    model, inputs = tiny_pixart()
    x = inputs(2)
    with torch.no_grad():
        out = torch.compile(model, backend="clq", fullgraph=True,
                            options={"activations": "lzs", "inductor": False})(**x)[0]
        ref = clq.quantize(model, [inputs(0)], activations="lzs", extra_shapes=None,
                           measure=False)(**x)[0]
    assert torch.equal(out, ref)


def test_weights_reach_inductor_as_static_inputs(monkeypatch):
    """Under CUDA graphs a non-static input is copied into graph-owned memory on every
    replay. The graph handed to Inductor is cut from Dynamo's, so ``static_weights`` puts
    back what marks weights static: every input but the call's activations is (the
    packers' outputs and the graph's constants included; before: none of them was)."""
    from torch._inductor.compile_fx import compile_fx

    import clq_compile.backend as be

    runs, keep = recording_backend()
    model, inputs = tiny_pixart()
    x = inputs(2)
    with torch.no_grad():
        torch.compile(model, backend=keep, fullgraph=True,
                      options={"recipe": "quarot", "bits": "w4a4", "inductor": False})(**x)
    run, ex = runs[0]
    inner, packers = be.split_packers(run.graph_module)
    flat = [*ex, *(t for p, i in packers for t in p(ex[i]))]
    graph, consts = be.static_weights(inner, run.graph_module)
    assert consts  # the Hadamard blocks, smoothing vectors

    class Seen(Exception):
        pass

    seen = {}

    def probe(gm, example_inputs, **kw):
        seen.update(n=len(example_inputs), static=set(kw["static_input_idxs"]))
        raise Seen

    with pytest.raises(Seen), torch.no_grad():
        compile_fx(graph, [*flat, *consts], inner_compile=probe)
    activations = [i for i, t in enumerate(ex) if any(t is v for v in x.values())]
    assert len(activations) == 3  # hidden_states, encoder_hidden_states, timestep
    assert seen["n"] == len(flat) + len(consts)
    assert set(range(seen["n"])) - seen["static"] == set(activations)


def test_backend_graph_fuses_norm_and_modulation_into_the_quantizers():
    """The backend's graphs are Dynamo's (``F.layer_norm``, ``operator.mul``): the same
    prologue rule fuses each block's norms with their adaLN modulation (q/k/v's input and
    the MLP's), and no LayerNorm is left in front of a quantizer."""
    runs, keep = recording_backend()
    model, inputs = tiny_pixart()
    with torch.no_grad():
        out = torch.compile(model, backend=keep, fullgraph=True,
                            options={"recipe": "quarot", "bits": "w4a4",
                                     "inductor": False})(**inputs(2))[0]
    ((run, _),) = runs
    q_nodes = [n for n in run.graph_module.graph.nodes
               if n.target == torch.ops.clq.quant_linear.default]
    fused = [q for q in q_nodes if q.args[11:] == ("layer_norm",)]
    assert len(fused) == 2 * len(model.transformer_blocks)  # norm1 -> q/k/v, norm2 -> MLP
    assert all(set(q.kwargs) >= {"pro_mul", "pro_add"} for q in fused)
    with torch.no_grad():
        ref = model(**inputs(2))[0]
    # quarot W4A4 of the tiny random model: 31.0 dB measured; a wrong prologue puts one
    # layer's input at 1-7 dB (test_act_quant.test_transform_with_norm_prologue)
    assert sqnr(ref, out) > 20.0


class _Blocks(torch.nn.Module):
    """Two linears in a block: the smallest model the backend quantizes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))])

    def forward(self, x):
        return self.blocks[0](x)


@pytest.mark.parametrize("suppress_errors", [False, True])
def test_a_clq_error_reaches_the_caller_as_itself(suppress_errors):
    """Dynamo wraps what a backend raises in BackendCompilerFailed, or with suppress_errors
    runs the frame eagerly, unquantized; the clq error is raised by the compiled call
    instead, so it is caught by its own type, under either setting, on every call."""
    compiled = torch.compile(_Blocks(), backend="clq", options={"kernels": "auto"})
    with torch._dynamo.config.patch(suppress_errors=suppress_errors), torch.no_grad():
        for _ in range(2):
            try:
                compiled(torch.randn(2, 8, 64))
            except clq.ConfigError as e:
                assert "kernels='auto'" in str(e)
            else:
                pytest.fail("no ConfigError")


def test_budget_without_calibration_names_the_budget():
    with pytest.raises(clq.CalibrationError, match=r"option budget=0.3 needs calibration"):
        with torch.no_grad():
            torch.compile(_Blocks(), backend="clq", options={
                "recipe": "rtn", "bits": "w4a4", "budget": 0.3})(torch.randn(2, 8, 64))


def test_budget_with_calibration_promotes_through_the_backend(monkeypatch):
    """budget is a plan decision (which layers get 8-bit activations), not a solve on the
    weights, so with calibration the backend takes it: the most sensitive layers of the
    plan it builds are promoted to W4A8, as clq.quantize promotes them."""
    calls, counting = _count_backend_calls(monkeypatch)
    model, inputs = tiny_pixart()
    calib = [inputs(i) for i in range(2)]
    with torch.no_grad():
        torch.compile(model, backend=counting, fullgraph=True, options={
            "recipe": "rtn", "bits": "w4a4", "budget": 0.3, "calib": calib})(**inputs(4))
    plan = calls[0].meta["clq_plan"]
    promoted = plan.meta["budget"]["promoted"]
    assert promoted
    assert {plan.layers[name].spec.name for name in promoted} == {"w4a8"}


def test_weights_that_require_grad_are_refused_naming_one():
    with pytest.raises(clq.InputError, match=r"weight blocks\.0\.0\.weight \(and 3 more\) "
                       r"requires grad.*torch\.no_grad\(\).*requires_grad_\(False\)"):
        torch.compile(_Blocks(), backend="clq", options={"bits": "w8a8"})(torch.randn(2, 8, 64))


def test_an_input_that_requires_grad_is_refused_and_no_grad_runs():
    """Refused only while grad mode is on and something requires grad; then it runs.
    W8A8 on two 64-wide linears measures 39 dB; the floor is 25 dB, the 5% relative
    error test_works_without_importing_clq_compile allows (a finite SQNR: quantized)."""
    model = _Blocks().requires_grad_(False)
    x = torch.randn(2, 8, 64, requires_grad=True)
    compiled = torch.compile(model, backend="clq", options={"bits": "w8a8"})
    with pytest.raises(clq.InputError, match=r"^input x requires grad"):
        compiled(x)
    with torch.no_grad():  # grad mode is in Dynamo's guards: this compiles again, and runs
        assert sqnr(model(x), compiled(x)) > 25.0
    assert sqnr(model(x.detach()), compiled(x.detach())) > 25.0  # nothing requires grad
