"""The front door: ``quantize`` (bind calls → capture → analyze → plan → rewrite)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.fx as fx

from clq_compile.build import build_plan, resolve
from clq_compile.calibration import bind_calls, check_calls, check_guards, flatten_calls
from clq_compile.capture import Captured, capture, own_tensors
from clq_compile.errors import CaptureError, QuantizationError
from clq_compile.model import QuantizedModel
from clq_compile.passes.infra import PassManager
from clq_compile.passes.rewrite import RewriteLinears
from clq_compile.plan import Plan
from clq_compile.recipes.base import RecipeConfig
from clq_compile.signature import params_of
from clq_compile.spec import QuantSpec

log = logging.getLogger(__name__)


def _model_device(model: torch.nn.Module) -> torch.device | None:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise QuantizationError(
                f"{type(model).__name__}.{name} is on the meta device and holds no values: "
                "load the weights first (e.g. load_state_dict(..., assign=True) or "
                "from_pretrained)")
        return t.device
    return None


def capture_calls(model: torch.nn.Module, calib: Any,
                  dynamic_shapes: Any = None) -> tuple[Captured, list[dict[str, Any]]]:
    """Bind every call to ``model.forward``, capture the first, check all against the graph."""
    try:
        params = params_of(model.forward)
    except TypeError as e:
        raise CaptureError(f"{type(model).__name__}.{e}") from None
    calls = bind_calls(params, calib, type(model).__name__, _model_device(model))
    captured = capture(model, params, calls[0], dynamic_shapes)
    calls = check_calls(captured.call_spec, calls)
    check_guards(captured.gm, captured.call_spec, calls)
    return captured, calls


def plan_model(model: torch.nn.Module, calib: Any, recipe: str | RecipeConfig = "rtn",
               bits: str | QuantSpec = "w4a4", dynamic_shapes: Any = None,
               **options: Any) -> tuple[fx.GraphModule, Plan]:
    """Capture, analyze and plan without rewriting: the analyzed graph and its Plan."""
    config, spec = resolve(recipe, bits, **options)
    was_training = model.training
    model.eval()
    try:
        captured, calls = capture_calls(model, calib, dynamic_shapes)
        gm = captured.gm
        plan = build_plan(gm, spec, config, flatten_calls(gm, calls), measure=False)
    finally:
        model.train(was_training)
    return gm, plan


def quantize(
    model: torch.nn.Module,
    calib: Any,
    recipe: str | RecipeConfig = "rtn",
    bits: str | QuantSpec = "w4a4",
    dynamic_shapes: Any = None,
    measure: bool = True,
    **options: Any,
) -> QuantizedModel:
    """Quantize ``model`` through graph passes. ``calib``: an iterable of forward calls
    (dicts of keyword arguments or tuples of positional ones), e.g. recorded with
    ``clq.record_calls``. The model is left as it was (its weights, its training flag)."""
    t0 = time.perf_counter()
    config, spec = resolve(recipe, bits, **options)
    was_training = model.training
    model.eval()
    try:
        captured, calls = capture_calls(model, calib, dynamic_shapes)
        t1 = time.perf_counter()
        gm = captured.gm
        plan = build_plan(gm, spec, config, flatten_calls(gm, calls), measure=measure)
        gm = PassManager([RewriteLinears(plan, weights="packed")])(gm).gm
        own_tensors(gm)
    finally:
        model.train(was_training)
    plan.meta.update(capture_s=round(t1 - t0, 3), total_s=round(time.perf_counter() - t0, 3))
    log.info("quantized %d/%d linears with %s %s", len(plan.quantized_layers()),
             len(plan.layers), config.name, spec.name)
    cls = type(model)
    return QuantizedModel(
        gm, plan, captured.call_spec, captured.example, captured.dynamic_shapes,
        config=_config_of(model),
        fp_weight_bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        source={"class": f"{cls.__module__}.{cls.__qualname__}"},
    )


def _config_of(model: torch.nn.Module) -> dict[str, Any] | None:
    """A diffusers/transformers model's config as a plain dict (pipelines read it)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    try:
        return dict(cfg)
    except (TypeError, ValueError):
        return None


__all__ = ["QuantizedModel", "plan_model", "quantize"]
