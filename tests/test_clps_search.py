"""CLPS's cheaper search (issue 15). ``clps_search="exact"`` (the default) runs the trials
best first, one call at a time, so trials that cannot win stop early; it must choose
exactly what evaluating every trial on every call (``"exhaustive"``) chooses, for fewer
probe calls. The graph is captured once and planned both ways, so only the search
differs."""

from __future__ import annotations

import copy

import pytest
import torch

from clq_compile.api import capture_calls
from clq_compile.build import build_plan, resolve
from clq_compile.calibration import flatten_calls
from clq_compile.testing import OUTLIER_SITES, TINY_MODELS, plant_outliers

SEARCHES = ("exhaustive", "exact")


def _plans(model, calib, **options):
    graphs, calls = capture_calls(model, calib)
    gm = graphs[0].gm
    flat = flatten_calls(gm, calls)
    out = {}
    for search in SEARCHES:
        config, spec = resolve("clq", "w4a4", clps_search=search, **options)
        plan = build_plan(copy.deepcopy(gm), spec, config, flat, measure=False)
        out[search] = plan
    return out


def _choices(plan):
    return {n: (lp.target, lp.w_clip, lp.a_clip, lp.err_before, lp.err_after)
            for n, lp in plan.layers.items() if lp.quantized}


def _check(plans, exact_calls: float) -> None:
    full, exact = (plans[s] for s in SEARCHES)
    assert _choices(exact) == _choices(full)
    assert any(c[1:3] != (1.0, 1.0) for c in _choices(full).values())  # the grid mattered
    calls = {s: p.meta["clps_probe_calls"] for s, p in plans.items()}
    assert calls["exact"] < exact_calls * calls["exhaustive"], calls
    assert plans["exact"].meta["clps_probes"] == full.meta["clps_probes"]


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_cheaper_searches_on_the_tiny_models(arch):
    model, inputs = TINY_MODELS[arch]()
    plant_outliers(model, OUTLIER_SITES[arch], 30.0)  # spread-out errors, real choices
    plans = _plans(model, [inputs(i) for i in range(3)], w_grid=(1.0, 0.9, 0.8),
                   a_grid=(1.0, 0.9, 0.8, 0.7))
    _check(plans, exact_calls=1.0)


def test_cheaper_searches_on_the_trained_shapes_dit():
    """The first two blocks of the trained shapes DiT, on its real sampling inputs."""
    from clq_compile.eval import calibration_calls, load_shapes_dit

    torch.manual_seed(0)
    model, encoder = load_shapes_dit()
    calib = calibration_calls(model, encoder, n_prompts=2, steps=8, at_steps=[0, 4, 7])
    model.transformer_blocks = model.transformer_blocks[:2]
    plans = _plans(model, calib, clps_samples=3)
    _check(plans, exact_calls=0.85)  # measured 0.78 (1409 of 1800 calls)
