"""Typed annotations the passes attach to nodes: ``node.meta["clq"]`` (a LinearInfo, from
analysis), ``node.meta["clq_layers"]`` (the planned layers a ``clq.quant_linear``
computes, from the rewrite), ``node.meta["clq_after_attention"]`` (on a norm: the
attention-output layer it follows, the site of a DAC bias, see ``clq_compile.dac``), and
the one graph-level key: ``gm.meta["clq_checkpoint"]`` (where a graph's meta-device
weights are read from, see ``clq_compile.checkpoint``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

META_KEY = "clq"
LAYERS_KEY = "clq_layers"
AFTER_ATTENTION_KEY = "clq_after_attention"
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


def after_attention(node: fx.Node) -> str | None:
    """The attention-output layer a norm node follows (its DAC key), or None."""
    key = node.meta.get(AFTER_ATTENTION_KEY)
    return key if isinstance(key, str) else None
