"""torch.compile(backend="clq"): fullgraph on diffusers models and the two traps
(unguarded weights, regional compilation)."""

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
import torch._dynamo

import clq_compile as clq
from clq_compile.annotations import layer_names
from clq_compile.qlinear import sqnr
from clq_compile.testing import TINY_MODELS, recording_backend, tiny_pixart


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
    with pytest.raises(Exception, match="needs calibration inputs"):
        with torch.no_grad():
            torch.compile(model, backend="clq", options={"recipe": "clq"})(**inputs(0))


def test_inductor_compiles_the_rewritten_graph_and_still_repacks():
    """options={"inductor": True}: the graph minus its weight packers goes to Inductor
    (on CPU: C++ for everything but the clq ops, which stay extern kernels); packing runs
    outside it, so an in-place weight change still repacks. Against the eager backend the
    output moves only by Inductor's float32 reassociation in norms/softmax, which can flip
    a rare 8-bit activation code: measured 121 dB, floor 80 dB."""
    runs, keep = recording_backend()
    model, inputs = tiny_pixart()
    x = inputs(2)
    with torch.no_grad():
        eager = torch.compile(model, backend=keep, fullgraph=True,
                              options={"bits": "w8a8", "inductor": False})(**x)[0]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=keep, fullgraph=True,
                                 options={"bits": "w8a8", "inductor": True})
        out = compiled(**x)[0]
        assert [r.inductor for r, _ in runs] == [False, True]
        assert sqnr(eager, out) > 80.0
        lin = model.transformer_blocks[1].ff.net[2]
        lin.weight.mul_(3.0)
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
    with pytest.raises(Exception, match=match):
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
