"""Helpers shared by passes: op families at both IR levels, shapes, module paths.

The same analysis runs on torch.export graphs (``aten.linear.default``) and on the Dynamo
graphs a torch.compile backend receives (``torch._C._nn.linear``), so ops are matched by
family, never by one spelling.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from clq_compile.ops import GELU_PROLOGUES

aten = torch.ops.aten

LINEAR_TARGETS = frozenset({aten.linear.default, torch._C._nn.linear, F.linear})
SDPA_TARGETS = frozenset(
    {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}
)
GELU_TARGETS = frozenset({aten.gelu.default, torch._C._nn.gelu, F.gelu})
DROPOUT_TARGETS = frozenset({aten.dropout.default, F.dropout, torch.dropout})


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


NORM_OPS = frozenset({"layer_norm", "rms_norm"})


def is_norm(node: fx.Node) -> bool:
    """A LayerNorm/RMSNorm returning the normalized tensor (both IR levels)."""
    return node.op == "call_function" and op_name(node) in NORM_OPS


def _reach(node: fx.Node, forward: bool, through: frozenset[str],
           hit: Callable[[fx.Node], bool], limit: int) -> set[fx.Node]:
    found, stack, seen = set(), [node], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        for m in (n.users if forward else n.all_input_nodes):
            if m in seen:
                continue
            seen.add(m)
            if hit(m):
                if not forward or (m.args and m.args[0] is n):
                    found.add(m)
            elif m.op == "call_function" and op_name(m) in through:
                stack.append(m)
    return found


def reach_forward(node: fx.Node, through: frozenset[str],
                  hit: Callable[[fx.Node], bool] = is_linear, limit: int = 64) -> set[fx.Node]:
    """Nodes ``hit`` selects that read ``node`` (as their data input, ``args[0]``) directly
    or through ``through`` ops; the walk stops at a hit."""
    return _reach(node, True, through, hit, limit)


def reach_back(node: fx.Node, through: frozenset[str],
               hit: Callable[[fx.Node], bool] = is_linear, limit: int = 64) -> set[fx.Node]:
    """Nodes ``hit`` selects that ``node`` reads directly or through ``through`` ops."""
    return _reach(node, False, through, hit, limit)


def gelu_kind(node: fx.Node) -> str | None:
    """"gelu" or "gelu_tanh" (``clq_compile.ops.GELU_PROLOGUES``) for a GELU node, else None."""
    if node.op != "call_function" or node.target not in GELU_TARGETS:
        return None
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return next((k for k, v in GELU_PROLOGUES.items() if v == approximate), None)


def is_inert_dropout(node: fx.Node) -> bool:
    """A dropout that is the identity: eval mode (export keeps ``aten.dropout`` with
    train=False; Dynamo ``F.dropout(x, p, training=False)``) or p = 0."""
    if node.op != "call_function" or node.target not in DROPOUT_TARGETS:
        return False
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    train = node.kwargs.get("train", node.kwargs.get("training",
                                                     node.args[2] if len(node.args) > 2 else True))
    return train is False or p == 0


CAST_OPS = frozenset({"to", "to_copy", "type_as", "float", "type"})


def is_cast(node: fx.Node) -> bool:
    """A dtype cast (``to``, ``float``, ``type_as``; Dynamo's method calls too)."""
    name = node.target if node.op == "call_method" else op_name(node)
    return node.op in ("call_function", "call_method") and name in CAST_OPS and bool(node.args)


def is_inert_cast(node: fx.Node) -> bool:
    """A dtype cast that changes nothing (same dtype, shape and device in and out), as a
    model's ``x.float()`` / ``.type_as(x)`` is when it already runs in fp32."""
    if not is_cast(node):
        return False
    src, out = node.args[0], val(node)
    src = val(src) if isinstance(src, fx.Node) else None
    return (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and
            (src.dtype, src.shape, src.device) == (out.dtype, out.shape, out.device))


def data_users(node: fx.Node) -> list[fx.Node]:
    """The users that read ``node``'s value: not export's ``_assert_tensor_metadata``
    checks, which only guard its dtype and die with it."""
    return [u for u in node.users if op_name(u) != "assert_tensor_metadata"]


def op_name(node: fx.Node) -> str:
    """A short lowercase name of what a node computes ("view", "gelu", "linear", ...)."""
    if node.op != "call_function":
        return node.op
    t = node.target
    name = getattr(t, "__name__", None) or str(t)
    if hasattr(t, "_opname"):  # OpOverload: aten.view.default -> "view"
        name = t._opname
    return name.lower().strip("_")


def call_arguments(node: fx.Node) -> dict[str, Any] | None:
    """A call's arguments by name, defaults filled in (an aten overload by its schema, a
    Python function by its signature); None when neither can be read."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        out = {}
        for i, a in enumerate(schema.arguments):
            if i < len(node.args):
                out[a.name] = node.args[i]
            else:
                out[a.name] = node.kwargs.get(
                    a.name, a.default_value if a.has_default_value() else None)
        return out
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def val(node: fx.Node):
    """The example/fake value recorded on a node (export: "val", Dynamo: "example_value")."""
    return node.meta.get("val", node.meta.get("example_value"))


def rank(node: fx.Node) -> int | None:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


_SELF_PREFIX = re.compile(r"^L\['self'\]\.?")
_INDEX = re.compile(r"\[(\d+)\]")
_MODULES = re.compile(r"_modules\['([^']+)'\]")


def normalize_path(path: str) -> str:
    """Dynamo spells module paths "L['self'].blocks[0].attn"; export "blocks.0.attn"."""
    path = _MODULES.sub(r"\1", path)
    path = _SELF_PREFIX.sub("", path)
    path = _INDEX.sub(r".\1", path)
    return path.replace("..", ".").strip(".")


def module_path(node: fx.Node) -> str:
    """Innermost module path of a node, from ``nn_module_stack``; "" when unknown."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return normalize_path(path)


def block_containers(paths: list[str]) -> set[str]:
    """Names of the indexed containers that hold repeated blocks ("transformer_blocks").

    A container qualifies when one of its elements holds modules two levels down (an
    attention or MLP holding linears); ``ff.net.0.proj`` or a top-level ``Sequential`` of
    linears does not.
    """
    found = set()
    for path in paths:
        parts = path.split(".")
        for i, p in enumerate(parts):
            if p.isdigit() and i > 0:
                if len(parts) - i - 1 >= 2:
                    found.add(".".join(parts[:i]))
                break
    return found


def block_key(path: str, containers: set[str]) -> str | None:
    """The repeated-block prefix of a module path ("transformer_blocks.3"), if any."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit() and i > 0:
            return ".".join(parts[: i + 1]) if ".".join(parts[:i]) in containers else None
    return None
