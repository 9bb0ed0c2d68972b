"""What every recipe config shares, and what a plan builder receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from clq_compile.annotations import annotated_linears, linear_info
from clq_compile.calibration import GraphRunner
from clq_compile.passes.find_linears import weight_tensor
from clq_compile.plan import LayerPlan, Plan
from clq_compile.spec import QuantSpec


@dataclass(frozen=True)
class RecipeConfig:
    """Options every recipe takes. ``w_group``/``a_group`` 0 = per channel / per token."""

    name: ClassVar[str] = ""
    w_group: int = 0
    a_group: int = 0
    skip_roles: tuple[str, ...] = ("embed", "modulation", "final")
    window: int = 3  # blocks downstream that cross-layer chains cover
    needs_calibration: ClassVar[bool] = False


@dataclass
class PlanContext:
    """An analyzed graph, its calibration set and the spec; shared by every recipe."""

    gm: fx.GraphModule
    spec: QuantSpec
    flat_calib: list[list[Any]]
    runner: GraphRunner
    nodes: dict[str, fx.Node] = field(default_factory=dict)  # layer name -> linear node

    def __post_init__(self) -> None:
        self.nodes = {linear_info(n).name: n for n in annotated_linears(self.gm)}

    def weight(self, name: str) -> torch.Tensor:
        return weight_tensor(self.gm, self.nodes[name])

    def bias(self, name: str) -> torch.Tensor | None:
        node = self.nodes[name]
        b = node.args[2] if len(node.args) > 2 else None
        if isinstance(b, fx.Node) and b.op == "get_attr":
            return self.runner._attr(b.target)
        return None

    def base_plan(self, recipe: str) -> Plan:
        """One LayerPlan per linear: the spec where quantized, the reason where skipped."""
        plan = Plan(recipe=recipe, spec=self.spec)
        for name, node in self.nodes.items():
            info = linear_info(node)
            plan.layers[name] = LayerPlan(
                name=name, role=info.role, block=info.block, in_features=info.in_features,
                out_features=info.out_features, group=info.group,
                spec=None if info.skip_reason else self.spec, skip_reason=info.skip_reason,
            )
        return plan
