"""``torch.compile(model, backend="clq")``: quantize the graph Dynamo hands us.

Two traps shape this file (see ecosystem.md §1):
- weights arrive as unguarded runtime inputs, so packed weights are computed at call
  time through a cache keyed on the weight tensor object and its ``_version``: an
  in-place update (LoRA fusing) or a new Parameter repacks instead of going stale;
- regional compilation reuses one graph for N identical blocks, each call passing other
  weights, which the same cache handles. Transforms are orthogonal/invertible and folded
  into whatever weight arrives, so the result stays exact in float for every block.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from clq_compile.annotations import annotated_linears, linear_info
from clq_compile.api import analyze, measure_layers
from clq_compile.calibration import GraphRunner, validate_calibration
from clq_compile.errors import CalibrationError
from clq_compile.passes.rewrite import QUANT_LINEAR, _insert_transform, drop_unused_attributes
from clq_compile.plan import LayerPlan, TransformPlan
from clq_compile.qlinear import pack_weight
from clq_compile.recipes import handler, resolve_recipe
from clq_compile.recipes.base import PlanContext
from clq_compile.spec import parse_bits

log = logging.getLogger(__name__)

_KEY = re.compile(r"\['([^']+)'\]")
_SIZE = re.compile(r"^(.*)\.size\(\)\[(\d+)\]$")


class WeightPacker(torch.nn.Module):
    """Packs whatever weight tensor arrives, once per (tensor object, version)."""

    def __init__(self, layer: LayerPlan, transform: TransformPlan | None) -> None:
        super().__init__()
        self.layer, self.transform = layer, transform
        self._cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.packs = 0  # how many times a weight was (re)packed; tests read it

    def forward(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._cache.get(w)
        if hit is not None and hit[0] == w._version and hit[1] == w.data_ptr():
            return hit[2]
        packed = pack_weight(w, self.layer, self.transform)
        self.packs += 1
        out = (packed.w_q.to(w.device), packed.w_scale.to(w.device))
        self._cache[w] = (w._version, w.data_ptr(), out)
        return out


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
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
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


def _rewrite(gm: fx.GraphModule, plan) -> None:
    graph = gm.graph
    transformed: dict[int, fx.Node] = {}
    for node in annotated_linears(gm):
        lp = plan.layers.get(linear_info(node).name)
        if lp is None or not lp.quantized:
            continue
        tp = plan.transform_of(lp)
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if tp is not None:
            if lp.group not in transformed:
                transformed[lp.group] = _insert_transform(gm, x, lp.group, tp)
            x = transformed[lp.group]
        name = f"clq_pack_{len(transformed)}_{re.sub(r'[^0-9a-zA-Z_]', '_', lp.name)}"
        gm.add_submodule(name, WeightPacker(lp, tp))
        with graph.inserting_before(node):
            packed = graph.call_module(name, (w,))
            w_q = graph.call_function(_getitem, (packed, 0))
            w_s = graph.call_function(_getitem, (packed, 1))
            spec = lp.spec
            new = graph.call_function(
                QUANT_LINEAR,
                (x, w_q, w_s, bias, spec.w_bits, spec.a_bits, spec.a_group, float(lp.a_clip)),
            )
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    drop_unused_attributes(gm)
    graph.lint()
    gm.recompile()


def _getitem(t: tuple, i: int) -> Any:
    return t[i]


def clq_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
):
    """Options: ``recipe``, ``bits``, ``calib`` (list of forward-kwargs dicts), plus the
    recipe's own options. Without ``calib`` only data-free decisions are made."""
    opts = dict(options or {})
    recipe = opts.pop("recipe", "rtn")
    bits = opts.pop("bits", "w4a4")
    calib = opts.pop("calib", None)
    config = resolve_recipe(recipe, **opts)
    spec = parse_bits(bits).with_groups(config.w_group or None, config.a_group or None)
    for node, ex in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs,
                        strict=True):
        if isinstance(ex, torch.Tensor):
            node.meta["clq_value"] = ex
    gm = analyze(gm, spec, config)
    flat = None
    if calib is not None:
        calls = [kw for _, kw in validate_calibration(None, calib)]
        flat = _flat_calib(gm, example_inputs, calls)
    if flat is None:
        if config.needs_calibration:
            raise CalibrationError(
                f"recipe {config.name!r} needs calibration inputs that match this graph; pass "
                "options={'calib': [forward kwargs, ...]} and compile the whole model"
            )
        flat = [list(example_inputs)]
    ctx = PlanContext(gm, spec, flat, GraphRunner(gm))
    plan = handler(config)(ctx, config)
    if calib is not None:
        measure_layers(ctx, plan)
    _rewrite(gm, plan)
    gm.meta["clq_plan"] = plan
    log.info("clq backend: %d/%d linears quantized (%s %s)", len(plan.quantized_layers()),
             len(plan.layers), config.name, spec.name)

    def run(*args: Any) -> Any:
        with torch.no_grad():
            return gm(*args)

    run.clq_plan = plan  # type: ignore[attr-defined]
    run.graph_module = gm  # type: ignore[attr-defined]
    return run
