"""Calibration inputs: validation, flattening, and a runner that streams a graph block by
block over the whole calibration set (the engine behind CBC).

The runner keeps, per calibration sample, only the values still needed by later
segments, so peak memory is about one block's activations on the calibration set.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx import _pytree as fx_pytree

from clq_compile.errors import CalibrationError
from clq_compile.passes.blocks import SEGMENT_KEY
from clq_compile.passes.find_linears import fetch_attr

log = logging.getLogger(__name__)

Call = tuple[tuple[Any, ...], dict[str, Any]]
Override = Callable[[fx.Node, tuple[Any, ...], dict[str, Any], int], Any]


def as_call(item: Any, i: int) -> Call:
    if isinstance(item, dict):
        return (), dict(item)
    if isinstance(item, tuple | list):
        return tuple(item), {}
    raise CalibrationError(
        f"calibration call {i} is a {type(item).__name__}; expected a dict of keyword "
        "arguments or a tuple of positional arguments for model.forward"
    )


def validate_calibration(model: torch.nn.Module | None, calib: Sequence[Any]) -> list[Call]:
    """Check every calibration call before any work starts; errors name the call and key."""
    if calib is None or len(calib) == 0:
        raise CalibrationError(
            "calibration set is empty: pass at least one call (a dict of forward kwargs)"
        )
    calls = [as_call(item, i) for i, item in enumerate(calib)]
    sig = inspect.signature(model.forward) if model is not None else None
    first_spec = None
    for i, (args, kwargs) in enumerate(calls):
        if sig is not None:
            try:
                sig.bind(*args, **kwargs)
            except TypeError as e:
                raise CalibrationError(
                    f"calibration call {i} does not match {type(model).__name__}.forward: {e}"
                ) from None
        leaves, spec = pytree.tree_flatten((args, kwargs))
        paths = pytree.tree_flatten_with_path((args, kwargs))[0]
        for path, leaf in paths:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                if not torch.isfinite(leaf).all():
                    raise CalibrationError(
                        f"calibration call {i}, input {pytree.keystr(path)}: holds NaN or Inf"
                    )
        if first_spec is None:
            first_spec = spec
        elif spec != first_spec:
            raise CalibrationError(
                f"calibration call {i} has a different structure of inputs than call 0"
            )
    return calls


def flatten_calls(gm: fx.GraphModule, calls: Sequence[Call]) -> list[list[Any]]:
    """Flat placeholder values of each call, in the order of ``gm``'s placeholders."""
    spec = getattr(gm, "_in_spec", None)
    out = []
    for i, (args, kwargs) in enumerate(calls):
        try:
            flat = (
                fx_pytree.tree_flatten_spec((args, kwargs), spec)
                if spec is not None
                else list(args)
            )
        except Exception as e:  # noqa: BLE001 - re-raised with the call index
            raise CalibrationError(
                f"calibration call {i} does not fit the captured graph: {e}"
            ) from None
        out.append(list(flat))
    return out


class GraphRunner:
    """Evaluates an FX graph segment by segment (``meta["clq_segment"]``) for many samples."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.output = next(n for n in nodes if n.op == "output")
        self.segments: dict[int, list[fx.Node]] = {}
        for n in nodes:
            if n.op not in ("placeholder", "output"):
                self.segments.setdefault(n.meta.get(SEGMENT_KEY, -1), []).append(n)
        self.order = sorted(self.segments)
        # The last segment in which each value is read; the output keeps its inputs alive.
        self.last_use: dict[fx.Node, int] = {}
        for n in nodes:
            for u in n.users:
                s = 1 << 30 if u.op == "output" else u.meta.get(SEGMENT_KEY, -1)
                self.last_use[n] = max(self.last_use.get(n, -2), s)
        self._attrs: dict[str, Any] = {}
        self.peak_bytes = 0  # most activation bytes held at once (CBC's memory claim)

    @staticmethod
    def held_bytes(envs: Sequence[dict[fx.Node, Any]]) -> int:
        """Bytes of the distinct tensors (by storage) the environments hold."""
        seen: dict[int, int] = {}
        for env in envs:
            for n, v in env.items():
                if n.op == "get_attr":  # weights are not calibration activations
                    continue
                for t in pytree.tree_leaves(v):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def start(self, flat_calls: Sequence[Sequence[Any]]) -> list[dict[fx.Node, Any]]:
        envs = []
        for flat in flat_calls:
            if len(flat) != len(self.placeholders):
                raise CalibrationError(
                    f"expected {len(self.placeholders)} flat inputs, got {len(flat)}"
                )
            envs.append(dict(zip(self.placeholders, flat, strict=True)))
        return envs

    def _attr(self, target: str) -> Any:
        if target not in self._attrs:
            self._attrs[target] = fetch_attr(self.gm, target)
        return self._attrs[target]

    def _eval(self, node: fx.Node, env: dict[fx.Node, Any], i: int, override: Override | None):
        if node.op == "get_attr":
            return self._attr(node.target)
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if override is not None:
            out = override(node, args, kwargs, i)
            if out is not NotImplemented:
                return out
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        raise RuntimeError(f"cannot evaluate node {node.name} ({node.op})")

    @torch.no_grad()
    def run_segment(
        self,
        seg: int,
        envs: list[dict[fx.Node, Any]],
        override: Override | None = None,
        commit: bool = True,
    ) -> list[dict[fx.Node, Any]]:
        """Run segment ``seg`` for every sample. With ``commit`` the environments advance
        (and values dead after this segment are freed); without, they are left as they
        were and the segment's values are returned for inspection."""
        produced = []
        for i, env in enumerate(envs):
            local = dict(env) if not commit else env
            new = {}
            for node in self.segments.get(seg, []):
                local[node] = new[node] = self._eval(node, local, i, override)
            produced.append(new)
            if i == len(envs) - 1 or not commit:
                self.peak_bytes = max(self.peak_bytes, self.held_bytes([*envs, local]))
            if commit:
                for n in [n for n in env if self.last_use.get(n, -2) <= seg]:
                    del env[n]
        return produced

    @torch.no_grad()
    def probe(
        self,
        envs: list[dict[fx.Node, Any]],
        start: int,
        watch: set[fx.Node],
        override: Override | None = None,
        reuse: list[dict[fx.Node, Any]] | None = None,
        dirty: set[fx.Node] | None = None,
    ) -> dict[fx.Node, list[Any]]:
        """Run from segment ``start`` on copies of ``envs`` until every watched node has
        been computed; return their values per sample. ``envs`` are left untouched.

        ``reuse``/``dirty``: float values of segment ``start`` per sample, and the nodes
        that must be recomputed anyway (those downstream of the probed layer); every other
        node of that segment is taken from ``reuse`` instead of being evaluated again.
        """
        seen: dict[fx.Node, list[Any]] = {n: [] for n in watch}
        segs = self.order[self.order.index(start):]
        for i, env0 in enumerate(envs):
            env, left = dict(env0), set(watch)
            for seg in segs:
                for node in self.segments.get(seg, []):
                    if reuse is not None and seg == start and node not in dirty:
                        env[node] = reuse[i][node]
                    else:
                        env[node] = self._eval(node, env, i, override)
                    if node in left:
                        seen[node].append(env[node])
                        left.discard(node)
                        if not left:
                            break
                if not left:
                    break
                for n in [n for n in env if self.last_use.get(n, -2) <= seg]:
                    del env[n]
        return seen

    def outputs(self, envs: list[dict[fx.Node, Any]]) -> list[Any]:
        return [fx.node.map_arg(self.output.args[0], env.__getitem__) for env in envs]
