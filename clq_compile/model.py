"""``QuantizedModel``: a rewritten graph that takes the model's own calls, owns its
tensors, and has what diffusers pipelines read of a transformer (``config``, ``dtype``,
``device``, ``.to(device)``), so it can replace ``pipe.transformer``."""

from __future__ import annotations

import copy
import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from clq_compile.capture import EXPORT_LOCK, Captured, export_program
from clq_compile.errors import ConfigError, InputError, SaveError
from clq_compile.plan import Plan
from clq_compile.signature import CallSpec

log = logging.getLogger(__name__)


def _frozen(config: dict[str, Any] | None) -> Any:
    if config is None:
        return None
    try:
        from diffusers.configuration_utils import FrozenDict
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return dict(config)
    return FrozenDict(config)


class QuantizedModel(torch.nn.Module):
    """The rewritten graph(s), the ``plan`` that produced them, and the model's call
    signature. A model that specializes on a size (a positional embedding built for one
    resolution) has one graph per specialization, all from the same plan; a call runs
    through the first graph that takes it. A call no graph takes raises
    ``clq.InputError`` naming the input, its captured size and the remedy."""

    def __new__(cls, *args: Any, **kwargs: Any) -> QuantizedModel:
        # Made as a diffusers ModelMixin (see _as_diffusers_model), so that a pipeline's
        # save_pretrained calls ours (which says how to save it) instead of skipping it.
        return super().__new__(_as_diffusers_model(cls))

    def __init__(
        self,
        graphs: list[Captured],
        plan: Plan,
        *,
        config: dict[str, Any] | None = None,
        fp_weight_bytes: int = 0,
        source: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.graphs = list(graphs)
        self.graph_modules = torch.nn.ModuleList([g.gm for g in self.graphs])
        self.plan = plan
        self.config = _frozen(config)
        self.fp_weight_bytes = fp_weight_bytes
        self.source = dict(source or {})  # where the model came from (class, asset)
        # Per graph, the graph lowered to the Triton kernels (``lower``), or None. A plain
        # attribute, not a submodule: it shares the graph's tensors and is rebuilt on .to().
        self.__dict__["lowered"] = [None] * len(self.graphs)
        self.__dict__["declined"] = {}
        self._lower_on_gpu()

    # The first graph: the one calibration ran on.
    @property
    def graph_module(self) -> fx.GraphModule:
        return self.graphs[0].gm

    @property
    def call_spec(self) -> CallSpec:
        return self.graphs[0].call_spec

    @property
    def example(self) -> dict[str, Any]:
        return self.graphs[0].example

    # -- calling ---------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            call, want_dict = self.call_spec.normalize(args, kwargs)
        except TypeError as e:
            raise InputError(f"{self._name}: {e}") from None
        why = None
        for i, g in enumerate(self.graphs):
            reason = g.rejects(call)
            if reason is None:
                gm = self.lowered[i] or g.gm
                # shared with other calls; never during an export (capture.ExportLock)
                with EXPORT_LOCK.shared(), torch.no_grad():
                    out = gm(**call)
                return self.call_spec.pack(out, want_dict)
            why = why or reason
        sizes = "; ".join(f"[{g.sizes()}]" for g in self.graphs)
        raise InputError(f"{self._name}: {why} (graphs captured at: {sizes})")

    @property
    def _name(self) -> str:
        return f"quantized {self.source.get('class', 'model').rsplit('.', 1)[-1]}"

    @property
    def example_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """One call the first graph takes, as ``(args, kwargs)``."""
        return (), dict(self.example)

    # -- what pipelines read ---------------------------------------------------------
    def _tensors(self) -> list[torch.Tensor]:
        return [*self.graph_modules.parameters(), *self.graph_modules.buffers()]

    @property
    def device(self) -> torch.device:
        t = self._tensors()
        return t[0].device if t else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the graph computes in (of its inputs, else its float tensors)."""
        for leaf in self.call_spec.leaves:
            if getattr(leaf, "dtype", None) is not None and leaf.dtype.is_floating_point:
                return leaf.dtype
        floats = [t.dtype for t in self._tensors() if t.is_floating_point()]
        return floats[0] if floats else torch.float32

    def to(self, *args: Any, **kwargs: Any) -> QuantizedModel:
        """Move to another device. The graph was captured in one dtype, so a dtype change
        is refused (re-quantize the model in that dtype instead); so is the meta device,
        which would drop the packed weights' values for good."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != self.dtype:
            raise ConfigError(
                f"cannot convert a quantized {self.dtype} graph to {dtype}: quantize the model "
                f"in {dtype} instead")
        if device is not None and torch.device(device).type == "meta":
            raise ConfigError(
                f"{self._name} cannot move to the meta device: its packed weights would lose "
                "their values for good (it has no checkpoint to read them back from); to "
                "free its memory, save it with qm.save(path), drop it and clq.load(path) "
                "later")
        if device is None or torch.device(device) == self.device:
            return self
        device = torch.device(device)
        for g in self.graphs:
            retarget_devices(g.gm, device)
            g.gm.to(device)
            g.example = pytree.tree_map(
                lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, g.example)
        self.lowered[:] = [None] * len(self.graphs)
        self.declined.clear()
        self._lower_on_gpu()
        return self

    def _lower_on_gpu(self) -> None:
        from clq_compile.lowering.triton.dispatch import triton_available

        if self.device.type == "cuda" and triton_available()[0]:
            self.lower()

    def lower(self, capability: Any = "device") -> dict[str, str]:
        """Lower every graph's ``clq`` ops to the ``clq_triton`` triton_ops
        (``lowering.triton.lower``): ``forward`` then runs the kernels with no per-call
        dispatch, and ``torch.compile(qm)`` hands them to Inductor. Done by itself on a
        GPU (at construction and on ``.to("cuda")``); the packed weights stay what is
        saved. ``capability`` picks routes for another GPU generation (tests). Returns
        the calls left as ``clq`` ops, with the reason (also logged at WARNING)."""
        import torch.fx._pytree as fx_pytree

        from clq_compile.lowering.triton.lower import LowerToKernels

        self.declined.clear()
        for i, g in enumerate(self.graphs):
            gm = fx.GraphModule(g.gm, copy.deepcopy(g.gm.graph))  # shares g.gm's tensors
            flat = fx_pytree.tree_flatten_spec(((), dict(g.example)), g.gm._in_spec)
            lowering = LowerToKernels(flat, capability)
            self.lowered[i] = lowering(gm).gm
            self.declined.update({f"graph {i}: {k}": v for k, v in lowering.declined.items()})
        return dict(self.declined)

    def cpu(self) -> QuantizedModel:
        return self.to("cpu")

    def cuda(self, device: Any = None) -> QuantizedModel:
        return self.to(torch.device("cuda" if device is None else device))

    def half(self) -> QuantizedModel:
        return self.to(torch.float16)

    def bfloat16(self) -> QuantizedModel:
        return self.to(torch.bfloat16)

    def float(self) -> QuantizedModel:
        return self.to(torch.float32)

    # -- sizes, export, save ---------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of the tensors the model computes with (shared between graphs once)."""
        seen: dict[int, int] = {}
        for t in [*self.graph_modules.parameters(), *self.graph_modules.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def exported_program(self, graph: int = 0) -> torch.export.ExportedProgram:
        """Graph ``graph`` as a torch.export program, same dynamic sizes as captured
        (what ``save`` serializes and ``export_onnx`` translates). Export traces a copy of
        the graph module (``capture.shadow``), so calls running meanwhile are unaffected."""
        g = self.graphs[graph]
        return export_program(g.gm, dict(g.example), g.dynamic_shapes,
                              what="the quantized graph")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to directory ``path`` (see ``clq_compile.serialize``). An
        existing directory is replaced only when empty or a previous save, unless
        ``overwrite=True``; the current directory or a parent of it never."""
        from clq_compile.serialize import save

        return save(self, path, overwrite=overwrite)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Refused with a ``SaveError`` saying what to do instead: the quantized graph is
        not a diffusers model (yet), so diffusers' format cannot hold it. (A pipeline's
        ``save_pretrained`` calls this only on components of diffusers' or transformers'
        base classes; it skips any other with a "cannot be saved" warning, writing
        ``[null, null]`` for it in model_index.json.)"""
        raise SaveError(
            f"{self._name} cannot be saved in diffusers' format (save_pretrained to "
            f"{os.fspath(save_directory)!r}): save it with qm.save(path), load it with "
            "clq.load(path) and put it back in its pipeline as "
            "pipe.transformer = clq.load(path)")

    def extra_repr(self) -> str:
        q = len(self.plan.quantized_layers())
        n = len(self.plan.layers)
        return (f"recipe={self.plan.recipe}, bits={self.plan.spec.name}, {q}/{n} linears, "
                f"{len(self.graphs)} graph(s)")


@functools.cache
def _as_diffusers_model(cls: type) -> type:
    """``cls`` with diffusers' ``ModelMixin`` as a further base: diffusers' pipelines save a
    component through its own ``save_pretrained`` only when it derives from one of their
    base classes, and silently write ``[null, null]`` for any other. Our methods come
    first in the MRO. Made on first use, so ``import clq_compile`` does not import
    diffusers."""
    from diffusers.models.modeling_utils import ModelMixin

    if issubclass(cls, ModelMixin):
        return cls
    return type(cls.__name__, (cls, ModelMixin), {"__module__": cls.__module__,
                                                  "__qualname__": cls.__qualname__,
                                                  "__doc__": cls.__doc__})


def retarget_devices(gm: fx.GraphModule, device: torch.device) -> None:
    """Rewrite the devices baked into the graph (``device=`` of factory ops such as
    ``arange`` in positional and timestep embeddings) to ``device``."""

    def swap(v: Any) -> Any:
        return device if isinstance(v, torch.device) else v

    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args = pytree.tree_map(swap, node.args)
        kwargs = pytree.tree_map(swap, dict(node.kwargs))
        if args != node.args or kwargs != dict(node.kwargs):
            node.args, node.kwargs = args, kwargs
            changed = True
    if changed:
        gm.recompile()


__all__ = ["QuantizedModel", "retarget_devices"]
