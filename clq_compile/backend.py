"""``torch.compile(model, backend="clq")``: quantize the graph Dynamo hands us.

Two traps shape this file (see ecosystem.md §1):
- weights arrive as unguarded runtime inputs, so packed weights are computed at call
  time through a cache keyed on the weight tensor and a fingerprint of its content
  (``clq_compile.weight_cache``): any update (``.data +=`` of a LoRA fuse, a new
  Parameter, ``load_state_dict``) repacks instead of going stale;
- regional compilation reuses one graph for N identical blocks, each call passing other
  weights, which the same cache handles. Transforms are orthogonal/invertible and folded
  into whatever weight arrives, so the result stays exact in float for every block.

So the packing stays in Python, outside what Inductor compiles: the rewritten graph's
packers are cut off and their outputs become graph inputs (``split_packers``). On a GPU
the ``clq`` ops are then lowered to the ``clq_triton`` triton_ops (``lower_inputs``), so
Inductor compiles the Triton kernels with the rest (norms, modulation, attention); a
route's unpacked weight is made beside the packing, outside the graph. Each call packs
(cache hit: one fingerprint per weight) then runs the compiled graph.

Errors: Dynamo wraps whatever a backend raises while compiling in its own
``BackendCompilerFailed`` (and under ``torch._dynamo.config.suppress_errors`` runs the
frame eagerly, unquantized, instead), while an exception raised by the compiled callable
when it runs reaches the caller as it is. So ``clq_backend`` returns, for a clq error
(``ConfigError``, ``CalibrationError``, ``InputError``, ...), a callable that raises it:
the call that compiled raises the clq exception itself (``except clq.ConfigError``
catches it), as does every later call Dynamo routes to that cached graph; nothing runs
unquantized. ``compile_graph`` is the same compiler raising directly.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from clq_compile.build import build_plan, resolve
from clq_compile.calibration import as_calls
from clq_compile.errors import CalibrationError, ClqError, ConfigError, InputError
from clq_compile.lowering.triton.dispatch import triton_available
from clq_compile.lowering.triton.lower import LowerToKernels
from clq_compile.lowering.triton.routes import unpacked_weight
from clq_compile.passes.find_linears import fetch_attr
from clq_compile.passes.infra import PassManager
from clq_compile.passes.share_inputs import plan_passes
from clq_compile.weight_cache import CHECKS, WeightPacker, set_check

log = logging.getLogger(__name__)

_KEY = re.compile(r"\['([^']+)'\]")
_SIZE = re.compile(r"^(.*)\.size\(\)\[(\d+)\]$")


def _source(node: fx.Node) -> str:
    ga = node.meta.get("grapharg")
    return ga.source.name if ga is not None else ""


def _is_param(node: fx.Node) -> bool:
    src = _source(node)
    return "_parameters[" in src or "_buffers[" in src or src.startswith("L['self']")


def _lookup(call: dict[str, Any], source: str) -> Any:
    m = _SIZE.match(source)
    if m:
        return _lookup(call, m.group(1)).size()[int(m.group(2))]
    if not source.startswith("L["):
        raise KeyError(source)
    obj: Any = call
    for key in _KEY.findall(source):
        obj = obj[key]
    return obj


def _flat_calib(
    gm: fx.GraphModule, example_inputs: list[Any], calls: list[dict[str, Any]]
) -> list[list[Any]] | None:
    """Map model-level calibration calls onto this graph's placeholders by Dynamo source
    names; None when some input cannot be mapped (e.g. a regional block graph)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    flats = []
    for call in calls:
        flat = []
        for node, ex in zip(placeholders, example_inputs, strict=True):
            if _is_param(node):
                flat.append(ex)
                continue
            try:
                flat.append(_lookup(call, _source(node)))
            except (KeyError, IndexError, TypeError, AttributeError):
                log.warning("clq backend: graph input %s is not in the calibration calls; "
                            "using weight-only/dynamic statistics", _source(node) or node.name)
                return None
        flats.append(flat)
    return flats


