"""Capture: torch.export (non-strict) of one keyword call, every size dynamic that the
model lets vary, parameters lifted.

The unlifted module (``ep.module()``) is what passes rewrite: weights are ``get_attr``
constants, user inputs are placeholders, and the pytree in/out specs keep the call layout
(nested dicts, output tuples). Each dim of each tensor input is ``Dim.AUTO``: export keeps
it symbolic unless the model's code fixes it (channels, or a resolution a positional
embedding is built for), so batch, caption length, frames and, where the model allows,
resolution stay dynamic. A batch of 1 would be specialized (export's 0/1 rule), so a
batch-1 example is captured at batch 2, after checking that the doubled call really
behaves as two copies of the batch.

Threads. torch.export (non-strict) swaps fake tensors into the parameter and buffer
tables of the module it traces, and turns oneDNN, NNPACK and cuDNN off for the whole
process while it traces. So export traces a structural copy (:func:`shadow`: new module
objects, the same tensors), never the caller's module, and every export holds
:data:`EXPORT_LOCK` exclusively while the library's own computations (a quantized model's
calls, calibration) hold it shared: they never overlap an export, so they round the same
as in a single thread.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.fx import _pytree as fx_pytree
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils._sympy.numbers import int_oo

from clq_compile.checkpoint import Checkpoint, attach, stand_ins
from clq_compile.digest import content_key
from clq_compile.errors import CaptureError, QuantizationError
from clq_compile.passes.find_linears import fetch_attr, set_attr
from clq_compile.signature import (
    RETURN_DICT,
    CallSpec,
    ConstSpec,
    Param,
    TensorSpec,
    keyname,
    output_spec,
)

log = logging.getLogger(__name__)

class ExportLock:
    """Exclusive for exports (``with EXPORT_LOCK:``, reentrant), shared for computations
    that must not overlap one (``with EXPORT_LOCK.shared():``, reentrant, many threads at
    once). torch.export is not thread-safe (two concurrent exports corrupt each other's
    state), and while it traces it turns oneDNN, NNPACK and cuDNN off process-wide
    (``torch.export._trace._ignore_backend_decomps``): a convolution run meanwhile in
    another thread takes another kernel and rounds differently. A waiting export goes
    before new shared holders, so a busy server cannot starve a quantize. The exporting
    thread may take the shared side (a quantized model traced inside another model)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owner: int | None = None  # the exporting thread
        self._depth = 0  # its nested exclusive holds
        self._shared = 0  # shared holds, all threads
        self._waiting = 0  # exports waiting
        self._mine = threading.local()  # this thread's shared holds

    def _held_here(self) -> int:
        return getattr(self._mine, "n", 0)

    def __enter__(self) -> ExportLock:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                self._waiting += 1
                try:
                    self._cond.wait_for(lambda: self._owner is None
                                        and self._shared == self._held_here())
                finally:
                    self._waiting -= 1
                    self._cond.notify_all()
                self._owner = me
            self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def shared(self) -> contextlib.AbstractContextManager:
        """The shared side; nothing while dynamo traces (it cannot enter a lock: calls of
        a ``torch.compile``-d quantized model are not held apart from exports). Not
        ``torch.compiler.is_compiling()``: export sets that flag for every thread."""
        if torch.compiler.is_dynamo_compiling():
            return contextlib.nullcontext()
        return self._shared_hold()

    @contextlib.contextmanager
    def _shared_hold(self) -> Iterator[None]:
        held = self._held_here()
        with self._cond:
            if not held and self._owner != threading.get_ident():
                self._cond.wait_for(lambda: self._owner is None and not self._waiting)
            self._shared += 1
        self._mine.n = held + 1
        try:
            yield
        finally:
            self._mine.n = held
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()


# Every export in the process (capture, a quantized graph's re-export, save, load) holds
# it exclusively; a quantized model's calls and calibration hold it shared.
EXPORT_LOCK = ExportLock()


