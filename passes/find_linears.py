"""Analysis: every linear with a 2-D weight becomes a candidate, with its block and shape."""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from clq_compile.annotations import CHECKPOINT_KEY, META_KEY, LinearInfo
from clq_compile.passes.blocks import BLOCK_KEY
from clq_compile.passes.graph_utils import is_linear, module_path, val
from clq_compile.passes.infra import GraphPass, PassResult


def fetch_attr(gm: fx.GraphModule, target: str, load: bool = True) -> torch.Tensor:
    """The tensor a get_attr reads. A meta tensor of a graph planned from a checkpoint is
    read from it (``load``; without, the meta tensor: shape and dtype only)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if load and isinstance(obj, torch.Tensor) and obj.device.type == "meta":
        ckpt = gm.meta.get(CHECKPOINT_KEY)
        if ckpt is not None:
            return ckpt.get(target, like=obj)
    return obj


def set_attr(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the tensor at ``target`` (a parameter stays a parameter)."""
    owner_name, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if leaf in owner._parameters:
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
        owner._parameters[leaf] = value
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


def weight_tensor(gm: fx.GraphModule, node: fx.Node, load: bool = True) -> torch.Tensor | None:
    """The real weight of a linear: a get_attr constant (export) or the value the
    torch.compile backend attached to a placeholder; None when it only exists at run
    time (a forward input, or computed in the graph)."""
    w = node.args[1]
    if not isinstance(w, fx.Node):
        return None
    if w.op == "get_attr":
        return fetch_attr(gm, w.target, load)
    if "clq_value" in w.meta:  # a real tensor the torch.compile backend attached
        return w.meta["clq_value"]
    return None


def _size(s: int | torch.SymInt) -> int:
    """A static size, or the example size of a dynamic one (-1 when unknown)."""
    if isinstance(s, int):
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)
    return int(hint) if hint is not None else -1


RUNTIME_WEIGHT = "weight is a run-time value (a forward input or computed), not a parameter"


def weight_name(node: fx.Node) -> str:
    w = node.args[1]
    return str(w.target) if w.op == "get_attr" else w.name


class FindLinears(GraphPass):
    """Annotate linears; needs :class:`AnnotateBlocks` to have run."""

    name = "find_linears"

    def requires(self, gm: fx.GraphModule) -> None:
        if any(BLOCK_KEY not in n.meta for n in gm.graph.nodes):
            raise RuntimeError("find_linears needs annotate_blocks to run first")

    def call(self, gm: fx.GraphModule) -> PassResult:
        seen: Counter[str] = Counter()
        for node in gm.graph.nodes:
            if not is_linear(node):
                continue
            w = weight_tensor(gm, node, load=False)
            shape = val(node.args[1]) if w is None and isinstance(node.args[1], fx.Node) else w
            if not isinstance(shape, torch.Tensor) or shape.dim() != 2:
                continue
            path = module_path(node) or node.name
            name = path if not seen[path] else f"{path}#{seen[path]}"
            seen[path] += 1
            node.meta[META_KEY] = LinearInfo(
                name=name,
                block=node.meta[BLOCK_KEY],
                in_features=_size(shape.shape[1]),
                out_features=_size(shape.shape[0]),
                weight=weight_name(node),
                skip_reason="" if w is not None else RUNTIME_WEIGHT,
            )
        return PassResult(gm, False)
