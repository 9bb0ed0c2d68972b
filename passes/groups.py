"""Analysis: linears that read the same tensor share one online transform (q/k/v)."""

from __future__ import annotations

import torch.fx as fx

from clq_compile.annotations import annotated_linears, linear_info
from clq_compile.passes.infra import GraphPass, PassResult


class SharedInputGroups(GraphPass):
    name = "shared_input_groups"

    def call(self, gm: fx.GraphModule) -> PassResult:
        ids: dict[fx.Node, int] = {}
        for n in annotated_linears(gm):
            src = n.args[0]
            linear_info(n).group = ids.setdefault(src, len(ids))
        return PassResult(gm, False)


def groups(gm: fx.GraphModule) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n in annotated_linears(gm):
        info = linear_info(n)
        out.setdefault(info.group, []).append(info.name)
    return out
