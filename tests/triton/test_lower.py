"""LowerToKernels: clq ops become clq_triton triton_ops at compile time, deciding what the
eager dispatch decides per call; run here under the interpreter, like the dispatch tests.

The lowered op and the eager dispatch run the same triton_op body; what the pass adds is
the decision and the derived operands (rotation tile, unpacked weight), so a lowered graph
must give exactly the eager dispatch's output on the same route.

Against the clq ops' references, lowered graphs are compared op by op on the same inputs
(``_check_lowered_ops``), never output against output: there a code flipped by one fp32
rounding difference (which the CPU's kernels decide: blocking, FMA, vector width) moves a
value by a whole 4-bit step and every later layer carries it, so a whole-model SQNR floor
holds on one CPU and not on another (44 dB against a floor of 80 on an AVX-512 machine).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree

from clq_compile.hadamard import hadamard
from clq_compile.lowering.triton import dispatch
from clq_compile.lowering.triton.act_quant import rotate_quantize
from clq_compile.lowering.triton.lower import LowerToKernels, lowered_ops
from clq_compile.lowering.triton.support import modulation_operand
from clq_compile.passes.find_linears import fetch_attr
from clq_compile.passes.graph_utils import call_arguments
from clq_compile.passes.rewrite import QUANT_LINEAR
from clq_compile.qlinear import sqnr
from clq_compile.quant import quantize_weight
from clq_compile.testing import orthogonal_blocks, recording_backend
from clq_compile.twinlog import twinlog_weight
from tests.triton.conftest import ON_GPU
from tests.triton.helpers import (
    assert_equal,
    assert_quant_linear_agrees,
    assert_transform_agrees,
    integer_activation,
    kernel_ints,
    random_activation,
)

_LOGGER = "clq_compile.lowering.triton.lower"


class _Layer(torch.nn.Module):
    """One clq::quant_linear with its weight and transform as buffers (graph constants)."""

    def __init__(self, w_q, w_s, bias, args, transform=(None, None, None), tail=()) -> None:
        super().__init__()
        self.args, self.tail = args, tail
        for name, t in zip(("w_q", "w_s", "bias", "perm", "smooth", "rot"),
                           (w_q, w_s, bias, *transform), strict=True):
            self.register_buffer(name, t)

    def forward(self, x):
        return torch.ops.clq.quant_linear.default(x, self.w_q, self.w_s, self.bias, *self.args,
                                          self.perm, self.smooth, self.rot, *self.tail)


def _lower(layer: torch.nn.Module, x: torch.Tensor, capability) -> tuple[fx.GraphModule,
                                                                          LowerToKernels]:
    gm = fx.symbolic_trace(layer)
    lowering = LowerToKernels([x], capability)
    return lowering(gm).gm, lowering


def _calls(gm: fx.GraphModule, namespace: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", None) == namespace]


def _values(gm: fx.GraphModule, flat: list[Any]) -> dict[str, Any]:
    """Every node's value, by name, in one run of ``gm`` on ``flat``."""
    run = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        run.run(*flat)
    return {n.name: v for n, v in run.env.items()}


