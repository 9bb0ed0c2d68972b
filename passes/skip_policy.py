"""Analysis: which linears stay in full precision, each with its reason recorded.

The policy is data: a role -> reason table plus shape rules; a recipe may pass its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx

from clq_compile.annotations import annotated_linears, linear_info
from clq_compile.passes.infra import GraphPass, PassResult
from clq_compile.spec import QuantSpec

DEFAULT_SKIP_ROLES: Mapping[str, str] = {
    "embed": "embedding/conditioning layer before the blocks (timestep, caption, patch)",
    "modulation": "per-sample conditioning linear (adaLN modulation / timestep MLP)",
    "final": "final projection after the blocks",
}


def shape_skip_reason(k: int, spec: QuantSpec) -> str:
    """Why a linear with reduction size ``k`` cannot take ``spec`` ("" if it can)."""
    if spec.w_bits == 4 and k % 2:
        return f"K={k} is odd: int4 packing needs an even K"
    groups = [("weight", spec.w_group)] + ([("activation", spec.a_group)] if spec.a_bits < 16
                                           else [])
    for what, g in groups:
        if g and k % g:
            return f"K={k} is not divisible by the {what} group size {g}"
    return ""


class SkipPolicy(GraphPass):
    name = "skip_policy"

    def __init__(self, spec: QuantSpec, skip_roles: Mapping[str, str] = DEFAULT_SKIP_ROLES):
        self.spec = spec
        self.skip_roles = dict(skip_roles)

    def call(self, gm: fx.GraphModule) -> PassResult:
        for n in annotated_linears(gm):
            info = linear_info(n)
            info.skip_reason = (info.skip_reason or self.skip_roles.get(info.role, "")
                                or shape_skip_reason(info.in_features, self.spec))
        return PassResult(gm, False)
