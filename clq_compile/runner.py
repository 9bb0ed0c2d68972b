"""The calibration runner: streams an analyzed graph block by block over the whole
calibration set (the engine behind CBC, CLPS probes and per-layer measurement), and the
``PlanContext`` every plan builder receives.

The runner keeps, per calibration sample, only the values still needed by later
segments, so peak memory is about one block's activations on the calibration set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from clq_compile.annotations import CHECKPOINT_KEY, annotated_linears, linear_info
from clq_compile.capture import EXPORT_LOCK
from clq_compile.errors import CalibrationError
from clq_compile.passes.blocks import SEGMENT_KEY
from clq_compile.passes.find_linears import fetch_attr, weight_tensor
from clq_compile.plan import LayerPlan, Plan
from clq_compile.shard import Shard
from clq_compile.spec import QuantSpec

log = logging.getLogger(__name__)

Override = Callable[[fx.Node, tuple[Any, ...], dict[str, Any], int], Any]


class GraphRunner:
    """Evaluates an FX graph segment by segment (``meta["clq_segment"]``) for many samples."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.output = next(n for n in nodes if n.op == "output")
        self.segments: dict[int, list[fx.Node]] = {}
        for n in nodes:  # weights are read where used, so a block's are held while it runs
            if n.op not in ("placeholder", "output", "get_attr"):
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
            for v in env.values():
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
        if CHECKPOINT_KEY in self.gm.meta:  # read from a checkpoint: its own cache bounds it
            return fetch_attr(self.gm, target)
        if target not in self._attrs:
            self._attrs[target] = fetch_attr(self.gm, target)
        return self._attrs[target]

    def _value(self, n: fx.Node, env: dict[fx.Node, Any]) -> Any:
        return self._attr(n.target) if n.op == "get_attr" else env[n]

    def _eval(self, node: fx.Node, env: dict[fx.Node, Any], i: int, override: Override | None):
        # never during another thread's export, which switches oneDNN off process-wide
        with EXPORT_LOCK.shared():
            return self._compute(node, env, i, override)

    def _compute(self, node: fx.Node, env: dict[fx.Node, Any], i: int,
                 override: Override | None):
        args = fx.node.map_arg(node.args, lambda n: self._value(n, env))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._value(n, env))
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

    def run_segment(
        self,
        seg: int,
        envs: list[dict[fx.Node, Any]],
        override: Override | None = None,
        commit: bool = True,
        keep: bool = False,
        grad: bool = False,
    ) -> list[dict[fx.Node, Any]]:
        """Run segment ``seg`` for every sample. With ``commit`` the environments advance
        (and values dead after this segment are freed); without, they are left as they
        were. ``keep``: return every value the segment computed, per sample (they stay
        alive for the caller; otherwise each sample's are freed before the next runs).
        ``grad``: record autograd history (for sensitivities; off everywhere else)."""
        with torch.set_grad_enabled(grad):
            return self._run_segment(seg, envs, override, commit, keep)

    def _run_segment(self, seg, envs, override, commit, keep) -> list[dict[fx.Node, Any]]:
        produced = []
        for i, env in enumerate(envs):
            local = dict(env) if not commit else env
            new = {}
            for node in self.segments.get(seg, []):
                local[node] = new[node] = self._eval(node, local, i, override)
            if keep:
                produced.append(new)
            if i == len(envs) - 1 or not commit:
                self.peak_bytes = max(self.peak_bytes,
                                      self.held_bytes([*envs, local, *produced]))
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
        Segments are the outer loop, so each block's weights are needed once per probe,
        not once per sample (they may be read from a checkpoint).

        ``reuse``/``dirty``: float values of segment ``start`` per sample, and the nodes
        that must be recomputed anyway (those downstream of the probed layer); every other
        node of that segment is taken from ``reuse`` instead of being evaluated again.
        """
        seen: dict[fx.Node, dict[int, Any]] = {n: {} for n in watch}
        work = [dict(e) for e in envs]
        left = [set(watch) for _ in envs]
        for seg in self.order[self.order.index(start):]:
            for i, env in enumerate(work):
                for node in self.segments.get(seg, []) if left[i] else ():
                    if reuse is not None and seg == start and node not in dirty:
                        env[node] = reuse[i][node]
                    else:
                        env[node] = self._eval(node, env, i, override)
                    if node in left[i]:
                        seen[node][i] = env[node]
                        left[i].discard(node)
                        if not left[i]:
                            env.clear()
                            break
                for n in [n for n in env if self.last_use.get(n, -2) <= seg]:
                    del env[n]
            if not any(left):
                break
        return {n: [v[i] for i in sorted(v)] for n, v in seen.items()}

    def outputs(self, envs: list[dict[fx.Node, Any]]) -> list[Any]:
        return [fx.node.map_arg(self.output.args[0], lambda n, env=env: self._value(n, env))
                for env in envs]


def recorder(values: dict[fx.Node, list[Any]]) -> Override:
    """A runner override that evaluates the nodes of ``values`` as usual and keeps their
    outputs (one per sample, in order)."""
    def record(node: fx.Node, args: tuple, kwargs: dict, i: int) -> Any:
        if node not in values or node.op != "call_function":
            return NotImplemented
        out = node.target(*args, **kwargs)
        values[node].append(out)
        return out
    return record


@dataclass
class PlanContext:
    """An analyzed graph, its calibration set (flat placeholder values per call), the spec
    and the runner over them: what every plan builder and calibration pass receives."""

    gm: fx.GraphModule
    spec: QuantSpec
    flat_calib: list[list[Any]]
    runner: GraphRunner
    rank: int = 0  # low-rank branch of every quantized layer (option ``lowrank``)
    shard: Shard = field(default_factory=Shard)  # this process's share of per-layer work
    nodes: dict[str, fx.Node] = field(default_factory=dict)  # layer name -> linear node

    def __post_init__(self) -> None:
        self.nodes = {linear_info(n).name: n for n in annotated_linears(self.gm)}

    def weight(self, name: str) -> torch.Tensor:
        return weight_tensor(self.gm, self.nodes[name])

    def calib_input(self, placeholder: str, i: int) -> Any:
        """Calibration call ``i``'s value of the graph input named ``placeholder``."""
        names = [p.name for p in self.runner.placeholders]
        return self.flat_calib[i][names.index(placeholder)]

    def bias(self, name: str) -> torch.Tensor | None:
        node = self.nodes[name]
        b = node.args[2] if len(node.args) > 2 else None
        if isinstance(b, fx.Node) and b.op == "get_attr":
            return self.runner._attr(b.target)
        return None

    def base_plan(self, recipe: str) -> Plan:
        """One LayerPlan per linear: the spec where quantized, the reason where skipped."""
        plan = Plan(recipe=recipe, spec=self.spec)
        for name, node in self.nodes.items():
            info = linear_info(node)
            plan.layers[name] = LayerPlan(
                name=name, role=info.role, block=info.block, in_features=info.in_features,
                out_features=info.out_features, group=info.group,
                spec=None if info.skip_reason else self.spec, skip_reason=info.skip_reason,
                rank=0 if info.skip_reason else min(self.rank, info.in_features,
                                                     info.out_features),
            )
        return plan
