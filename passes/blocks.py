"""Analysis: which repeated block each node belongs to, in execution order."""

from __future__ import annotations

import torch.fx as fx

from clq_compile.passes.graph_utils import block_containers, block_key, module_path
from clq_compile.passes.infra import GraphPass, PassResult

BLOCK_KEY = "clq_block"
SEGMENT_KEY = "clq_segment"


class AnnotateBlocks(GraphPass):
    """Sets ``meta["clq_block"]`` (module-level block index or None) and
    ``meta["clq_segment"]``: the execution segment, monotone along data flow, so the
    calibration runner can stream the graph block by block (prologue = -1).

    A graph without repeated blocks is one block: that is what a regionally compiled
    transformer block looks like to a torch.compile backend."""

    name = "annotate_blocks"

    def call(self, gm: fx.GraphModule) -> PassResult:
        order: dict[str, int] = {}
        containers = block_containers([module_path(n) for n in gm.graph.nodes])
        for node in gm.graph.nodes:
            key = block_key(module_path(node), containers)
            if key is not None and key not in order:
                order[key] = len(order)
            node.meta[BLOCK_KEY] = order[key] if key is not None else None
        if not order:
            order[""] = 0
            for node in gm.graph.nodes:
                node.meta[BLOCK_KEY] = 0
        for node in gm.graph.nodes:
            inputs = [a.meta[SEGMENT_KEY] for a in node.all_input_nodes]
            own = node.meta[BLOCK_KEY]
            seg = max([-1, *inputs] + ([own] if own is not None else []))
            node.meta[SEGMENT_KEY] = seg
        gm.meta["clq_num_blocks"] = len(order)
        return PassResult(gm, False)


def num_blocks(gm: fx.GraphModule) -> int:
    return int(gm.meta.get("clq_num_blocks", 0))
