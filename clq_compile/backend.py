"""``torch.compile(model, backend="clq")``: quantize the graph Dynamo hands us.

Two traps shape this file (see ecosystem.md §1):
- weights arrive as unguarded runtime inputs, so packed weights are computed at call
  time through a cache keyed on the weight tensor and a fingerprint of its content
  (``clq_compile.weight_cache``): any update (``.data +=`` of a LoRA fuse, a new
  Parameter, ``load_state_dict``) repacks instead of going stale;
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

from clq_compile.build import build_plan, resolve
from clq_compile.calibration import as_calls
from clq_compile.errors import CalibrationError, ConfigError
from clq_compile.passes.infra import PassManager
from clq_compile.passes.rewrite import RewriteLinears

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
    config, spec = resolve(recipe, bits, **opts)
    if config.weights != "rtn" or config.lowrank:
        what = f"weights={config.weights!r}" if config.weights != "rtn" else \
            f"lowrank={config.lowrank}"
        raise ConfigError(
            f"option {what} is solved from the weights once; the clq backend re-packs "
            "whatever weight arrives at call time, so it only rounds to nearest without a "
            "low-rank branch: use clq.quantize(...) for weights='gptq' and lowrank")
    for node, ex in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs,
                        strict=True):
        if isinstance(ex, torch.Tensor):
            node.meta["clq_value"] = ex
    flat = None
    if calib is not None:
        calls = [kw for _, kw in as_calls(calib)]
        flat = _flat_calib(gm, example_inputs, calls)
    if flat is None:
        if config.calibrates:
            raise CalibrationError(
                f"recipe {config.name!r} needs calibration inputs that match this graph; pass "
                "options={'calib': [forward kwargs, ...]} and compile the whole model"
            )
        flat = [list(example_inputs)]
    plan = build_plan(gm, spec, config, flat, measure=calib is not None)
    gm = PassManager([RewriteLinears(plan, weights="runtime")])(gm).gm
    gm.meta["clq_plan"] = plan
    log.info("clq backend: %d/%d linears quantized (%s %s)", len(plan.quantized_layers()),
             len(plan.layers), config.name, spec.name)

    def run(*args: Any) -> Any:
        with torch.no_grad():
            return gm(*args)

    run.clq_plan = plan  # type: ignore[attr-defined]
    run.graph_module = gm  # type: ignore[attr-defined]
    return run
