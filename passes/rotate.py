"""Rotation only: apply the plan's transforms (online) and fold their inverse into the
float weights, quantizing nothing. The model's output must not change beyond float
error; tests hold every transform recipe to that."""

from __future__ import annotations

import torch
import torch.fx as fx

from clq_compile.annotations import annotated_linears, linear_info
from clq_compile.passes.find_linears import weight_tensor
from clq_compile.passes.infra import GraphPass, PassResult
from clq_compile.passes.rewrite import _const, _insert_transform, _safe, drop_unused_attributes
from clq_compile.plan import Plan
from clq_compile.qlinear import fold_weight

aten = torch.ops.aten


class RotateLinears(GraphPass):
    name = "rotate_linears"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        transformed: dict[int, fx.Node] = {}
        for node in annotated_linears(gm):
            lp = self.plan.layers.get(linear_info(node).name)
            tp = self.plan.transform_of(lp) if lp is not None and lp.quantized else None
            if tp is None:
                continue
            if lp.group not in transformed:
                transformed[lp.group] = _insert_transform(gm, node.args[0], lp.group, tp)
            w = fold_weight(weight_tensor(gm, node), tp)
            with graph.inserting_before(node):
                w_node = _const(gm, graph, f"clq_{_safe(lp.name)}_w_rot", w)
            node.args = (transformed[lp.group], w_node, *node.args[2:])
        if transformed:
            graph.eliminate_dead_code()
            drop_unused_attributes(gm)
            gm.recompile()
        return PassResult(gm, bool(transformed))