def clq_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The ``torch_dynamo_backends`` entry point: ``compile_graph``, whose clq errors are
    raised by the returned callable when Dynamo runs it (module docstring: so that they
    reach the caller as themselves, not wrapped in ``BackendCompilerFailed``)."""
    try:
        return compile_graph(gm, example_inputs, options=options, mode=mode)
    except ClqError as err:
        return _raises(err)


def _raises(err: ClqError) -> Callable[..., Any]:
    tb = err.__traceback__

    def run(*args: Any) -> Any:
        raise err.with_traceback(tb)  # the compile-time traceback, not one grown per call

    return run


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Options: ``recipe``, ``bits``, ``calib`` (list of forward-kwargs dicts), plus the
    recipe's own options. Without ``calib`` only data-free decisions are made.
    ``inductor``: hand the rewritten graph to Inductor (default: when the graph's inputs
    are on a GPU); ``mode``: Inductor's mode (``"reduce-overhead"``: CUDA graphs), also
    accepted as ``torch.compile``'s own ``mode=`` argument. ``repack``: how a call knows a
    weight changed since it was packed: ``"content"`` (default; a fingerprint read of
    every weight per call) or ``"version"`` (same tensor, same ``_version``; no read and
    no GPU sync per call, for serving; ``.data`` writes such as a LoRA fuse go unseen).
    ``kernels``: lower the ``clq`` ops to the ``clq_triton`` triton_ops at compile time
    (``lowering.triton.lower``), so Inductor compiles the Triton kernels into its own code
    and no per-call dispatch runs (default: when the inputs are on a GPU and Triton is
    installed; ``False`` keeps the ops as extern calls)."""
    opts = dict(options or {})
    recipe = opts.pop("recipe", "rtn")
    bits = opts.pop("bits", "w4a4")
    calib = opts.pop("calib", None)
    mode = opts.pop("mode", mode)
    inductor = opts.pop("inductor", None)
    repack = opts.pop("repack", "content")
    kernels = opts.pop("kernels", None)
    if kernels not in (None, True, False):
        raise ConfigError(f"option kernels={kernels!r}; choose True, False or None (auto)")
    if repack not in CHECKS:
        raise ConfigError(f"option repack={repack!r}; choose one of {CHECKS}")
    if mode not in inductor_modes():
        raise ConfigError(f"option mode={mode!r}; choose one of {inductor_modes()}")
    if inductor not in (None, True, False):
        raise ConfigError(f"option inductor={inductor!r}; choose True, False or None (auto)")
    if inductor is False and mode not in (None, "default"):
        raise ConfigError(f"option mode={mode!r} is an Inductor mode; it needs inductor=True")
    config, spec = resolve(recipe, bits, **opts)
    solved = {f"weights={config.weights!r}": config.weights != "rtn",
              f"lowrank={config.lowrank}": bool(config.lowrank), "dac=True": config.dac,
              "dsq=True": config.dsq}
    what = next((k for k, on in solved.items() if on), None)
    if what is not None:
        raise ConfigError(
            f"option {what} is solved from the weights once; the clq backend re-packs "
            "whatever weight arrives at call time, so it only rounds to nearest, without a "
            f"low-rank branch, DAC biases or DSQ scales: use clq.quantize(...) for {what}")
    if config.timestep_bits is not None:
        raise ConfigError(
            f"option timestep_bits={config.timestep_bits} reads the timestep from the graph's "
            "inputs, and a graph torch.compile hands the backend may not hold it beside the "
            "blocks it drives (graph breaks split them): use clq.quantize(...) for it")
    refuse_grad(gm, example_inputs)
    for node, ex in zip(gm.graph.find_nodes(op="placeholder"), example_inputs, strict=True):
        if isinstance(ex, torch.Tensor):
            node.meta["clq_value"] = ex
    flat = None
    if calib is not None:
        calls = [kw for _, kw in as_calls(calib)]
        flat = _flat_calib(gm, example_inputs, calls)
    if flat is None:
        if config.calibrates:
            raise CalibrationError(
                f"{_calibrating(config)} needs calibration inputs that match this graph; "
                "pass options={'calib': [forward kwargs, ...]} and compile the whole model")
        flat = [list(example_inputs)]
    plan = build_plan(gm, spec, config, flat, measure=calib is not None)
    gm = PassManager(plan_passes(plan, weights="runtime"))(gm).gm
    set_check(gm, repack)
    gm.meta["clq_plan"] = plan
    log.info("clq backend: %d/%d linears quantized (%s %s)", len(plan.quantized_layers()),
             len(plan.layers), config.name, spec.name)

    on_gpu = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    if inductor is None:
        inductor = on_gpu
    if kernels is None:
        kernels = on_gpu and triton_available()[0]
    run = _compiled(gm, example_inputs, mode if inductor else False, kernels)
    run.clq_plan = plan  # type: ignore[attr-defined]
    run.graph_module = gm  # type: ignore[attr-defined]
    run.inductor = inductor  # type: ignore[attr-defined]
    return run


def _calibrating(config: Any) -> str:
    """What in ``config`` needs calibration: the recipe, else the budget (the other
    calibrating options are refused before)."""
    if not config.needs_calibration and config.budget:
        return f"option budget={config.budget}"
    return f"recipe {config.name!r}"


def _name(node: fx.Node) -> str:
    """A graph input as the user knows it: ``weight blocks.0.proj.weight``, ``input x``."""
    src = _source(node)
    keys = [k for k in _KEY.findall(src) if k not in ("_modules", "_parameters", "_buffers")]
    if _is_param(node):
        return f"weight {'.'.join(keys[1:]) or src}"
    return f"input {'.'.join(keys) or src or node.name}"


def refuse_grad(gm: fx.GraphModule, example_inputs: list[Any]) -> None:
    """The graph runs under ``no_grad`` (the clq ops have no autograd formula), so with
    grad mode on, an input or weight that requires grad would get an output without a
    ``grad_fn`` and a confusing error at ``backward()``: refused here, naming them."""
    if not torch.is_grad_enabled():
        return
    names = [_name(node) for node, ex in zip(gm.graph.find_nodes(op="placeholder"),
                                             example_inputs, strict=True)
             if isinstance(ex, torch.Tensor) and ex.requires_grad]
    if names:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise InputError(
            f"{names[0]}{more} requires grad, but the clq backend computes no gradient: its "
            "quantized ops are for inference. Run under torch.no_grad() or "
            "torch.inference_mode(), pass detached inputs, or freeze the weights "
            "(model.requires_grad_(False))")