def _kernel_codes(a: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A lowered ``clq_triton::quant_linear``'s activation codes (M, K) and scales: its
    quantize launch (``kernel_ops``) on its own arguments ``a``."""
    x = a["x"]
    dtype = torch.float32 if a["pro_fp32"] else x.dtype
    mul, add = (modulation_operand(a[n], x.shape, dtype) for n in ("pro_mul", "pro_add"))
    q, scale = rotate_quantize(
        x.reshape(-1, x.shape[-1]), a["perm"], a["smooth"], a["rot_tile"], a["a_bits"],
        a["a_group"], a["a_clip"], container=a["route"], prologue=a["prologue"],
        lzs_group=a["lzs_group"], rot_outer=a["rot_outer"], pro_mul=mul, pro_add=add,
        norm_eps=a["norm_eps"], pro_fp32=a["pro_fp32"])
    return kernel_ints(q, a["a_bits"], a["route"]), scale


def _check_lowered_ops(gm: fx.GraphModule, flat: list[Any], lowered: fx.GraphModule,
                       lowered_flat: list[Any] | None = None) -> None:
    """Each op of ``lowered`` (``gm`` lowered: its clq ops, in order, became clq_triton
    ops) against the clq op it replaced, both given the inputs that op received in one
    run of ``gm`` on ``flat`` (``lowered_flat``: the lowered graph's inputs, where it
    takes derived weights), so no op's rounding reaches the next: within the derived
    bounds of the op's reference (helpers: codes flip only at a rounding tie, output
    within the GEMM's summation error plus the flipped codes' effect). Every op's inputs
    come from the unlowered graph, so the check needs no luck about which CPU rounds
    which sum which way."""
    env = _values(gm, flat)
    ref, low = _calls(gm, "clq"), _calls(lowered, "clq_triton")
    assert len(ref) == len(low), (lowered_ops(gm), lowered_ops(lowered))
    replaced = {lo.name: r.name for lo, r in zip(low, ref, strict=True)}
    originals = {n.name: n.target for n in gm.graph.nodes}
    inputs = dict(zip([n.name for n in lowered.graph.find_nodes(op="placeholder")],
                      lowered_flat or flat, strict=True))

    def value(n: fx.Node) -> Any:
        if n.op == "placeholder":
            return inputs[n.name]
        if n.op == "get_attr":
            return fetch_attr(lowered, n.target)
        if n.name in replaced:
            return env[replaced[n.name]]
        if originals.get(n.name) == n.target:
            return env[n.name]
        return n.target(*fx.node.map_arg(n.args, value),  # made by the pass (a cat)
                        **fx.node.map_arg(n.kwargs, value))

    for lo, r in zip(low, ref, strict=True):
        a = {k: fx.node.map_arg(v, lambda n: env[n.name])
             for k, v in call_arguments(r).items()}
        b = {k: fx.node.map_arg(v, value) for k, v in call_arguments(lo).items()}
        assert b["x"] is a["x"], f"{lo.name} does not read {r.name}'s input"
        with torch.no_grad():
            y = lo.target(**b)
            if r.target == QUANT_LINEAR:
                codes = None if b["a_bits"] == 16 else _kernel_codes(b)
                assert_quant_linear_agrees(y, a, codes, r.name)
            else:
                assert_transform_agrees(y, a, r.name)


def _flat(qm: Any, kwargs: dict[str, Any]) -> list[Any]:
    """``qm``'s first graph's inputs for a call with ``kwargs``."""
    call, _ = qm.call_spec.normalize((), kwargs)
    return fx_pytree.tree_flatten_spec(((), dict(call)), qm.graph_module._in_spec)


# (w_bits, a_bits, a_group, w_group, dtype, rotation block, prologue, capability): packed
# W4A4 with a factored H128, grouped W4A8, weight-only with a transform, GELU prologue,
# and on a pretend sm_90 the int8 route (fp32) and the fp8 route (bf16).
_CASES = [
    (4, 4, 0, 0, torch.float32, 128, None, None),
    (4, 8, 64, 128, torch.float16, 64, None, None),
    (4, 16, 0, 0, torch.bfloat16, 32, None, None),
    (4, 4, 0, 0, torch.float32, 16, "gelu_tanh", None),
    (4, 4, 0, 0, torch.float32, 256, None, (9, 0)),
    (4, 4, 0, 0, torch.bfloat16, 128, "gelu", (9, 0)),
]


@pytest.mark.parametrize(("w_bits", "a_bits", "a_group", "w_group", "dtype", "b", "prologue",
                          "cap"), _CASES)
def test_lowered_layer_equals_the_eager_dispatch(w_bits, a_bits, a_group, w_group, dtype, b,
                                                 prologue, cap, device, caplog) -> None:
    k, n = 256, 48
    g = torch.Generator().manual_seed(b)
    x = integer_activation(7, k, dtype, seed=b).to(device)
    perm = torch.randperm(k, generator=g)
    smooth = 2.0 ** torch.randint(-2, 3, (k,), generator=g).float()
    rot = hadamard(b)
    w_q, w_s = quantize_weight(torch.randn(n, k, generator=g), w_bits, w_group)
    bias = torch.randn(n, generator=g).to(dtype)
    args = (w_bits, a_bits, a_group, 0.9)
    layer = _Layer(w_q, w_s, bias, args, (perm, smooth, rot), (prologue,)).to(device)
    with caplog.at_level(logging.WARNING):
        gm, lowering = _lower(layer, x, cap)
        route = dispatch.plan_linear(x, w_q, w_s, *args, capability=cap).route
        expected = dispatch.quant_linear_triton(x, *(t.to(device) for t in (w_q, w_s, bias)),
                                                *args, *(t.to(device) for t in (perm, smooth,
                                                                                  rot)),
                                                prologue, route=route)
        y = gm(x)
    assert "reference" not in caplog.text and not lowering.declined, caplog.text
    assert lowered_ops(gm) == {"clq_triton.quant_linear.default": 1}
    assert_equal(y.cpu(), expected.cpu(), f"lowered {route}")
    assert route == ("packed" if cap is None or a_bits == 16
                     else "fp8" if dtype == torch.bfloat16 else "int8")
    if b > 16:  # a Sylvester block above 16 runs factored: the constant is the 16x16 tile
        node = next(n for n in gm.graph.nodes if n.target == torch.ops.clq_triton.quant_linear
                    .default)
        tile = gm.get_buffer(node.args[6].target)
        assert tuple(tile.shape) == (16, 16) and node.args[7] == b // 16


@pytest.mark.parametrize(("a_bits", "dtype", "cap", "fp32"), [(4, torch.float32, None, False),
                                                             (4, torch.bfloat16, (9, 0), False),
                                                             (16, torch.float32, None, False),
                                                             (4, torch.bfloat16, None, True)])
def test_lowered_norm_prologue_equals_the_eager_dispatch(a_bits, dtype, cap, fp32,
                                                         device) -> None:
    """LayerNorm + adaLN modulation fused in (``FusePrologues``), the modulation operands
    arriving as graph inputs per sample: the lowered op passes them through and gives
    the eager dispatch's output exactly, and agrees with the reference within the derived
    bounds (the kernel's row statistics are another summation order, so a code may flip
    at a rounding tie: ``_check_lowered_ops``)."""
    b, t, k, n = 2, 5, 128, 48
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(b, t, k, generator=g) * 2 + 4).to(dtype).to(device)
    mod = torch.float32 if fp32 else dtype  # Wan: the prologue in fp32 on a bf16 x
    mul, add = ((torch.randn(b, 1, k, generator=g) * 0.3 + o).to(mod).to(device)
                for o in (1.0, 0.0))
    w_q, w_s = quantize_weight(torch.randn(n, k, generator=g), 4)

    class Norm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, v in (("w_q", w_q), ("w_s", w_s), ("rot", hadamard(64))):
                self.register_buffer(name, v)

        def forward(self, x, mul, add):
            return torch.ops.clq.quant_linear.default(
                x, self.w_q, self.w_s, None, 4, a_bits, 0, 1.0, None, None, self.rot,
                "layer_norm", pro_mul=mul, pro_add=add, norm_eps=1e-6, pro_fp32=fp32)

    layer = Norm().to(device)
    lowering = LowerToKernels([x, mul, add], cap)
    gm = lowering(fx.symbolic_trace(layer)).gm
    assert lowered_ops(gm) == {"clq_triton.quant_linear.default": 1}, lowering.declined
    expected = dispatch.quant_linear_triton(x, layer.w_q, layer.w_s, None, 4, a_bits, 0, 1.0,
                                            None, None, layer.rot, "layer_norm",
                                            pro_mul=mul, pro_add=add, norm_eps=1e-6,
                                            pro_fp32=fp32, route=dispatch.plan_linear(
                                                x, w_q, w_s, 4, a_bits, 0, 1.0,
                                                capability=cap).route)
    y = gm(x, mul, add)
    assert_equal(y.cpu(), expected.cpu(), "lowered norm prologue")
    _check_lowered_ops(fx.symbolic_trace(layer), [x, mul, add], gm)


@pytest.mark.parametrize("prologue", [None, "layer_norm"])
def test_lowered_transform_equals_the_eager_dispatch(prologue, device) -> None:
    """With the norm + adaLN prologue too (the transform CLPS's separate q/k/v clips keep
    in front of three quantizers), its operands per sample as buffers."""
    x = (random_activation(10, 128, torch.float32, seed=1) + 2).reshape(2, 5, 128).to(device)
    g = torch.Generator().manual_seed(2)
    mul, add = (torch.randn(2, 1, 128, generator=g) * 0.3 + o for o in (1.0, 0.0))
    mods = {} if prologue is None else {"pro_mul": mul, "pro_add": add}

    class T(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("rot", hadamard(64))
            for name, v in mods.items():
                self.register_buffer(name, v)

        def forward(self, x):
            kw = {name: getattr(self, name) for name in mods}
            return torch.ops.clq.transform.default(x, None, None, self.rot, prologue, **kw) * 2

    t = T().to(device)
    gm, lowering = _lower(t, x, None)
    assert lowered_ops(gm) == {"clq_triton.transform.default": 1}, lowering.declined
    kw = {name: getattr(t, name) for name in mods}
    assert_equal(gm(x).cpu(), 2 * dispatch.transform_triton(x, None, None, t.rot, prologue,
                                                            **kw).cpu(), "lowered transform")


def _declined_cases():
    k, n = 128, 16
    g = torch.Generator().manual_seed(5)
    w_q, w_s = quantize_weight(torch.randn(n, k, generator=g), 4)
    tw_q, table = twinlog_weight(torch.randn(n, k, generator=g))
    q, r = torch.linalg.qr(torch.randn(128, 128, generator=g))
    return [
        ("twinlog", _Layer(tw_q, table, None, (4, 4, 0, 1.0), tail=(None, "int", "twinlog")),
         "twinlog weights"),
        ("per-block rotation", _Layer(w_q, w_s, None, (4, 4, 0, 1.0),
                                      (None, None, orthogonal_blocks(4, 32, seed=5))),
         "per-block rotation (4, 32, 32)"),
        ("dense 128", _Layer(w_q, w_s, None, (4, 4, 0, 1.0), (None, None, q)),
         "is not the Sylvester Hadamard"),
    ]


@pytest.mark.parametrize(("what", "layer", "reason"), _declined_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_a_call_the_kernels_do_not_take_stays_a_clq_op(what, layer, reason, device,
                                                       caplog) -> None:
    """Declined with the reason (WARNING and ``declined``); the clq op still serves it, so
    the output is what it was."""
    x = random_activation(6, 128, torch.float32, seed=6).to(device)
    layer = layer.to(device)
    before = layer(x)
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        gm, lowering = _lower(layer, x, None)
    assert reason in caplog.text and reason in next(iter(lowering.declined.values()))
    assert lowered_ops(gm) == {"clq.quant_linear.default": 1}
    assert_equal(gm(x).cpu(), before.cpu(), what)


def _on(device, model, x):
    return model.to(device), {k: v.to(device) if isinstance(v, torch.Tensor) else v
                              for k, v in x.items()}


def test_backend_lowers_every_layer_and_matches_the_extern_ops(device):
    """torch.compile(backend="clq", kernels=True) on tiny PixArt (eager, no Inductor): all
    13 GEMMs (q/k/v merged) become clq_triton ops, each agreeing with the clq op it
    replaced on that op's inputs (``_check_lowered_ops``), and the kernels ran."""
    import torch._dynamo

    import clq_compile.backend as be
    from clq_compile.testing import tiny_pixart

    model, inputs = tiny_pixart()
    model, x = _on(device, model, inputs(2))
    outs = {}
    runs, keep = recording_backend()

    for kernels in (False, True):
        torch._dynamo.reset()
        with torch.no_grad():
            outs[kernels] = torch.compile(model, backend=keep, fullgraph=True, options={
                "recipe": "quarot", "bits": "w4a4", "inductor": False,
                "kernels": kernels})(**x)[0]
    torch._dynamo.reset()
    run, ex = runs[1]
    assert lowered_ops(run.lowered) == {"clq_triton.quant_linear.default": 13}
    inner, packers = be.split_packers(run.graph_module)  # the graph the pass lowered
    _check_lowered_ops(inner, [*ex, *(t for p, i in packers for t in p(ex[i]))], run.lowered)
    assert not torch.equal(outs[False], outs[True])  # the kernels did run


