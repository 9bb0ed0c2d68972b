"""Transform plans are built on the CPU from calibration statistics; a model on another
device folds and runs them there. A CUDA model with a transform recipe (quarot, clq)
failed on the H200 with "Expected all tensors to be on the same device" before the plan
followed the weight. The meta device stands in for the GPU here: mixing it with CPU
tensors fails the same way."""

from __future__ import annotations

import torch

from clq_compile.hadamard import hadamard
from clq_compile.plan import TransformPlan
from clq_compile.qlinear import fold_weight
from clq_compile.rounding import transformed_hessian


def _plan() -> TransformPlan:
    g = torch.Generator().manual_seed(0)
    return TransformPlan(perm=torch.randperm(32, generator=g), smooth=torch.rand(32) + 0.5,
                         rot=hadamard(16), kind="obs")


def test_plan_moves_to_the_weight_device() -> None:
    tp = _plan()
    moved = tp.on("meta")
    assert all(t.device.type == "meta" for t in (moved.perm, moved.smooth, moved.rot))
    assert tp.perm.device.type == "cpu"  # the plan itself is left as it was
    assert moved.kind == tp.kind and moved.block == tp.block


def test_fold_weight_and_hessian_follow_their_tensor() -> None:
    tp = _plan()
    w = torch.randn(8, 32)
    assert fold_weight(w.to("meta"), tp).device.type == "meta"
    assert torch.equal(fold_weight(w, tp.on("cpu")), fold_weight(w, tp))
    h = torch.eye(32, dtype=torch.float64)
    assert transformed_hessian(h.to("meta"), tp).device.type == "meta"
