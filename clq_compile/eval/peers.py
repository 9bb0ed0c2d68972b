"""Peer quantizers as rows of the quality harness, run side by side with ours on the same
calibration and held-out calls (optional dependency group ``peers``: torchao).

Each peer quantizes exactly the linears a clq plan quantizes at the same bits (the plan's
roles keep embedders, adaLN modulation and the final projection in full precision), so a
row differs from ours only in how it quantizes, not in what.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from clq_compile.api import plan_model

Factory = Callable[[list[dict[str, Any]]], torch.nn.Module]


def _torchao_configs() -> dict[str, tuple[str, Callable[[], Any]]]:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
    )

    def w4a8(granularity: Any) -> Callable[[], Any]:
        return lambda: Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=granularity)

    return {
        "torchao w8a8": ("w8a8", Int8DynamicActivationInt8WeightConfig),
        "torchao 8da4w": ("w4a8", w4a8(PerAxis(0))),
        "torchao 8da4w g64": ("w4a8", w4a8(PerGroup(64))),
        "torchao int4wo g64": ("w4a16", lambda: IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(64))),
    }


def available_peers() -> dict[str, str]:
    """Peer row name -> the bits it compares with; empty when torchao is not installed."""
    try:
        return {name: bits for name, (bits, _) in _torchao_configs().items()}
    except ImportError:
        return {}


def peer_factory(transformer: torch.nn.Module, name: str) -> Factory:
    """``factory(calib) -> quantized copy of transformer`` for the harness."""
    bits, make = _torchao_configs()[name]

    def build(calib: list[dict[str, Any]]) -> torch.nn.Module:
        from torchao.quantization import quantize_

        _, plan = plan_model(transformer, calib[:1], recipe="rtn", bits=bits)
        names = {lp.name for lp in plan.quantized_layers()}
        model = copy.deepcopy(transformer).eval()
        quantize_(model, make(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
                  and fqn in names)
        return model

    return build