def shadow(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module``'s tree for export to trace: new module objects, each with its
    own attribute, parameter, buffer, submodule and hook tables (dict and set attributes
    copied one level), holding the same tensor objects; no tensor data is copied. What
    export swaps into the copy's tables (fake tensors, stand-ins) other threads calling
    ``module`` never see. A module that appears twice in the tree is copied once."""
    copies: dict[int, torch.nn.Module] = {}

    def copy_of(mod: torch.nn.Module) -> torch.nn.Module:
        if id(mod) in copies:
            return copies[id(mod)]
        # object.__new__: the same class (a GraphModule's forward lives on its own class)
        new = copies[id(mod)] = object.__new__(type(mod))
        state = {k: type(v)(v) if type(v) in (dict, OrderedDict, set) else v
                 for k, v in vars(mod).items()}
        state["_modules"] = type(mod._modules)(
            (k, None if m is None else copy_of(m)) for k, m in mod._modules.items())
        new.__dict__.update(state)
        return new

    return copy_of(module)


@dataclass
class Captured:
    """One graph of a model: it takes the calls its ``call_spec`` and guards accept."""

    gm: fx.GraphModule
    call_spec: CallSpec
    example: dict[str, Any]  # the keyword call the graph was exported with
    dynamic_shapes: Any

    def rejects(self, call: dict[str, Any]) -> str | None:
        """Why this graph cannot take ``call`` (a keyword call in the captured layout):
        an input's layout or size, or a guard of the model's own code; None if it can."""
        problems = self.call_spec.problems(call)
        if problems:
            return "; ".join(problems)
        guards = getattr(self.gm, "_guards_fn", None)
        if guards is None:
            return None
        try:
            guards(*fx_pytree.tree_flatten_spec(((), dict(call)), self.gm._in_spec))
        except (AssertionError, RuntimeError) as e:
            return self.call_spec.explain(e, call) or str(e)
        return None

    def sizes(self) -> str:
        """The captured sizes of the tensor inputs, for messages."""
        return ", ".join(f"{keyname(leaf.path)}={'x'.join(map(str, leaf.example))}"
                         for leaf in self.call_spec.leaves if isinstance(leaf, TensorSpec))


def auto_dynamic_shapes(call: dict[str, Any]) -> dict[str, Any]:
    """``Dim.AUTO`` on every dim of every tensor input."""

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {d: Dim.AUTO for d in range(x.dim())} or None
        return None

    return {k: pytree.tree_map(spec, v) for k, v in call.items()}


def batch_size(call: dict[str, Any]) -> int | None:
    """The leading size of the first tensor with two or more dims."""
    leaves = [x for x in pytree.tree_leaves(call) if isinstance(x, torch.Tensor)]
    return next((int(x.shape[0]) for x in leaves if x.dim() >= 2), None)


def _doubled(call: dict[str, Any]) -> dict[str, Any]:
    return pytree.tree_map(
        lambda x: torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() >= 1
        and x.shape[0] == 1 else x, call)


def _behaves_as_two_copies(model: torch.nn.Module, call: dict, doubled: dict) -> bool:
    """Every output of the doubled call is the single call's output, twice."""
    try:
        with torch.no_grad():
            one = pytree.tree_leaves(model(**call))
            two = pytree.tree_leaves(model(**doubled))
    except Exception:  # noqa: BLE001 - the doubled call not running means "no"
        return False
    if len(one) != len(two):
        return False
    for a, b in zip(one, two, strict=True):
        if not isinstance(a, torch.Tensor):
            continue
        if not isinstance(b, torch.Tensor) or b.shape[:1] != (2 * a.shape[0],) or \
                b.shape[1:] != a.shape[1:]:
            return False
        tol = 1e-4 * float(a.abs().max()) + 1e-6 if a.is_floating_point() else 0
        if any(float((half - a).abs().max()) > tol for half in b.chunk(2)):
            return False
    return True


def _batch_symbol(captured: Captured) -> str | None:
    tensors = [t for t in captured.call_spec.leaves if isinstance(t, TensorSpec)]
    first = next((t for t in tensors if len(t.shape) >= 2), None)
    return first.shape[0] if first is not None and isinstance(first.shape[0], str) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _name_op(err: Exception) -> str:
    m = re.search(r"(aten\.[\w.]+|torch\.ops\.[\w.]+)", str(err))
    return f" (op {m.group(1)})" if m else ""


def export_program(module: torch.nn.Module, call: dict[str, Any], dynamic_shapes: Any,
                   what: str = "") -> torch.export.ExportedProgram:
    """torch.export of ``module(**call)`` under the process-wide lock; export traces a
    :func:`shadow` of ``module``, so threads calling ``module`` meanwhile see it as it is."""
    with EXPORT_LOCK, torch.no_grad():
        try:
            return torch.export.export(shadow(module), (), call,
                                       dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:  # noqa: BLE001 - every export failure is reported the same way
            raise CaptureError(
                f"torch.export could not capture {what or type(module).__name__}"
                f"{_name_op(e)}: {type(e).__name__}: {_first_line(e)}"
            ) from e


def call_spec_of(ep: torch.export.ExportedProgram, params: list[Param],
                 call: dict[str, Any]) -> CallSpec:
    """Static sizes and dynamic symbols of every input, read off the exported program."""
    flat = pytree.tree_flatten_with_path(call)[0]
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    leaves: list[TensorSpec | ConstSpec] = []
    for (path, value), user in zip(flat, ep.graph_signature.user_inputs, strict=True):
        key = pytree.keystr(path)
        if not isinstance(value, torch.Tensor):
            leaves.append(ConstSpec(key, value))
            continue
        fake = vals.get(user)
        shape = tuple(int(s) if is_concrete_int(s) else str(s) for s in fake.shape)
        leaves.append(TensorSpec(key, value.dtype, shape, tuple(value.shape)))
    ranges = {str(sym): (_bound(vr.lower) or 0, _bound(vr.upper))
              for sym, vr in ep.range_constraints.items()}
    _, in_spec = pytree.tree_flatten(call)
    return CallSpec(params, in_spec, leaves, ranges)


def _bound(x: Any) -> int | None:
    """A finite range bound as an int; None for an infinite one."""
    if x in (int_oo, -int_oo):
        return None
    return int(x)


def capture(model: torch.nn.Module, params: list[Param], call: dict[str, Any],
            dynamic_shapes: Any = None, like: Captured | None = None,
            checkpoint: Checkpoint | None = None) -> Captured:
    """Export ``model(**call)`` (a call bound by :func:`clq_compile.signature.bind`).
    ``like``: a graph of the same model already captured; its output class is reused, so
    a call at other (possibly large) sizes never runs the model for real. ``checkpoint``:
    where the model's meta-device tensors are read from (the graph keeps them on meta).
    Everything is done on a :func:`shadow` of ``model`` in eval mode: ``model`` itself,
    which other threads may be calling or capturing, is never changed."""
    model = shadow(model).eval()
    with stand_ins(model) as lazy:
        if lazy and checkpoint is None:
            name = next(iter(lazy))
            raise QuantizationError(f"{type(model).__name__}.{name} is on the meta device: "
                                    "pass checkpoint=... to read the weights from it")
        ep, spec, example, dynamic_shapes = _export(model, params, call, dynamic_shapes,
                                                    like, fake=bool(lazy))
    with EXPORT_LOCK:  # unlifting works on export's symbolic state: not thread-safe either
        gm = ep.module()
    if lazy:
        attach(gm, lazy, checkpoint)
    gm.meta["clq_dynamic_shapes"] = dynamic_shapes
    return Captured(gm, spec, example, dynamic_shapes)


def _export(model: torch.nn.Module, params: list[Param], call: dict[str, Any],
            dynamic_shapes: Any, like: Captured | None, fake: bool):
    """``fake``: the weights are stand-ins; the output class is read under fake tensors
    (no arithmetic), and the doubled-batch check runs on the stand-ins, which still shows
    whether rows of a batch are mixed."""
    call = dict(call)
    out_spec = None if like is None else like.call_spec.output
    if RETURN_DICT in call:
        if like is None:
            with torch.no_grad(), (FakeTensorMode(allow_non_fake_inputs=True) if fake
                                   else contextlib.nullcontext()):
                out_spec = output_spec(model(**{**call, RETURN_DICT: True}))
        call[RETURN_DICT] = False
    example = call
    if dynamic_shapes is None:
        if batch_size(call) == 1:
            doubled = _doubled(call)
            # ``like`` with a dynamic batch already showed the model treats rows apart
            if (_batch_symbol(like) if like is not None
                    else _behaves_as_two_copies(model, call, doubled)):
                example = doubled
            else:
                log.warning("calibration batch is 1 and the inputs do not double as a batch: "
                            "the quantized graph only takes batch 1")
        dynamic_shapes = auto_dynamic_shapes(example)
    ep = export_program(model, example, dynamic_shapes)
    with EXPORT_LOCK:  # reads export's symbolic sizes
        spec = call_spec_of(ep, params, example)
    spec.output = out_spec
    return ep, spec, example, dynamic_shapes


def grown_call(captured: Captured) -> dict[str, Any] | None:
    """The captured example with every dynamic size except the batch doubled (each input
    repeated along those dims), or None when there is none: a probe for sizes the model
    specializes on (a resolution a positional embedding was built for)."""
    spec = captured.call_spec
    tensors = [leaf for leaf in spec.leaves if isinstance(leaf, TensorSpec)]
    batch = _batch_symbol(captured)
    first = next((t for t in tensors if len(t.shape) >= 2), None)
    # a mask or timestep may carry the batch under its own symbol: every leading dim of
    # the batch's size is the batch
    batches = {batch} | {t.shape[0] for t in tensors if first is not None and t.shape
                         and isinstance(t.shape[0], str) and t.example[0] == first.example[0]}
    grow = {s for leaf in tensors for s in leaf.shape if isinstance(s, str)} - batches
    if not grow:
        return None
    leaves, tree = pytree.tree_flatten(captured.example)
    out = []
    for value, leaf in zip(leaves, spec.leaves, strict=True):
        if isinstance(leaf, TensorSpec):
            for d, s in enumerate(leaf.shape):
                if s in grow:
                    value = torch.cat([value, value], dim=d)
        out.append(value)
    return pytree.tree_unflatten(out, tree)


def share_tensors(gm: fx.GraphModule, source: fx.GraphModule) -> None:
    """Point ``gm``'s tensors at ``source``'s where both graphs hold the same tensor under
    the same name (graphs of one model at other sizes): one copy in memory."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            theirs = source.get_parameter(node.target)
        except AttributeError:
            try:
                theirs = source.get_buffer(node.target)
            except AttributeError:
                continue
        mine = fetch_attr(gm, node.target, load=False)
        same_kind = isinstance(mine, torch.nn.Parameter) == isinstance(theirs, torch.nn.Parameter)
        if isinstance(mine, torch.Tensor) and mine is not theirs and same_kind and \
                mine.shape == theirs.shape and mine.dtype == theirs.dtype and \
                torch.equal(mine, theirs):
            set_attr(gm, node.target, theirs)


def own_tensors(gm: fx.GraphModule) -> None:
    """Replace every parameter, buffer and tensor constant the graph reads by a copy, so the
    graph no longer shares storage with the model it was captured from; tensors with equal
    contents share one copy."""
    done: set[str] = set()
    copies: dict[tuple, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in done:
            continue
        done.add(node.target)
        t = fetch_attr(gm, node.target, load=False)
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (*content_key(t), t.device.type)
        set_attr(gm, node.target, copies.setdefault(key, t.detach().clone()))