def test_runtime_weights_are_unpacked_outside_the_graph_and_follow_updates(device):
    """A pretend sm_90 at fp32 takes the int8 route: the packers' outputs (graph inputs)
    are unpacked by ``convert`` before each call, cached per packed tensor; the int8 route
    is bit-equal to the packed one, and an in-place weight change repacks and re-unpacks
    (each int8 op then agrees with its clq op on the new weight: ``_check_lowered_ops``)."""
    import torch._dynamo

    import clq_compile.backend as be
    from clq_compile.testing import tiny_pixart

    model, inputs = tiny_pixart()
    model, x = _on(device, model, inputs(2))
    runs, keep = recording_backend()

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=keep, fullgraph=True,
                      options={"bits": "w4a4", "inductor": False, "kernels": False})(**x)
    torch._dynamo.reset()
    run, ex = runs[0]
    inner, packers = be.split_packers(run.graph_module)

    def flat():
        return [*ex, *(t for p, i in packers for t in p(ex[i]))]

    packed, to_packed, _ = be.lower_inputs(inner, flat(), None)
    inner, packers = be.split_packers(run.graph_module)
    int8, to_int8, lowering = be.lower_inputs(inner, flat(), (9, 0))
    assert lowering.derive and set(r for _, r in lowering.derive.values()) == {"int8"}
    with torch.no_grad():
        assert torch.equal(packed(*to_packed(flat()))[0], int8(*to_int8(flat()))[0])
        lin = model.transformer_blocks[1].ff.net[2]
        w = next(t for t in ex if t is lin.weight)
        w.mul_(3.0)
        after = int8(*to_int8(flat()))[0]
        assert torch.equal(packed(*to_packed(flat()))[0], after)
    reference, _ = be.split_packers(run.graph_module)
    _check_lowered_ops(reference, flat(), int8, to_int8(flat()))


