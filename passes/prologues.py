"""Fuse the op that produces a quantizer's input into the quantizer (``prologue``), or
into the input transform in front of several quantizers (CLPS gave q, k, v their own).

Each rule is data: it looks at a ``quant_linear``'s or ``transform``'s input node and
returns a :class:`Fusion` (what the op computes instead, and which nodes it replaces), a
string saying why it declines a match, or None when its pattern is not there. A fused
node's output is never written to memory: the kernel reads the producer's input and
computes it in registers (``clq_compile.ops.apply_prologue`` is the reference).

- GELU (an MLP's down-projection input, its widest tensor), through eval-mode dropouts.
- LayerNorm without affine parameters, then adaLN modulation ``* (1 + scale) + shift``
  (either step optional), through casts that change nothing: the input of q/k/v and of
  an MLP in every DiT/PixArt/SD3/Flux/Wan block. The modulation operands must be in x's
  dtype (no type promotion: the kernel computes in x's dtype) and broadcast per sample
  or per token (``ops.modulation_rows``); a norm and modulation run in float32 on a
  float32 copy of a bf16/fp16 x and cast back (Wan) fuse as such (``pro_fp32``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from clq_compile.ops import modulation_rows
from clq_compile.passes.graph_utils import (
    call_arguments,
    data_users,
    gelu_kind,
    is_cast,
    is_inert_cast,
    is_inert_dropout,
    op_name,
    val,
)
from clq_compile.passes.infra import GraphPass, PassResult
from clq_compile.passes.rewrite import QUANT_LINEAR, TRANSFORM

log = logging.getLogger(__name__)

_X = 0


@dataclass(frozen=True)
class Fusion:
    """A match: the quant_linear reads ``source`` and computes ``prologue`` with
    ``kwargs`` (``pro_mul``, ``pro_add``, ``norm_eps``, ``pro_fp32``); ``chain``
    (producer first) is what that replaces."""

    source: fx.Node
    chain: tuple[fx.Node, ...]
    prologue: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    dead: tuple[fx.Node, ...] = ()  # erased too once nothing else reads them


Rule = Callable[[fx.Node], "Fusion | str | None"]


def gelu_rule(x: fx.Node) -> Fusion | str | None:
    chain = [x]  # the GELU, then any inert dropouts after it
    while is_inert_dropout(chain[0]) and len(chain[0].users) == 1:
        chain.insert(0, chain[0].args[0])
    kind = gelu_kind(chain[0])
    if kind is None:
        return None
    return Fusion(chain[0].args[0], tuple(chain), kind)


def _binary(node: fx.Node, name: str) -> tuple[Any, Any] | None:
    """(a, b) of ``a <name> b`` (add with alpha 1 only), else None."""
    if node.op != "call_function" or op_name(node) != name or len(node.args) != 2:
        return None
    if node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"}:
        return None
    return node.args[0], node.args[1]


def _split(node: fx.Node, name: str, is_data: Callable[[Any], bool]) -> tuple[Any, Any] | None:
    """(data side, operand) of a binary ``name`` whose one side ``is_data``."""
    pair = _binary(node, name)
    if pair is None:
        return None
    a, b = pair
    if is_data(a):
        return a, b
    return (b, a) if is_data(b) else None


def _uncast(n: Any) -> tuple[Any, list[fx.Node]]:
    """``n`` with the inert casts in front of it skipped, and those casts (producer
    first): Wan's fp32 norm spells ``x.float()`` / ``.type_as(x)``, identities in fp32."""
    casts: list[fx.Node] = []
    while isinstance(n, fx.Node) and is_inert_cast(n):
        casts.insert(0, n)
        n = n.args[0]
    return n, casts


def _is_norm(n: Any) -> bool:
    n, _ = _uncast(n)
    return isinstance(n, fx.Node) and n.op == "call_function" and op_name(n) == "layer_norm"


def _is_scaled_norm(n: Any) -> bool:
    n, _ = _uncast(n)
    return _is_norm(n) or (isinstance(n, fx.Node) and _split(n, "mul", _is_norm) is not None)


