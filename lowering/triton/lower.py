"""Lower a rewritten graph's ``clq`` ops to the ``clq_triton`` triton_ops, once, at
compile time, so Inductor compiles the kernels instead of calling an opaque op.

Per ``clq::quant_linear`` node the pass takes the decision the eager dispatch takes per
call (``dispatch.plan_linear``: route, checks), from the shapes a fake run of the graph
gives, and makes the derived operands then: the rotation's kernel form from its graph
constant, and the route's weight (int8 / fp8 unpacked) as a new constant, or, for a
weight that arrives at run time (the ``clq`` backend's packers), as a conversion the
caller applies to that input (:attr:`LowerToKernels.derive`). A node it cannot lower
stays a ``clq`` op (its eager dispatch, with the reference fallback, still serves it) and
the reason is logged at WARNING (once per reason) and kept in
:attr:`LowerToKernels.declined`.

What a real launch can still refuse (every autotune config too big for the GPU) cannot
fall back inside a compiled graph; ``compile_check`` keeps the default configs within
sm_80/89/90 limits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from clq_compile.errors import ConfigError
from clq_compile.lowering.triton import dispatch
from clq_compile.lowering.triton.support import Unsupported
from clq_compile.passes.find_linears import fetch_attr
from clq_compile.passes.graph_utils import call_arguments
from clq_compile.passes.infra import GraphPass, PassResult
from clq_compile.passes.rewrite import QUANT_LINEAR, TRANSFORM, const_node, safe_name

log = logging.getLogger(__name__)
_CAT = torch.ops.aten.cat.default


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


class LowerToKernels(GraphPass):
    """``clq.quant_linear`` / ``clq.transform`` → ``clq_triton.*`` where the kernels take
    the call. ``example_inputs``: the graph's inputs (shapes, dtypes, devices); the graph's
    constants must be real tensors. ``capability``: the GPU's (default: asked of the
    device the activations are on); given, it picks routes for another GPU generation."""

    name = "lower-to-kernels"

    def __init__(self, example_inputs: Sequence[Any],
                 capability: tuple[int, int] | None | str = "device") -> None:
        if not (capability in ("device", None) or (
                isinstance(capability, tuple) and len(capability) == 2
                and all(isinstance(v, int) for v in capability))):
            raise ConfigError(f"option capability={capability!r}; choose 'device', None or "
                              "a (major, minor) pair such as (9, 0)")
        self.example_inputs = list(example_inputs)
        self.capability = capability
        self.declined: dict[str, str] = {}
        # placeholder index -> (w_bits, route): that input is a packed weight the caller
        # converts with routes.unpacked_weight before each call (cached per tensor).
        self.derive: dict[int, tuple[int, str]] = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        dispatch.register()
        dispatch.kernels("kernel_ops")  # defines torch.ops.clq_triton
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        FakeTensorProp(gm, mode).propagate(*self.example_inputs)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (QUANT_LINEAR, TRANSFORM):
                continue
            try:
                lower = self._linear if node.target == QUANT_LINEAR else self._transform
                lower(gm, node, placeholders)
                modified = True
            except Unsupported as e:
                self.declined[node.name] = str(e)
        for reason in dict.fromkeys(self.declined.values()):  # once per reason, in order
            names = [k for k, v in self.declined.items() if v == reason]
            log.warning("%d call(s) stay clq ops, not lowered to the kernels (%s): %s",
                        len(names), ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""),
                        reason)
        if modified:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def _device(self, x: torch.Tensor) -> tuple[int, int] | None:
        reason = dispatch.device_reason(x)
        if reason:
            raise Unsupported(reason)
        if self.capability == "device":
            return dispatch.capability_of(x.device)
        return self.capability  # type: ignore[return-value]

    def _rotation(self, gm: fx.GraphModule, rot: Any, device: torch.device
                  ) -> tuple[torch.Tensor | None, int]:
        if rot is None:
            return None, 1
        if not (isinstance(rot, fx.Node) and rot.op == "get_attr"):
            raise Unsupported("the rotation is not a graph constant; its kernel form is "
                              "made from its values at compile time")
        return dispatch.rotation_operand(fetch_attr(gm, rot.target), device)

    def _check_weight(self, w: fx.Node, route: str) -> None:
        """Raise unless ``w`` is a constant, an input, or a cat of those along N."""
        if w.op in ("get_attr", "placeholder"):
            return
        if w.target == _CAT and (len(w.args) < 2 or w.args[1] == 0):
            for part in w.args[0]:
                self._check_weight(part, route)
            return
        raise Unsupported(f"weight {w.name} is computed in the graph ({w.target}); the "
                          f"{route} route's unpacked weight is made once, outside it")

    def _weight(self, gm: fx.GraphModule, node: fx.Node, w: fx.Node, call: Any,
                placeholders: list[fx.Node]) -> fx.Node:
        """The node giving this call's GEMM weight, derived from the packed one ``w``
        (checked by :meth:`_check_weight` first, so nothing is made for a declined call)."""
        if call.route == "packed" or call.a_bits == 16:
            return w
        if w.op == "get_attr":
            with gm.graph.inserting_before(node):
                # Not cached: the constant is the one copy (the cache would be a second).
                return const_node(gm, f"{safe_name(w.target)}_{call.route}",
                                  call.weight(fetch_attr(gm, w.target), cached=False))
        if w.op == "placeholder":
            self.derive[placeholders.index(w)] = (call.w_bits, call.route)
            return w
        parts = [self._weight(gm, node, p, call, placeholders) for p in w.args[0]]
        with gm.graph.inserting_before(node):
            return gm.graph.call_function(_CAT, (parts, 0))

    def _tile(self, gm: fx.GraphModule, node: fx.Node, rot: Any, tile: torch.Tensor | None
              ) -> fx.Node | None:
        if tile is None:
            return None
        with gm.graph.inserting_before(node):
            return const_node(gm, f"{rot.target}_kernel", tile)

    def _linear(self, gm: fx.GraphModule, node: fx.Node, placeholders: list[fx.Node]) -> None:
        a = call_arguments(node)
        x = _val(a["x"])
        cap = self._device(x)
        call = dispatch.plan_linear(
            x, _val(a["w_q"]), _val(a["w_scale"]), a["w_bits"], a["a_bits"], a["a_group"],
            a["a_clip"], _val(a["perm"]), _val(a["smooth"]), _val(a["rot"]), a["prologue"],
            a["a_format"], a["w_format"], a["a8_rows"] is not None, capability=cap,
            pro_mul=_val(a["pro_mul"]), pro_add=_val(a["pro_add"]), norm_eps=a["norm_eps"],
            pro_fp32=a["pro_fp32"])
        if call.route != "packed" and call.a_bits < 16:
            self._check_weight(a["w_q"], call.route)
        tile, outer = self._rotation(gm, a["rot"], x.device)
        # Every check passed: from here on, nodes and constants are made.
        w = self._weight(gm, node, a["w_q"], call, placeholders)
        tile_node = self._tile(gm, node, a["rot"], tile)
        _replace(gm, node, torch.ops.clq_triton.quant_linear.default,
                 (a["x"], w, a["w_scale"], a["bias"], a["perm"], a["smooth"], tile_node, outer,
                  a["pro_mul"], a["pro_add"], *call.args()))

    def _transform(self, gm: fx.GraphModule, node: fx.Node, placeholders: list[fx.Node]
                   ) -> None:
        a = call_arguments(node)
        x = _val(a["x"])
        self._device(x)
        dispatch.plan_transform(x, _val(a["perm"]), _val(a["smooth"]), _val(a["rot"]),
                                a["prologue"], _val(a["pro_mul"]), _val(a["pro_add"]),
                                a["pro_fp32"])
        tile, outer = self._rotation(gm, a["rot"], x.device)
        tile_node = self._tile(gm, node, a["rot"], tile)
        _replace(gm, node, torch.ops.clq_triton.transform.default,
                 (a["x"], a["perm"], a["smooth"], tile_node, outer, a["pro_mul"],
                  a["pro_add"], a["prologue"], float(a["norm_eps"]), bool(a["pro_fp32"])))


def _replace(gm: fx.GraphModule, node: fx.Node, target: Any, args: tuple) -> None:
    """``node`` becomes a call of ``target`` with ``args``, keeping its meta."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def lowered_ops(gm: fx.GraphModule) -> dict[str, int]:
    """How many nodes call each ``clq`` / ``clq_triton`` op (what ``inspect`` and tests
    read to see what was lowered)."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "namespace", None) in ("clq",
                                                                                "clq_triton"):
            key = str(n.target)
            counts[key] = counts.get(key, 0) + 1
    return counts
