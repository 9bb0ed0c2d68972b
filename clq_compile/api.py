"""The front door: ``quantize`` (bind calls → capture → analyze → plan → rewrite)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.fx as fx

from clq_compile.build import analyze, build_plan, resolve
from clq_compile.calibration import bind_calls, flatten_calls
from clq_compile.capture import Captured, capture, grown_call, own_tensors, share_tensors
from clq_compile.checkpoint import Checkpoint, materialize, open_checkpoint
from clq_compile.errors import CalibrationError, CaptureError, ConfigError, QuantizationError
from clq_compile.model import QuantizedModel
from clq_compile.options import boolean, canonical
from clq_compile.passes.infra import PassManager
from clq_compile.passes.share_inputs import plan_passes
from clq_compile.plan import Plan
from clq_compile.recipes.base import RecipeConfig
from clq_compile.shard import Shard
from clq_compile.signature import Param, params_of
from clq_compile.spec import QuantSpec

log = logging.getLogger(__name__)


def _model_device(model: torch.nn.Module, checkpoint: Checkpoint | None = None
                  ) -> torch.device | None:
    """Where the model's tensors live (calibration inputs go there); meta tensors are
    allowed only when a checkpoint holds their values (they are read on the CPU)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if t.device.type == "meta" and checkpoint is None:
            raise QuantizationError(
                f"{type(model).__name__}.{name} is on the meta device and holds no values: "
                "load the weights first (e.g. load_state_dict(..., assign=True) or "
                "from_pretrained), or pass checkpoint=... to read them block by block")
    real = [t for _, t in tensors if t.device.type != "meta"]
    if checkpoint is not None:
        if any(t.device.type != "cpu" for t in real):
            raise ConfigError("option checkpoint: reads weights on the CPU; the model's "
                              "other tensors are on " + str(real[0].device))
        return torch.device("cpu")
    return real[0].device if real else None


def _params(model: torch.nn.Module) -> list[Param]:
    try:
        return params_of(model.forward)
    except TypeError as e:
        raise CaptureError(f"{type(model).__name__}.{e}") from None


def _graph_for(graphs: list[Captured], call: dict[str, Any]) -> int | None:
    return next((i for i, g in enumerate(graphs) if g.rejects(call) is None), None)


def _check_dynamic_shapes(dynamic_shapes: Any, call: dict[str, Any]) -> None:
    """torch.export takes a keyword call's dynamic shapes as a dict by argument name; any
    other form fails deep inside it, with a message that does not name the option."""
    if dynamic_shapes is None:
        return
    if not isinstance(dynamic_shapes, dict):
        raise ConfigError(f"option dynamic_shapes={dynamic_shapes!r} is not allowed: expected "
                          "None (every size the model lets vary stays dynamic) or a dict "
                          "from forward argument names to torch.export dynamic shapes")
    unknown = sorted(set(dynamic_shapes) - set(call))
    if unknown:
        raise ConfigError(f"option dynamic_shapes names {unknown}, which the calibration "
                          f"calls do not pass; they pass {sorted(call)}")


def capture_calls(model: torch.nn.Module, calib: Any, dynamic_shapes: Any = None,
                  checkpoint: Checkpoint | None = None
                  ) -> tuple[list[Captured], list[dict[str, Any]]]:
    """Bind every call to ``model.forward`` and capture graphs for them: the first call's
    graph, plus one per size the model specializes on that a later call has (a
    resolution its positional embedding was built for). Returns the graphs and the calls
    the first graph takes (the calibration set); a call no graph could take for reasons
    other than sizes (dtype, structure, constants) raises ``CalibrationError``."""
    params = _params(model)
    calls = bind_calls(params, calib, type(model).__name__, _model_device(model, checkpoint))
    _check_dynamic_shapes(dynamic_shapes, calls[0])
    graphs = [capture(model, params, calls[0], dynamic_shapes, checkpoint=checkpoint)]
    first = graphs[0].call_spec
    kept = []
    for i, raw in enumerate(calls):
        call, _ = first.normalize((), raw)
        layout = first.problems(call, sizes=False)
        if layout:
            raise CalibrationError(f"calibration call {i}: " + "; ".join(layout))
        g = _graph_for(graphs, call)
        if g is None:  # another size: the model may specialize on it (another graph)
            why = graphs[0].rejects(call)
            try:
                graphs.append(capture(model, params, raw, dynamic_shapes, like=graphs[0],
                                      checkpoint=checkpoint))
            except Exception as e:  # noqa: BLE001 - the model cannot take this call at all
                raise CalibrationError(f"calibration call {i}: {why}") from e
            log.info("calibration call %d needs another graph (%s)", i, why)
            g = len(graphs) - 1
        if g == 0:
            kept.append(call)
    if len(kept) < len(calls):
        log.warning("calibrating on the %d of %d calls the first graph takes (%s); the "
                    "other sizes run through %d more graph(s) from the same plan",
                    len(kept), len(calls), graphs[0].sizes(), len(graphs) - 1)
    return graphs, kept


