"""Rewrite: each planned ``aten.linear`` becomes ``clq.quant_linear`` on packed constants,
behind one shared ``clq.transform`` per input group."""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from clq_compile.annotations import annotated_linears, linear_info
from clq_compile.passes.find_linears import weight_tensor
from clq_compile.passes.infra import GraphPass, PassResult
from clq_compile.plan import Plan
from clq_compile.qlinear import pack_weight

QUANT_LINEAR = torch.ops.clq.quant_linear.default
TRANSFORM = torch.ops.clq.transform.default


def _safe(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _const(gm: fx.GraphModule, graph: fx.Graph, name: str, t: torch.Tensor | None):
    if t is None:
        return None
    gm.register_buffer(name, t.detach().clone().contiguous())
    return graph.get_attr(name)


def _insert_transform(gm: fx.GraphModule, x: fx.Node, group: int, tp) -> fx.Node:
    """One transform node right after its input (after all placeholders if x is one)."""
    graph = gm.graph
    anchor = x
    if x.op == "placeholder":
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(anchor):
        t = graph.call_function(TRANSFORM, (x, None, None, None))
    with graph.inserting_before(t):
        consts = [_const(gm, graph, f"clq_t{group}_{k}", getattr(tp, k))
                  for k in ("perm", "smooth", "rot")]
    t.args = (x, *consts)
    return t


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters/buffers no get_attr reads any more (the original fp weights)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            delattr(owner, leaf)


class RewriteLinears(GraphPass):
    """Needs analysis annotations and a Plan; ensures one clq node per quantized layer."""

    name = "rewrite_linears"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        transformed: dict[int, fx.Node] = {}
        modified = False
        for node in annotated_linears(gm):
            lp = self.plan.layers.get(linear_info(node).name)
            if lp is None or not lp.quantized:
                continue
            tp = self.plan.transform_of(lp)
            packed = pack_weight(weight_tensor(gm, node), lp, tp)
            x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
            base = f"clq_{_safe(lp.name)}"
            with graph.inserting_before(node):
                if tp is not None:
                    if lp.group not in transformed:
                        transformed[lp.group] = _insert_transform(gm, x, lp.group, tp)
                    x = transformed[lp.group]
                w_q = _const(gm, graph, f"{base}_w_q", packed.w_q)
                w_s = _const(gm, graph, f"{base}_w_scale", packed.w_scale)
                spec = lp.spec
                new = graph.call_function(
                    QUANT_LINEAR,
                    (x, w_q, w_s, bias, spec.w_bits, spec.a_bits, spec.a_group, float(lp.a_clip)),
                )
            new.meta.update({k: v for k, v in node.meta.items()})
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            modified = True
        if modified:
            graph.eliminate_dead_code()
            drop_unused_attributes(gm)
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        n = sum(1 for x in gm.graph.nodes if x.op == "call_function" and x.target == QUANT_LINEAR)
        want = len(self.plan.quantized_layers())
        if n != want:
            raise RuntimeError(f"rewrite left {n} clq.quant_linear nodes, plan has {want}")