def test_quantized_model_runs_its_lowered_graph(device):
    """``qm.lower()`` (by itself on a GPU): forward runs the lowered copy of each graph,
    which shares the graph's tensors; the graph itself (what ``save`` writes) keeps its
    clq ops. Each lowered op agrees with its clq op on that op's inputs
    (``_check_lowered_ops``)."""
    import clq_compile as clq
    from clq_compile.testing import tiny_pixart

    model, inputs = tiny_pixart()
    model, x = _on(device, model, inputs(2))
    qm = clq.quantize(model, [x], recipe="quarot", bits="w4a4")
    assert all(g is None for g in qm.lowered) if device == "cpu" else all(qm.lowered)
    with torch.no_grad():
        before = qm(**x)[0]
    assert qm.lower(None if device == "cpu" else "device") == {}
    n = lowered_ops(qm.graph_module)["clq.quant_linear.default"]
    assert lowered_ops(qm.lowered[0]) == {"clq_triton.quant_linear.default": n}
    assert lowered_ops(qm.graph_module) == {"clq.quant_linear.default": n}
    graph, lowered = dict(qm.graph_module.named_buffers()), dict(qm.lowered[0].named_buffers())
    shared = [k for k in lowered if k in graph]  # the rest: rotation tiles it made
    assert shared and all(lowered[k] is graph[k] for k in shared)
    assert f"{n} of {n} GEMMs lowered to the Triton kernels" in clq.inspect(qm)
    _check_lowered_ops(qm.graph_module, _flat(qm, x), qm.lowered[0])
    with torch.no_grad():
        after = qm(**x)[0]
    if device == "cpu":
        assert not torch.equal(before, after)  # the kernels ran, not the references


