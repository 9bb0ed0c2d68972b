"""The norm that follows each attention block: found from graph structure (analysis),
and given its DAC bias from a Plan (rewrite).

From every attention-output linear (role ``attn_out``) the walk goes forward through the
gate, the residual add and reshapes to the first LayerNorm/RMSNorm of the same block
(the norm before a cross-attention or an MLP: diffusers' DiT ``norm3``, PixArt
``norm2``). That norm is where D²Quant's deviation-aware correction
(``clq_compile.dac``) adds its bias; each is marked with the layer it follows, a name
that is the same in every graph of one model.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from clq_compile.annotations import (
    AFTER_ATTENTION_KEY,
    after_attention,
    annotated_linears,
    linear_info,
)
from clq_compile.passes.blocks import BLOCK_KEY
from clq_compile.passes.graph_utils import is_norm, reach_forward
from clq_compile.passes.infra import GraphPass, PassResult
from clq_compile.passes.rewrite import const_node, safe_name
from clq_compile.passes.roles import RESHAPE_OPS
from clq_compile.plan import Plan

ADD = torch.ops.aten.add.Tensor

# The residual branch from an attention output to the next norm: gates, adds, casts.
RESIDUAL_OPS = RESHAPE_OPS | {"mul", "add", "sub", "div", "float", "type"}


class MarkPostAttentionNorms(GraphPass):
    """Needs blocks and roles; sets ``meta["clq_after_attention"]`` on each norm reached.
    A norm two attention outputs reach is the later one's (the nearer)."""

    name = "mark_post_attention_norms"

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in gm.graph.nodes:
            node.meta.pop(AFTER_ATTENTION_KEY, None)
        for lin in annotated_linears(gm):
            info = linear_info(lin)
            if info.role != "attn_out" or info.block is None:
                continue
            for norm in reach_forward(lin, RESIDUAL_OPS, hit=is_norm):
                if norm.meta.get(BLOCK_KEY) == info.block:
                    norm.meta[AFTER_ATTENTION_KEY] = info.name
        return PassResult(gm, False)


def post_attention_norms(gm: fx.GraphModule) -> list[fx.Node]:
    """Marked norms in graph order."""
    return [n for n in gm.graph.nodes if after_attention(n)]


class AddNormBiases(GraphPass):
    """Needs the marks; ensures every DAC bias of the plan is added after its norm:
    ``y = norm(x) + μ`` in the norm's dtype, as ``overrides.add_correction`` computes it
    during calibration."""

    name = "add_norm_biases"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.added: set[str] = set()

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.added = set()
        for norm in post_attention_norms(gm):
            site = after_attention(norm)
            if site not in self.plan.dac:
                continue
            v = norm.meta.get("val")
            like = v if isinstance(v, torch.Tensor) else torch.empty(0)
            with gm.graph.inserting_after(norm):
                bias = const_node(gm, f"clq_dac_{safe_name(site)}",
                              self.plan.dac[site].to(like.device, like.dtype))
            with gm.graph.inserting_after(bias):
                add = gm.graph.call_function(ADD, (norm, bias))
            add.meta.update({k: v for k, v in norm.meta.items() if k != AFTER_ATTENTION_KEY})
            norm.replace_all_uses_with(add, delete_user_cb=lambda u, add=add: u is not add)
            self.added.add(site)
        if self.added:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(self.added))

    def ensures(self, gm: fx.GraphModule) -> None:
        missing = sorted(set(self.plan.dac) - self.added)
        if missing:
            raise RuntimeError(f"the plan's DAC biases after {missing} have no norm site in "
                               "this graph (is it the graph the plan was built on?)")