def inductor_modes() -> tuple[str | None, ...]:
    from torch._inductor import list_mode_options

    return (None, *list_mode_options(None))


def split_packers(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[tuple[WeightPacker, int]]]:
    """A copy of ``gm`` whose weight packers are cut off: each packer's two outputs
    (w_q, w_scale) become new trailing inputs. Returns it and, in input order, each
    packer with the index of the weight input it packs."""
    graph = copy.deepcopy(gm.graph)
    inner = fx.GraphModule(gm, graph)  # shares gm's modules and tensors
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last, packers = placeholders[-1], []
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(inner.get_submodule(node.target),
                                                      WeightPacker):
            continue
        outs = []
        for i in range(2):
            with graph.inserting_after(last):
                last = graph.placeholder(f"{node.target}_{i}")
            outs.append(last)
        for user in list(node.users):
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
        packers.append((inner.get_submodule(node.target), placeholders.index(node.args[0])))
        graph.erase_node(node)
    graph.lint()
    inner.recompile()
    return inner, packers


def lower_inputs(
    inner: fx.GraphModule, example_inputs: list[Any], capability: Any = "device"
) -> tuple[fx.GraphModule, Callable[[list[Any]], list[Any]], LowerToKernels]:
    """Lower ``inner`` (packers already cut off) to the kernels; returns it, the function
    that turns each call's inputs into the lowered graph's (packed weights a route needs
    unpacked are converted, cached per packed tensor) and the pass (its ``declined``)."""
    lowering = LowerToKernels(example_inputs, capability)
    inner = lowering(inner).gm
    derive = dict(lowering.derive)

    def convert(flat: list[Any]) -> list[Any]:
        for i, (w_bits, route) in derive.items():
            flat[i] = unpacked_weight(flat[i], w_bits, route)
        return flat

    return inner, convert, lowering


def static_weights(inner: fx.GraphModule, gm: fx.GraphModule
                   ) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """A copy of ``inner`` that Inductor's CUDA graphs treat like the Dynamo graph it came
    from: weights stay where they are instead of being copied into graph-owned memory on
    every replay. Cut from Dynamo's graph, ``inner`` lost what marks them (torch's aot
    frontend, Note [Assumption on Dynamo Metadata]: ``dynamo_compile_id``,
    ``_param_name_to_source``, each placeholder's ``_dynamo_source``), so with none of its
    inputs static, reduce-overhead copied every weight per call. Here the original inputs
    get their sources back, the packers' outputs (cached: same tensor while the weight is)
    are marked static, and the graph's constants become static inputs too (the returned
    tensors, passed after the others). A graph not from Dynamo is returned as it is."""
    if "dynamo_compile_id" not in gm.meta:
        return inner, []
    graph = copy.deepcopy(inner.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last, consts, lifted = placeholders[-1], [], {}
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        if node.target not in lifted:  # one input per constant, however many read it
            with graph.inserting_after(last):
                last = lifted[node.target] = graph.placeholder(f"{node.target}_const")
            consts.append(fetch_attr(inner, node.target))
            placeholders.append(last)
        node.replace_all_uses_with(lifted[node.target])
        graph.erase_node(node)
    out = fx.GraphModule(torch.nn.Module(), graph)  # no attributes left: nothing to lift
    sources = [getattr(n, "_dynamo_source", None)
               for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        node._dynamo_source = sources[i] if i < len(sources) else None
        if i >= len(sources):
            node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    out.meta["dynamo_compile_id"] = gm.meta["dynamo_compile_id"]
    out._param_name_to_source = {}
    return out, consts


def _compiled(gm: fx.GraphModule, example_inputs: list[Any], mode: str | None | bool,
              kernels: bool) -> Callable[..., Any]:
    """Run ``gm`` eagerly (``mode`` False) or through Inductor; packing stays outside."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    inner, packers = split_packers(gm)

    def flat(args: list[Any] | tuple[Any, ...]) -> list[Any]:
        return [*args, *(t for packer, i in packers for t in packer(args[i]))]

    convert: Callable[[list[Any]], list[Any]] = list
    declined: dict[str, str] = {}
    if kernels:
        inner, convert, lowering = lower_inputs(inner, flat(example_inputs))
        declined = lowering.declined
    consts: list[torch.Tensor] = []
    if mode is False:
        compiled: Callable[..., Any] = inner
    else:
        graph, consts = static_weights(inner, gm)
        with torch.no_grad():  # an inference graph: the clq ops have no autograd formula
            compiled = compile_fx(graph, [*convert(flat(example_inputs)), *consts],
                                  config_patches=list_mode_options(mode or "default"))

    def run(*args: Any) -> Any:
        with torch.no_grad():
            return compiled(*convert(flat(args)), *consts)

    run.lowered = inner if kernels else None  # type: ignore[attr-defined]
    run.declined = declined  # type: ignore[attr-defined]
    return run