@pytest.mark.skipif(not ON_GPU, reason="Inductor compiles the kernels only with a GPU "
                    "driver; on CPU test_lower_trace.py checks what Inductor receives")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_of_a_lowered_model_on_the_gpu(mode):
    """torch.compile(qm) and the clq backend on a GPU: Inductor compiles the clq_triton
    kernels (and under reduce-overhead replays them as a CUDA graph); against the eager
    lowered model only Inductor's own float reassociation around them moves the output
    (floor 30 dB: bf16, where one reordered sum can move a rounding and flip a 4-bit
    code)."""
    import torch._dynamo

    import clq_compile as clq
    from clq_compile.testing import tiny_pixart

    model, inputs = tiny_pixart()
    model, x = _on("cuda", model.to(torch.bfloat16), {
        k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
        else v for k, v in inputs(2).items()})
    qm = clq.quantize(model, [x], recipe="quarot", bits="w4a4")
    assert qm.declined == {} and all(qm.lowered)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = qm(**x)[0]
        compiled = torch.compile(qm, mode=mode)
        for _ in range(3):  # reduce-overhead records, then replays
            out = compiled(**x)[0]
        assert sqnr(eager, out) > 30.0
        torch._dynamo.reset()
        backend = torch.compile(model, backend="clq", fullgraph=True, options={
            "recipe": "quarot", "bits": "w4a4", "mode": mode})
        for _ in range(3):
            out = backend(**x)[0]
    torch._dynamo.reset()
    assert sqnr(eager, out) > 30.0


