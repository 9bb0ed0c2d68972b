"""Analysis: each linear's cross-layer chain, the quantizable linears downstream of it
within ``window`` blocks, in dependency (graph) order. CLPS searches its target here."""

from __future__ import annotations

import torch.fx as fx

from clq_compile.annotations import annotated_linears, linear_info
from clq_compile.passes.infra import GraphPass, PassResult


class CrossLayerChains(GraphPass):
    name = "cross_layer_chains"

    def __init__(self, window: int = 3) -> None:
        self.window = window

    def call(self, gm: fx.GraphModule) -> PassResult:
        position = {n: i for i, n in enumerate(gm.graph.nodes)}
        for n in annotated_linears(gm):
            info = linear_info(n)
            if info.block is None:
                continue
            reach: set[fx.Node] = set()
            stack = list(n.users)
            while stack:
                u = stack.pop()
                if u in reach:
                    continue
                b = u.meta.get("clq_segment", -1)
                if b > info.block + self.window:
                    continue  # segments are monotone: nothing past here is in the window
                reach.add(u)
                stack.extend(u.users)
            down = sorted((u for u in reach if linear_info(u) is not None), key=position.get)
            info.chain = [
                linear_info(u).name
                for u in down
                if linear_info(u).block is not None
                and linear_info(u).block <= info.block + self.window
                and not linear_info(u).skip_reason
            ]
        return PassResult(gm, False)