def _operand_reason(name: str, operand: Any, out: torch.Tensor) -> str | None:
    """Why ``operand`` cannot be a fused modulation operand of an output like ``out``."""
    v = val(operand) if isinstance(operand, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return f"the {name} operand {operand!r} is not a tensor node"
    if v.dtype != out.dtype:
        return f"the {name} operand is {v.dtype}, the activation {out.dtype} (type promotion)"
    if modulation_rows(tuple(v.shape), tuple(out.shape)) is None:
        return (f"the {name} operand's shape {tuple(v.shape)} is not one row per sample or "
                f"token of {tuple(out.shape)}")
    return None


def norm_modulate_rule(x: fx.Node) -> Fusion | str | None:
    """LayerNorm (no affine), then ``* m`` and ``+ s``, each optional."""
    node, chain = _uncast(x)  # chain: what the fusion replaces, producer first
    if isinstance(node, fx.Node) and is_cast(node):
        return _in_fp32(x, node, chain)
    kwargs: dict[str, Any] = {}
    for op, name, is_data in (("add", "pro_add", _is_scaled_norm), ("mul", "pro_mul", _is_norm)):
        step = _split(node, op, is_data)
        if step is None:
            continue
        data, kwargs[name] = step
        inner, casts = _uncast(data)
        chain[:0] = [*casts, node]
        node = inner
    if not _is_norm(node):
        return None
    chain.insert(0, node)
    args = call_arguments(node)
    out = val(x)
    if args is None or not isinstance(out, torch.Tensor):
        return f"{node.name}: arguments or output unknown"
    if args.get("weight") is not None or args.get("bias") is not None:
        return f"{node.name} has affine parameters (only the modulation is fused)"
    if list(args["normalized_shape"]) != [out.shape[-1]]:
        return f"{node.name} normalizes over {args['normalized_shape']}, not the last dim"
    src = val(args["input"])
    if not isinstance(src, torch.Tensor) or src.dtype != out.dtype or src.shape != out.shape:
        return f"{node.name}'s input is not shaped and typed as the activation"
    for name in ("pro_mul", "pro_add"):
        if name in kwargs and (reason := _operand_reason(name, kwargs[name], out)):
            return reason
    kwargs["norm_eps"] = float(args["eps"])
    return Fusion(args["input"], tuple(chain), "layer_norm", kwargs)


def _in_fp32(x: fx.Node, cast: fx.Node, after: list[fx.Node]) -> Fusion | str | None:
    """``(norm(x.float()) * m + s).to(x.dtype)`` (Wan's FP32LayerNorm in a bf16 model):
    the rule on the cast's input, computed in float32 by the fused op (``pro_fp32``),
    which reads x itself, not its float32 copy."""
    inner = norm_modulate_rule(cast.args[0])
    if not isinstance(inner, Fusion):
        return inner
    out, wide = val(x), val(cast.args[0])
    src, inert = _uncast(inner.source)  # x.float(), then casts that change nothing
    narrow = (val(src.args[0]) if isinstance(src, fx.Node) and is_cast(src) and
              isinstance(src.args[0], fx.Node) else None)
    if not (isinstance(out, torch.Tensor) and isinstance(wide, torch.Tensor) and
            wide.dtype == torch.float32 and isinstance(narrow, torch.Tensor) and
            (narrow.dtype, narrow.shape) == (out.dtype, out.shape)):
        return (f"{cast.name} casts a normalized tensor that is not computed in float32 from "
                "a float32 copy of x itself")
    return Fusion(src.args[0], (*inner.chain, cast, *after), "layer_norm",
                  {**inner.kwargs, "pro_fp32": True}, dead=(*reversed(inert), src))


RULES: tuple[Rule, ...] = (gelu_rule, norm_modulate_rule)


# Where each op keeps its input transform and its prologue (clq_compile.ops signatures).
_SLOTS = {QUANT_LINEAR: (slice(8, 11), 11), TRANSFORM: (slice(1, 4), 4)}


class FusePrologues(GraphPass):
    """Ensures no ``quant_linear`` or ``transform`` reads a producer some rule of
    ``rules`` fuses (and that nothing else reads)."""

    name = "fuse_prologues"

    def __init__(self, rules: tuple[Rule, ...] = RULES) -> None:
        self.rules = rules

    def _match(self, q: fx.Node) -> Fusion | None:
        _, prologue = _SLOTS[q.target]
        if len(q.args) > prologue or {"pro_mul", "pro_add"} & set(q.kwargs):
            return None
        for rule in self.rules:
            found = rule(q.args[_X])
            if isinstance(found, str):
                log.debug("%s: %s declines: %s", self.name, rule.__name__, found)
            elif found is not None:
                if any(len(data_users(n)) != 1 for n in found.chain):
                    log.debug("%s: %s: %s is also read elsewhere", self.name, rule.__name__,
                              found.chain)
                elif found.chain[-1] in q.args[1:]:
                    log.debug("%s: %s: the input is also an operand", self.name, rule.__name__)
                else:
                    return found
        return None

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for q in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SLOTS]:
            found = self._match(q)
            if found is None:
                continue
            transform, _ = _SLOTS[q.target]
            kept = (*q.args[transform], None, None, None)[:3]
            q.args = (found.source, *q.args[1:transform.start], *kept, found.prologue)
            q.kwargs = {**q.kwargs, **found.kwargs}
            for n in (*reversed(found.chain), *found.dead):
                if n in found.dead and data_users(n):
                    continue
                for check in set(n.users) - set(data_users(n)):
                    gm.graph.erase_node(check)
                gm.graph.erase_node(n)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def fused_prologues(gm: fx.GraphModule) -> dict[str, int]:
    """How many quant_linear / transform nodes compute each prologue (``inspect``)."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _SLOTS:
            _, slot = _SLOTS[n.target]
            name = n.args[slot] if len(n.args) > slot else n.kwargs.get("prologue")
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
    return counts
