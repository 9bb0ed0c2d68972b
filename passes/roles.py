"""Analysis: the role of each linear, read from graph structure, never from module names.

Rules, in priority order (each a small function so the set reads as data):
- outside the repeated blocks: "embed" before them, "final" after them;
- input of rank 2 (one vector per sample, e.g. adaLN on the timestep embedding) in a
  graph whose other linears read token sequences (rank >= 3): "modulation"; in a graph
  of rank-2 inputs only (a plain MLP on vectors) rank 2 is the data itself;
- feeds an SDPA query/key/value through reshapes, norms and RoPE: "attn_q/k/v", or
  "cross_q/k/v" when keys/values read other tensors than the queries;
- reads an SDPA output through reshapes only: "attn_out";
- feeds another linear through an activation: "mlp_up"; that other linear: "mlp_down".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.fx as fx

from clq_compile.annotations import LinearInfo, annotated_linears, linear_info
from clq_compile.passes.blocks import BLOCK_KEY
from clq_compile.passes.graph_utils import is_sdpa, rank, reach_back, reach_forward
from clq_compile.passes.infra import GraphPass, PassResult

ROLES = ("embed", "final", "modulation", "attn_q", "attn_k", "attn_v", "cross_q", "cross_k",
         "cross_v", "attn_out", "mlp_up", "mlp_down", "other")

# Ops that move or relabel data without mixing tokens: followed when tracing a value.
RESHAPE_OPS = frozenset(
    {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "contiguous",
     "clone", "to", "dropout", "getitem", "slice", "split", "chunk", "cat", "flatten",
     "unflatten", "expand", "type_as", "_to_copy", "alias", "unbind", "narrow",
     "split_with_sizes", "unsafe_view", "_unsafe_view", "assert_tensor_metadata"}
)
ACTIVATION_OPS = frozenset(
    {"gelu", "silu", "relu", "tanh", "sigmoid", "mul", "softplus", "mish", "erf", "pow"}
)
# Queries and keys may pass through QK-norm and rotary embeddings on the way to SDPA.
QK_OPS = RESHAPE_OPS | ACTIVATION_OPS | {"layer_norm", "rms_norm", "native_layer_norm", "add",
                                         "sub", "div", "neg", "stack", "float", "type", "rsqrt",
                                         "mean"}


def _sdpa_arg(node: fx.Node, i: int, name: str) -> fx.Node | None:
    a = node.args[i] if len(node.args) > i else node.kwargs.get(name)
    return a if isinstance(a, fx.Node) else None


def _assign(nodes: Iterable[fx.Node], role: str) -> None:
    for n in nodes:
        info = linear_info(n)
        if info is not None and info.role == "other":
            info.role = role


def _outside_blocks(linears: list[fx.Node], gm: fx.GraphModule) -> None:
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min((position[n] for n in gm.graph.nodes if n.meta.get(BLOCK_KEY) is not None),
                default=None)
    for n in linears:
        info = linear_info(n)
        if info.block is None:
            info.role = "embed" if first is None or position[n] < first else "final"


def _per_sample(linears: list[fx.Node], gm: fx.GraphModule) -> None:
    if not any((rank(n.args[0]) or 0) >= 3 for n in linears):
        return
    for n in linears:
        if rank(n.args[0]) == 2:
            _assign([n], "modulation")


def _attention(linears: list[fx.Node], gm: fx.GraphModule) -> None:
    for s in (n for n in gm.graph.nodes if is_sdpa(n)):
        q, k, v = (reach_back(a, QK_OPS) if a is not None else set()
                   for a in (_sdpa_arg(s, 0, "query"), _sdpa_arg(s, 1, "key"),
                             _sdpa_arg(s, 2, "value")))
        q_in = {n.args[0] for n in q}
        kv_in = {n.args[0] for n in k | v}
        prefix = "cross" if q_in and kv_in and not (q_in & kv_in) else "attn"
        _assign(q, f"{prefix}_q")
        _assign(k, f"{prefix}_k")
        _assign(v, f"{prefix}_v")
        _assign(reach_forward(s, RESHAPE_OPS), "attn_out")


def _mlp(linears: list[fx.Node], gm: fx.GraphModule) -> None:
    for n in linears:
        downs = {d for d in reach_forward(n, RESHAPE_OPS | ACTIVATION_OPS)
                 if linear_info(d) is not None and linear_info(d).block == linear_info(n).block}
        if downs:
            _assign([n], "mlp_up")
            _assign(downs, "mlp_down")


RoleRule = Callable[[list[fx.Node], fx.GraphModule], None]
ROLE_RULES: tuple[RoleRule, ...] = (_outside_blocks, _per_sample, _attention, _mlp)


class AssignRoles(GraphPass):
    name = "assign_roles"

    def __init__(self, rules: tuple[RoleRule, ...] = ROLE_RULES) -> None:
        self.rules = rules

    def call(self, gm: fx.GraphModule) -> PassResult:
        linears = annotated_linears(gm)
        for rule in self.rules:
            rule(linears, gm)
        return PassResult(gm, False)


def roles(gm: fx.GraphModule) -> dict[str, str]:
    return {info.name: info.role for info in map(linear_info, annotated_linears(gm))}


__all__ = ["ROLES", "AssignRoles", "LinearInfo", "ROLE_RULES", "roles"]
