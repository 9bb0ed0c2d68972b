"""``LinearMemo``: a clip search keeps its layer's transformed inputs and float weights
across trials instead of recomputing them per call. It must not change a single
bit: the kept pieces are the op's reference pieces, and every output here is compared
with ``torch.equal`` against the op path (no memo)."""

from __future__ import annotations

import copy

import pytest
import torch

from clq_compile.api import capture_calls
from clq_compile.build import build_plan, resolve
from clq_compile.calibration import flatten_calls
from clq_compile.hadamard import hadamard
from clq_compile.plan import LayerPlan, TransformPlan
from clq_compile.qlinear import LinearMemo, apply_transform, pack_weight, quantized_linear
from clq_compile.spec import QuantSpec
from clq_compile.testing import OUTLIER_SITES, TINY_MODELS, plant_outliers

K, N = 64, 48
SPECS = {
    "w4a4": QuantSpec(4, 4),
    "w4a8 grouped": QuantSpec(4, 8, w_group=32, a_group=16),
    "w8a8": QuantSpec(8, 8),
    "w4a16": QuantSpec(4, 16),
    "w4a4 lzs": QuantSpec(4, 4, a_group=16, a_format="lzs"),
    "w4a4 twinlog": QuantSpec(4, 4, w_format="twinlog"),
}


def _layer(spec: QuantSpec, rank: int = 0) -> LayerPlan:
    lp = LayerPlan("l", "mlp_up", 0, K, N, 0, spec)
    lp.rank = rank
    return lp


def _transform(g: torch.Generator) -> TransformPlan:
    return TransformPlan(perm=torch.randperm(K, generator=g),
                         smooth=torch.rand(K, generator=g) + 0.5, rot=hadamard(16),
                         kind="hadamard")


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_memo_output_is_the_op_output(spec, rank):
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    xs = [torch.randn(2, 10, K, generator=g) for _ in range(2)]  # two calibration calls
    lp, tp, memo = _layer(spec, rank), _transform(g), LinearMemo()
    packs = [pack_weight(w, lp, tp, clip) for clip in (1.0, 0.9)]
    for _ in range(2):  # second round: every piece comes from the memo
        for x in xs:
            for packed in packs:
                for a_clip in (1.0, 0.8):
                    want = quantized_linear(apply_transform(x, tp), packed, bias, lp, a_clip)
                    got = quantized_linear(apply_transform(x, tp, memo), packed, bias, lp,
                                           a_clip, memo=memo)
                    assert torch.equal(got, want)
    assert len(memo._entries) == len(xs) + len(packs)  # one per piece, none per repeat


def test_memo_sees_in_place_changes_and_respects_its_budget():
    g = torch.Generator().manual_seed(1)
    lp, tp = _layer(QuantSpec(4, 4)), _transform(g)
    packed = pack_weight(torch.randn(N, K, generator=g), lp, tp)
    x, memo = torch.randn(8, K, generator=g), LinearMemo()
    first = quantized_linear(apply_transform(x, tp, memo), packed, None, lp, memo=memo)
    x.mul_(3.0)  # same tensor, new values: the memo must not serve the old transform
    want = quantized_linear(apply_transform(x, tp), packed, None, lp)
    got = quantized_linear(apply_transform(x, tp, memo), packed, None, lp, memo=memo)
    assert torch.equal(got, want) and not torch.equal(got, first)
    empty = LinearMemo(max_bytes=0)
    assert torch.equal(quantized_linear(apply_transform(x, tp, empty), packed, None, lp,
                                        memo=empty), want)
    assert empty.bytes == 0 and not empty._entries


def test_clq_plans_are_the_same_with_and_without_the_memo(monkeypatch):
    """End to end: CLPS with the memo (default) and with the op path for every trial
    choose the same clips with the same errors, bit for bit."""
    model, inputs = TINY_MODELS["pixart"]()
    plant_outliers(model, OUTLIER_SITES["pixart"], 30.0)
    graphs, calls = capture_calls(model, [inputs(i) for i in range(3)])
    gm = graphs[0].gm
    flat = flatten_calls(gm, calls)
    config, spec = resolve("clq", "w4a4", w_grid=(1.0, 0.9, 0.8), a_grid=(1.0, 0.9, 0.8))

    def choices() -> dict:
        plan = build_plan(copy.deepcopy(gm), spec, config, flat, measure=False)
        return {n: (lp.target, lp.w_clip, lp.a_clip, lp.err_before, lp.err_after)
                for n, lp in plan.layers.items() if lp.quantized}

    served, get = [], LinearMemo.get
    monkeypatch.setattr(LinearMemo, "get", lambda self, *a: served.append(a[0]) or get(self, *a))
    with_memo = choices()
    assert {"transform", "weight"} <= set(served)  # the memo was used
    monkeypatch.setattr(LinearMemo, "serves", lambda self, x: False)
    served.clear()
    without = choices()
    assert not served and with_memo == without
    assert any(c[1:3] != (1.0, 1.0) for c in without.values())  # the grid mattered