@pytest.mark.parametrize("name", ["dit", "sd3", "flux", "wan"])
def test_every_family_lowers_fully(name, device):
    """clq W4A4 on the other tiny families (PixArt above): every quantized GEMM and every
    standalone transform is lowered (none declined), each lowered op agrees with the clq
    op it replaced on that op's inputs (``_check_lowered_ops``), and the lowered graph
    runs end to end. No output-vs-output floor: see the module docstring."""
    import clq_compile as clq
    from clq_compile.testing import TINY_MODELS

    model, inputs = TINY_MODELS[name]()
    model, x = _on(device, model, inputs(0))
    calib = [x, _on(device, model, inputs(1))[1]]
    qm = clq.quantize(model, calib, recipe="clq", bits="w4a4", extra_shapes=None,
                      w_grid=(1.0, 0.9), a_grid=(1.0, 0.9), clps_samples=1)
    test = _on(device, model, inputs(5))[1]
    qm.lowered[0] = None  # on a GPU it lowered by itself: compare against the clq ops
    with torch.no_grad():
        before = qm(**test)[0]
    assert qm.lower(None if device == "cpu" else "device") == {}
    ops = lowered_ops(qm.lowered[0])
    assert set(ops) <= {"clq_triton.quant_linear.default", "clq_triton.transform.default"}
    assert ops["clq_triton.quant_linear.default"] == lowered_ops(qm.graph_module)[
        "clq.quant_linear.default"]
    _check_lowered_ops(qm.graph_module, _flat(qm, test), qm.lowered[0])
    with torch.no_grad():
        after = qm(**test)[0]
    assert after.shape == before.shape and torch.isfinite(after).all()


def test_a_weight_computed_in_the_graph_is_declined_before_anything_is_made(device):
    """The int8 route needs the weight unpacked once, outside the graph; a weight the graph
    computes is declined, and the check runs before the rotation's kernel tile or any
    unpacked copy is made (nothing left behind for a call that stays a clq op)."""
    class Computed(_Layer):
        def forward(self, x, w):  # the weight arrives as an input and the graph copies it
            return torch.ops.clq.quant_linear.default(x, w.clone(), self.w_s, None,
                                                      *self.args, None, None, self.rot)

    k = 128
    w_q, w_s = quantize_weight(torch.randn(16, k, generator=torch.Generator().manual_seed(7)),
                               4)
    layer = Computed(w_q, w_s, None, (4, 4, 0, 1.0), (None, None, hadamard(128))).to(device)
    x = random_activation(5, k, torch.float32, seed=7).to(device)
    gm = fx.symbolic_trace(layer)
    buffers = set(dict(gm.named_buffers()))
    lowering = LowerToKernels([x, w_q.to(device)], (9, 0))
    gm = lowering(gm).gm
    assert "computed in the graph" in next(iter(lowering.declined.values()))
    assert set(dict(gm.named_buffers())) == buffers  # no rotation tile was made
    assert not lowering.derive
    assert_equal(gm(x, w_q.to(device)).cpu(), layer(x, w_q.to(device)).cpu(), "declined")


@pytest.mark.parametrize("capability", ["cuda", (9,), (9.0, 0)])
def test_capability_option_is_checked(capability) -> None:
    from clq_compile.errors import ConfigError

    with pytest.raises(ConfigError, match="option capability="):
        LowerToKernels([], capability)
