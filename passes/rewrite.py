"""The one rewrite from a Plan to a graph: each planned ``linear`` reads its input through
one shared ``clq.transform`` per input group, and its weight from a *weight source*:

- ``"packed"``: packed int4/int8 constants computed now (``clq.quantize``, ``clq.load``);
- ``"runtime"``: a ``WeightPacker`` that packs whatever weight arrives at call time (the
  torch.compile backend, where weights are graph inputs);
- ``"float"``: the transform's inverse folded into a float weight, nothing quantized (the
  rotation-only check: the output must not change beyond float error).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.fx as fx

from clq_compile.annotations import LAYERS_KEY, annotated_linears, layer_names, linear_info
from clq_compile.digest import content_key
from clq_compile.passes.find_linears import weight_tensor
from clq_compile.passes.infra import GraphPass, PassResult
from clq_compile.plan import LayerPlan, Plan, TimestepPolicy, TransformPlan, timestep_rows
from clq_compile.qlinear import fold_weight, planned_weight
from clq_compile.weight_cache import WeightPacker

QUANT_LINEAR = torch.ops.clq.quant_linear.default
TRANSFORM = torch.ops.clq.transform.default


def safe_name(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def const_node(gm: fx.GraphModule, name: str, t: torch.Tensor | None) -> fx.Node | None:
    """A buffer holding ``t``; equal constants (every group's Hadamard block) share one."""
    if t is None:
        return None
    t = t.detach().contiguous()
    shared = gm.meta.setdefault("clq_consts", {})
    key = (*content_key(t), t.device.type)
    if key not in shared or not hasattr(gm, shared[key]):
        gm.register_buffer(name, t.clone())
        shared[key] = name
    return gm.graph.get_attr(shared[key])


def _insert_transform(gm: fx.GraphModule, x: fx.Node, group: int, tp: TransformPlan) -> fx.Node:
    """One transform node right after its input (after all placeholders if x is one)."""
    graph = gm.graph
    anchor = x
    if x.op == "placeholder":
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(anchor):
        t = graph.call_function(TRANSFORM, (x, None, None, None))
    val = x.meta.get("val")
    if isinstance(val, torch.Tensor):  # the transform's constants live where x does
        tp = tp.on(val.device)
    with graph.inserting_before(t):
        consts = [const_node(gm, f"clq_t{group}_{k}", getattr(tp, k))
                  for k in ("perm", "smooth", "rot")]
    t.args = (x, *consts)
    return t


def _insert_policy_rows(gm: fx.GraphModule, policy: TimestepPolicy) -> fx.Node:
    """The timestep policy's rows for this call's samples, (samples, blocks) bool, computed
    once after the placeholders from the timestep input (``timestep_rows``: tensor ops)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    t = next((p for p in placeholders if p.name == policy.input), None)
    if t is None:
        raise ValueError(f"the plan's timestep policy reads graph input {policy.input!r}; "
                         f"this graph's inputs are {[p.name for p in placeholders]}")
    val = t.meta.get("val")
    device = val.device if isinstance(val, torch.Tensor) else "cpu"
    with graph.inserting_after(placeholders[-1]):
        rows = graph.call_function(timestep_rows, (t, None, None))
    with graph.inserting_before(rows):
        rows.args = (t, const_node(gm, "clq_timestep_times", policy.times.to(device)),
                     const_node(gm, "clq_timestep_a8", policy.a8.to(device)))
    return rows


def _getitem(t: tuple, i: int) -> torch.Tensor:
    return t[i]


# A weight source: (gm, linear node, plan, layer plan) -> (w_q, w_scale, low-rank
# (up, down) or None) nodes, inserted before the linear.
Branch = tuple[fx.Node, fx.Node] | None
WeightSource = Callable[[fx.GraphModule, fx.Node, Plan, LayerPlan],
                        tuple[fx.Node, fx.Node, Branch]]
LINEAR = torch.ops.aten.linear.default
ADD = torch.ops.aten.add.Tensor
TO_COPY = torch.ops.aten._to_copy.default
SELECT = torch.ops.aten.select.int


def packed_constants(gm: fx.GraphModule, node: fx.Node, plan: Plan,
                     lp: LayerPlan) -> tuple[fx.Node, fx.Node]:
    packed = planned_weight(plan, lp, weight_tensor(gm, node))
    base = f"clq_{safe_name(lp.name)}"
    branch = None
    if packed.up is not None:
        branch = (const_node(gm, f"{base}_lr_up", packed.up), const_node(gm, f"{base}_lr_down",
                                                                  packed.down))
    return (const_node(gm, f"{base}_w_q", packed.w_q),
            const_node(gm, f"{base}_w_scale", packed.w_scale), branch)


def runtime_packer(gm: fx.GraphModule, node: fx.Node, plan: Plan,
                   lp: LayerPlan) -> tuple[fx.Node, fx.Node]:
    if lp.name in plan.weights:
        raise ValueError(f"layer {lp.name}: a solved (GPTQ) weight cannot be re-packed from "
                         "the weight that arrives at call time")
    name = f"clq_pack_{safe_name(lp.name)}"
    gm.add_submodule(name, WeightPacker(lp, plan.transform_of(lp)))
    packed = gm.graph.call_module(name, (node.args[1],))
    return (gm.graph.call_function(_getitem, (packed, 0)),
            gm.graph.call_function(_getitem, (packed, 1)), None)


WEIGHT_SOURCES: dict[str, WeightSource] = {"packed": packed_constants, "runtime": runtime_packer}
MODES = (*WEIGHT_SOURCES, "float")


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters/buffers no get_attr reads any more (the original fp weights)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            delattr(owner, leaf)


class RewriteLinears(GraphPass):
    """Needs analysis annotations and a Plan; ensures one ``clq.quant_linear`` per
    quantized layer (weight sources) or one folded float linear per transformed layer."""

    name = "rewrite_linears"

    def __init__(self, plan: Plan, weights: str = "packed") -> None:
        if weights not in MODES:
            raise ValueError(f"unknown weight source {weights!r}; choose from {MODES}")
        self.plan, self.weights = plan, weights

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        transformed: dict[int, fx.Node] = {}
        policy = self.plan.timesteps
        rows: fx.Node | None = None  # the policy's (samples, blocks) flags
        columns: dict[int, fx.Node] = {}  # policy column -> its (samples,) flags
        modified = False
        for node in annotated_linears(gm):
            lp = self.plan.layers.get(linear_info(node).name)
            if lp is None or not lp.quantized:
                continue
            tp = self.plan.transform_of(lp)
            if self.weights == "float" and tp is None:
                continue
            x, bias = node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if tp is not None:
                if lp.group not in transformed:
                    transformed[lp.group] = _insert_transform(gm, x, lp.group, tp)
                x = transformed[lp.group]
            with graph.inserting_before(node):
                if self.weights == "float":
                    w = const_node(gm, f"clq_{safe_name(lp.name)}_w_rot",
                               fold_weight(weight_tensor(gm, node), tp))
                    node.args = (x, w, *node.args[2:])
                    modified = True
                    continue
                w_q, w_s, branch = WEIGHT_SOURCES[self.weights](gm, node, self.plan, lp)
                spec, kwargs = lp.spec, dict(lp.spec.op_kwargs)
                col = None if policy is None else policy.column(lp)
                if col is not None:
                    if col not in columns:
                        if rows is None:
                            rows = _insert_policy_rows(gm, policy)
                        with graph.inserting_after(rows):
                            columns[col] = graph.call_function(SELECT, (rows, 1, col))
                    kwargs["a8_rows"] = columns[col]
                new = graph.call_function(
                    QUANT_LINEAR,
                    (x, w_q, w_s, bias, spec.w_bits, spec.a_bits, spec.a_group, float(lp.a_clip)),
                    kwargs,
                )
                new.meta.update(node.meta)  # the layer's annotations stay on its quant_linear
                new.meta[LAYERS_KEY] = [lp.name]
                if branch is not None:  # quant_linear(x) + (x·downᵀ)·upᵀ, as quantized_linear
                    dtype = {"dtype": weight_tensor(gm, node, load=False).dtype}
                    up, down = (graph.call_function(TO_COPY, (t,), dtype) for t in branch)
                    low = graph.call_function(LINEAR, (graph.call_function(LINEAR, (x, down)), up))
                    new = graph.call_function(ADD, (new, low))

            node.replace_all_uses_with(new)
            graph.erase_node(node)
            modified = True
        if modified:
            graph.eliminate_dead_code()
            drop_unused_attributes(gm)
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        if self.weights == "float":
            return
        ensure_planned_layers(gm, self.plan)


def quant_linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == QUANT_LINEAR]


def ensure_planned_layers(gm: fx.GraphModule, plan: Plan) -> None:
    """Every quantized layer of the plan is computed by exactly one quant_linear node."""
    got = [name for n in quant_linear_nodes(gm) for name in layer_names(n)]
    want = sorted(lp.name for lp in plan.quantized_layers())
    if sorted(got) != want:
        raise RuntimeError(f"the graph's clq.quant_linear nodes compute {len(got)} layers "
                           f"({len(set(got))} distinct), the plan quantizes {len(want)}")
