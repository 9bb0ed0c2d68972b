"""``export_onnx``: a QuantizedModel's graph → an opset-21 ONNX file for onnxruntime.

The clq ops are lowered through torch.onnx's ``custom_translation_table`` (the torchlib
``quantized_decomposed`` translations would drop the int4 range); everything else
(attention, norms, adaLN, embeddings) goes through torchlib in float32. torch.onnx's own
optimizer is replaced by the same onnxscript optimizer told not to fold ``Cast`` of INT4
weights, so "ort-cpu" files keep 4-bit weights whatever their size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnxscript.optimizer
import torch
import torch.utils._pytree as pytree

from clq_compile.atomic import atomic_file
from clq_compile.capture import EXPORT_LOCK
from clq_compile.errors import CaptureError, ConfigError

from . import ort_cpu, qdq, torchlib_fixes
from .errors import OnnxExportError
from .session import INPUT_PATHS_KEY, PARAMS_KEY
from .transform import transform
from .weights import WeightTable, quant_linear_translation

log = logging.getLogger(__name__)

TARGETS = {"qdq": qdq.qdq_linear, "ort-cpu": ort_cpu.ort_cpu_linear}
MIN_OPSET = 21  # INT4 and blocked QuantizeLinear/DequantizeLinear
IR_VERSION = 10  # the IR version that introduced INT4
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with headroom


def export_onnx(
    qm: Any,
    path: str | os.PathLike,
    target: str = "qdq",
    opset: int = 21,
) -> Path:
    """Write ``qm`` (a ``clq.QuantizedModel``, or anything with ``exported_program()``)
    as ONNX and return the path. The file has the graph's dynamic axes (batch, and the
    token counts the model lets vary). It is written under a temporary name and renamed
    when complete, so a failed write leaves a previous file intact.

    ``target="qdq"``: portable INT4/INT8 QuantizeLinear/DequantizeLinear, exact against the
    reference up to float32 rounding. ``target="ort-cpu"``: integer MatMulInteger /
    MatMulNBits forms that ORT's CPU EP runs fast, same arithmetic. Run either with
    ``clq_compile.lowering.onnx.ort_session`` (it sets the options exactness needs).
    """
    if not callable(getattr(qm, "exported_program", None)):
        raise TypeError(f"clq.export_onnx takes a QuantizedModel (what clq.quantize or "
                        f"clq.load returns), got {type(qm).__name__}: quantize it first")
    if target not in TARGETS:
        raise ConfigError(f"unknown ONNX target {target!r}; choose one of {sorted(TARGETS)}")
    if opset < MIN_OPSET:
        raise ConfigError(f"INT4 Q/DQ needs opset >= {MIN_OPSET}, got {opset}")
    ep = _capture(qm)
    weights = WeightTable.from_exported_program(ep)
    table = {
        **torchlib_fixes.TRANSLATIONS,
        torch.ops.clq.quant_linear.default: quant_linear_translation(weights, TARGETS[target],
                                                                     qdq.qdq_linear),
        torch.ops.clq.transform.default: transform,
    }
    try:
        # run_decompositions switches oneDNN off process-wide, as export does
        with EXPORT_LOCK, _quiet_registry():
            program = torch.onnx.export(
                ep, dynamo=True, opset_version=opset, custom_translation_table=table,
                optimize=False, verbose=False,
            )
    except OnnxExportError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.onnx raises several unrelated types
        op = _failed_op(e)
        raise OnnxExportError(
            f"torch.onnx could not translate {op or 'the graph'} to ONNX opset {opset}: "
            f"{_root_cause(e)}",
            op=op,
        ) from e
    model = program.model
    _optimize(model)
    model.ir_version = IR_VERSION
    model.metadata_props[INPUT_PATHS_KEY] = json.dumps(_input_paths(ep, model))
    model.metadata_props["clq.target"] = target
    spec = getattr(qm, "call_spec", None)
    if spec is not None:
        model.metadata_props[PARAMS_KEY] = json.dumps(
            [p.name for p in spec.params if p.kind == "positional"])
    path = Path(path)
    with atomic_file(path) as tmp:
        # External data (models over 2 GB) is written beside, under the final data name.
        ir.save(model, tmp, external_data=_external_name(model, path))
    counts = Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph)
    log.info("wrote %s (%s, opset %d): %s", path, target, opset, dict(counts))
    return path


@contextlib.contextmanager
def _quiet_registry() -> Iterator[None]:
    """torch.onnx warns that it cannot infer ONNX signatures for traced custom
    translations (and that torchvision is absent); both are expected here."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _capture(qm: Any) -> torch.export.ExportedProgram:
    try:
        return qm.exported_program()
    except CaptureError as e:
        e = e.__cause__ or e
        op = _failed_op(e)
        raise OnnxExportError(
            f"torch.export could not re-capture the quantized graph"
            f"{f' at {op}' if op else ''}: {_root_cause(e)}",
            op=op,
        ) from e


def _keeps_int4(node: ir.Node) -> bool | None:
    """Constant folding veto: never materialize an op on INT4 weights (a Cast to INT8
    would double the file); None defers to the optimizer's own rules."""
    if any(v is not None and v.dtype == ir.DataType.INT4 for v in node.inputs):
        return False
    return None


def _optimize(model: ir.Model) -> None:
    """torch.onnx's default optimization (constant folding, CSE, which merges the
    quantizers of q/k/v reading one tensor, constants lifted to initializers) with the
    INT4 folding veto."""
    onnxscript.optimizer.optimize_ir(model, should_fold=_keeps_int4)


def _input_paths(ep: torch.export.ExportedProgram, model: ir.Model) -> dict[str, str]:
    """Graph input name → pytree key path in the ``(args, kwargs)`` call."""
    spec = ep.call_spec.in_spec
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths = {i: pytree.keystr(p) for p, i in pytree.tree_flatten_with_path(tree)[0]}
    user = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    by_name = {s.arg.name: paths[i] for i, s in enumerate(user)}
    return {v.name: by_name[v.name] for v in model.graph.inputs if v.name in by_name}


def _external_name(model: ir.Model, path: Path) -> str | None:
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)
    return f"{path.name}.data" if size > _EXTERNAL_DATA_BYTES else None


_TARGET_RE = re.compile(r"target=([\w.:]+)")
_OP_RE = re.compile(r"\b(aten\.[\w.]+|torch\.ops\.[\w.]+|clq\.[\w.]+)")


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _failed_op(e: BaseException) -> str | None:
    """The FX target named in torch.onnx's 'Error when translating node ...' (or the
    first aten/clq op any error in the chain mentions)."""
    for err in _chain(e):
        m = _TARGET_RE.search(str(err))
        if m:
            return m.group(1)
    for err in _chain(e):
        m = _OP_RE.search(str(err))
        if m:
            return m.group(1)
    return None


def _root_cause(e: BaseException) -> str:
    root = _chain(e)[-1]
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0] if text else ''}"