def _extra_graphs(model: torch.nn.Module, graphs: list[Captured], extra_shapes: Any,
                  checkpoint: Checkpoint | None = None) -> list[Captured]:
    """Graphs for ``extra_shapes``: calls at other sizes, or "auto" (probe every dynamic
    size doubled; capture it only if the model specializes on the captured size)."""
    if extra_shapes is None:
        return []
    params = _params(model)
    if canonical(extra_shapes) == "auto":
        probe = grown_call(graphs[0])
        if probe is None or _graph_for(graphs, probe) is not None:
            return []
        try:
            extra = capture(model, params, probe, graphs[0].dynamic_shapes, like=graphs[0],
                            checkpoint=checkpoint)
        except CaptureError as e:  # the model cannot run at doubled sizes: nothing to add
            log.info("no graph for other sizes: %s", e)
            return []
        log.info("the model specializes on %s: a second graph takes other sizes",
                 graphs[0].sizes())
        return [extra]
    if isinstance(extra_shapes, str):
        raise ConfigError(f"option extra_shapes={extra_shapes!r} is not allowed: expected "
                          "'auto', None or a list of calls at other sizes")
    out: list[Captured] = []
    for call in bind_calls(params, extra_shapes, type(model).__name__):
        if _graph_for(graphs + out, graphs[0].call_spec.normalize((), call)[0]) is None:
            out.append(capture(model, params, call, graphs[0].dynamic_shapes, like=graphs[0],
                               checkpoint=checkpoint))
    return out


def plan_model(model: torch.nn.Module, calib: Any, recipe: str | RecipeConfig = "rtn",
               bits: str | QuantSpec = "w4a4", dynamic_shapes: Any = None,
               checkpoint: Any = None, max_weight_bytes: int | None = None,
               measure: bool = False, **options: Any) -> tuple[fx.GraphModule, Plan]:
    """Capture, analyze and plan without rewriting: the analyzed graph and its Plan."""
    config, spec = resolve(recipe, bits, **options)
    measure = boolean("measure", measure)
    ckpt = open_checkpoint(model, checkpoint, max_weight_bytes)
    graphs, calls = capture_calls(model, calib, dynamic_shapes, ckpt)
    gm = graphs[0].gm
    plan = build_plan(gm, spec, config, flatten_calls(gm, calls), measure=measure)
    if ckpt is not None:
        plan.meta["checkpoint"] = ckpt.stats()
    return gm, plan


def quantize(
    model: torch.nn.Module,
    calib: Any,
    recipe: str | RecipeConfig = "rtn",
    bits: str | QuantSpec = "w4a4",
    dynamic_shapes: Any = None,
    measure: bool = True,
    extra_shapes: Any = "auto",
    distributed: bool = False,
    checkpoint: Any = None,
    max_weight_bytes: int | None = None,
    **options: Any,
) -> QuantizedModel:
    """Quantize ``model`` through graph passes.

    ``calib``: an iterable of forward calls (dicts of keyword arguments or tuples of
    positional ones), e.g. recorded with ``clq.record_calls``. Batch and every size the
    model lets vary stay dynamic. ``extra_shapes``: calls at sizes the model specializes on
    (e.g. other resolutions of a DiT whose positional embedding is built for one), each
    getting its own graph from the same plan; "auto" probes doubled sizes; None: none.
    The model is left as it was (its weights, its training flag). ``distributed``: split
    the per-layer calibration work over the ranks of the initialized ``torch.distributed``
    process group; every rank calls this with the same model and calibration set and gets
    the plan one process would build. ``checkpoint``: a safetensors file, a folder of them
    or a list, holding the values of the model's meta-device tensors (a model built
    without weights); they are read block by block as calibration reaches them, keeping
    at most ``max_weight_bytes`` (default: the largest block's) between reads.
    """
    t0 = time.perf_counter()
    config, spec = resolve(recipe, bits, **options)
    measure = boolean("measure", measure)
    shard = Shard.requested(distributed)
    ckpt = open_checkpoint(model, checkpoint, max_weight_bytes)
    # The model itself is never changed (capture works on a copy of its module tree, in
    # eval mode), so other threads may call or quantize it meanwhile.
    graphs, calls = capture_calls(model, calib, dynamic_shapes, ckpt)
    graphs += _extra_graphs(model, graphs, extra_shapes, ckpt)
    t1 = time.perf_counter()
    gm = graphs[0].gm
    plan = build_plan(gm, spec, config, flatten_calls(gm, calls), measure=measure,
                      shard=shard)
    for i, g in enumerate(graphs):
        if i:
            analyze(g.gm, spec, config)
        g.gm = PassManager(plan_passes(plan, weights="packed"))(g.gm).gm
        materialize(g.gm)
        own_tensors(g.gm)
        if i:
            share_tensors(g.gm, graphs[0].gm)
    plan.meta.update(capture_s=round(t1 - t0, 3), total_s=round(time.perf_counter() - t0, 3),
                     graphs=len(graphs))
    if ckpt is not None:
        plan.meta["checkpoint"] = ckpt.stats()
    log.info("quantized %d/%d linears with %s %s", len(plan.quantized_layers()),
             len(plan.layers), config.name, spec.name)
    cls = type(model)
    return QuantizedModel(
        graphs, plan, config=_config_of(model),
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


__all__ = ["QuantizedModel", "capture_calls", "plan_model", "quantize"]
