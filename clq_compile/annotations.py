"""Typed annotations the passes attach to nodes: ``node.meta["clq"]`` (a LinearInfo, from
analysis) and ``node.meta["clq_layers"]`` (the planned layers a ``clq.quant_linear``
computes, from the rewrite), and the one graph-level key: ``gm.meta["clq_checkpoint"]``
(where a graph's meta-device weights are read from, see ``clq_compile.checkpoint``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

META_KEY = "clq"
LAYERS_KEY = "clq_layers"
CHECKPOINT_KEY = "clq_checkpoint"


@dataclass
class LinearInfo:
    """What analysis knows about one linear node."""

    name: str  # module path, unique per call ("blocks.0.attn.to_q", "#1" on a second call)
    block: int | None  # index in execution order of the repeated blocks; None outside them
    in_features: int
    out_features: int
    weight: str  # graph-level name of the weight (get_attr target or placeholder name)
    role: str = "other"
    group: int = -1  # id of the set of linears reading the same input tensor
    chain: list[str] = field(default_factory=list)  # downstream linears within the window
    skip_reason: str = ""


def linear_info(node: fx.Node) -> LinearInfo | None:
    info = node.meta.get(META_KEY)
    return info if isinstance(info, LinearInfo) else None


def annotated_linears(gm: fx.GraphModule) -> list[fx.Node]:
    """Linear nodes carrying a LinearInfo, in graph order."""
    return [n for n in gm.graph.nodes if linear_info(n) is not None]


def layer_names(node: fx.Node) -> list[str]:
    """The layers a rewritten ``clq.quant_linear`` node computes, in output order (several
    when siblings share one quantized input)."""
    return list(node.meta.get(LAYERS_KEY, ()))
