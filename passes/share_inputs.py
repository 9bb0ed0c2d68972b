"""Quantize each activation once.

After :class:`RewriteLinears` every quantized layer is its own ``clq.quant_linear``, so
q, k and v each transform and quantize the same tensor. Two passes remove the repeats:

- :class:`ShareQuantizedInputs`: ``quant_linear`` nodes reading the same node with the same
  activation quantizer (bits, group, clip) and the same weight layout (bits, group, bias or
  not) become one node over their weights concatenated along N, then a split. Each output
  column is the same integer dot product times the same scales as before; the GEMM is
  wider (N = 3·C for q/k/v), which also suits a GPU better than three narrow ones.
- :class:`FuseTransforms`: a ``clq.transform`` whose only user is one ``quant_linear``
  moves into it (its optional ``perm``/``smooth``/``rot``), so the kernel reads x once,
  transforms and quantizes it in one launch. A transform that also feeds a low-rank branch
  or several quantizers (CLPS chose different clips) stays a node of its own.
- :class:`~clq_compile.passes.prologues.FusePrologues`: the op producing a
  ``quant_linear``'s input (GELU; LayerNorm + adaLN modulation) moves into it, so its
  output is never written.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from clq_compile.annotations import LAYERS_KEY, layer_names
from clq_compile.passes.find_linears import fetch_attr
from clq_compile.passes.infra import GraphPass, PassResult
from clq_compile.passes.post_norms import AddNormBiases
from clq_compile.passes.prologues import FusePrologues
from clq_compile.passes.rewrite import (
    QUANT_LINEAR,
    TRANSFORM,
    RewriteLinears,
    const_node,
    drop_unused_attributes,
    ensure_planned_layers,
    quant_linear_nodes,
    safe_name,
)
from clq_compile.plan import Plan

log = logging.getLogger(__name__)

aten = torch.ops.aten
_X, _W_Q, _W_SCALE, _BIAS = 0, 1, 2, 3
_ACT = slice(4, 8)  # w_bits, a_bits, a_group, a_clip
_TRANSFORM_ARGS = slice(8, 11)


def _finish(gm: fx.GraphModule, modified: bool) -> PassResult:
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


def _cat(gm: fx.GraphModule, nodes: list[fx.Node], name: str) -> fx.Node:
    """One node holding ``nodes`` concatenated along dim 0: a constant when they all are
    (the packed weights), else a ``cat`` run per call (weights packed at call time)."""
    if all(n.op == "get_attr" for n in nodes):
        return const_node(gm, name, torch.cat([fetch_attr(gm, n.target) for n in nodes]))
    return gm.graph.call_function(aten.cat.default, (nodes, 0))


def _hoist(node: fx.Node, anchor: fx.Node, position: dict[fx.Node, int],
           moved: set[fx.Node]) -> None:
    """Move the inputs of ``node`` that come after ``anchor`` (and theirs) before it."""
    for inp in node.all_input_nodes:
        if inp in moved or position[inp] < position[anchor]:
            continue
        _hoist(inp, anchor, position, moved)
        anchor.prepend(inp)
        moved.add(inp)


class ShareQuantizedInputs(GraphPass):
    """Needs one ``quant_linear`` per layer (RewriteLinears); ensures one per distinct
    (input, activation quantizer, weight layout)."""

    name = "share_quantized_inputs"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def _key(self, node: fx.Node) -> tuple:
        (name,) = layer_names(node)
        lp = self.plan.layers[name]
        return (node.args[_X], *node.args[_ACT], lp.spec.w_group, node.args[_BIAS] is None,
                *node.args[_TRANSFORM_ARGS], *sorted(node.kwargs.items()))

    def call(self, gm: fx.GraphModule) -> PassResult:
        siblings: dict[tuple, list[fx.Node]] = {}
        readers: dict[fx.Node, set[tuple]] = {}
        for n in quant_linear_nodes(gm):
            key = self._key(n)
            siblings.setdefault(key, []).append(n)
            readers.setdefault(n.args[_X], set()).add(key)
        for x, keys in readers.items():
            if len(keys) > 1:  # a rule that declines says why
                log.debug("%s: %d layers read %s with %d different quantizers or weight "
                          "layouts; each keeps its own", self.name,
                          sum(len(siblings[k]) for k in keys), x, len(keys))
        groups = [g for g in siblings.values() if len(g) > 1]
        for members in groups:
            self._merge(gm, members)
        if groups:
            gm.graph.eliminate_dead_code()
            drop_unused_attributes(gm)
        return _finish(gm, bool(groups))

    def _merge(self, gm: fx.GraphModule, members: list[fx.Node]) -> None:
        graph, first = gm.graph, members[0]
        names = [name for m in members for name in layer_names(m)]
        sizes = [self.plan.layers[name].out_features for name in names]
        base = f"clq_{safe_name(names[0])}_x{len(names)}"
        with graph.inserting_before(first):
            w_q = _cat(gm, [m.args[_W_Q] for m in members], f"{base}_w_q")
            w_scale = _cat(gm, [m.args[_W_SCALE] for m in members], f"{base}_w_scale")
            bias = None if first.args[_BIAS] is None else \
                _cat(gm, [m.args[_BIAS] for m in members], f"{base}_bias")
            new = graph.call_function(QUANT_LINEAR, (first.args[_X], w_q, w_scale, bias,
                                                     *first.args[4:]), dict(first.kwargs))
            parts = graph.call_function(aten.split_with_sizes.default, (new, sizes, -1))
            outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(sizes))]
        position = {n: i for i, n in enumerate(graph.nodes)}
        moved: set[fx.Node] = set()
        for n in (w_q, w_scale, bias):
            if n is not None:
                _hoist(n, n, position, moved)
        new.meta[LAYERS_KEY] = names
        for m, out in zip(members, outs, strict=True):
            m.replace_all_uses_with(out)
            graph.erase_node(m)

    def ensures(self, gm: fx.GraphModule) -> None:
        ensure_planned_layers(gm, self.plan)


class FuseTransforms(GraphPass):
    """Ensures no ``clq.transform`` node has exactly one user that is a ``quant_linear``
    reading it as its input."""

    name = "fuse_transforms"

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for t in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == TRANSFORM]:
            users = list(t.users)
            if len(users) != 1 or users[0].target != QUANT_LINEAR:
                log.debug("%s: %s has users %s; it stays a node", self.name, t, users)
                continue
            q = users[0]
            if q.args[_X] is not t or t in q.args[1:] or len(q.args) > _TRANSFORM_ARGS.start:
                continue
            if len(t.args) > 4 or t.kwargs:  # its prologue has no slot left in q
                log.debug("%s: %s holds a prologue; it stays a node", self.name, t)
                continue
            q.args = (t.args[0], *q.args[1:], *t.args[1:4])
            gm.graph.erase_node(t)
            modified = True
        return _finish(gm, modified)


def plan_passes(plan: Plan, weights: str = "packed") -> list[GraphPass]:
    """The one path from a Plan to a deployable graph (``weights``: see RewriteLinears)."""
    if weights == "float":
        return [RewriteLinears(plan, weights)]
    return [AddNormBiases(plan), RewriteLinears(plan, weights), ShareQuantizedInputs(plan),
            FuseTransforms(), FusePrologues()]
