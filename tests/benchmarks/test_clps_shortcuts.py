"""benchmarks/clps_shortcuts.py: its tables reproduce ``clps.search_layer`` (choice,
target and probe calls; the benchmark raises otherwise), and its scoring charges a
shortcut for a wrong target or a pruned winner."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import clps_shortcuts as shortcuts  # noqa: E402 - a script folder, not a package


def _table(nums, dens, own=None):
    grid = [(1.0, 1.0), (1.0, 0.9), (0.9, 1.0), (0.9, 0.9)]
    calls = len(dens[0])
    return shortcuts.Table("l", grid, ["a", "b"], nums, dens,
                           own or [[1.0] * calls for _ in grid], [1.0] * calls)


def test_scoring_charges_a_wrong_target_and_a_pruned_winner():
    # chain layer "b" is the target on both calls together, "a" on call 0 alone;
    # at "b" grid point 2 wins, at "a" grid point 1 does.
    nums = [[[5.0, 0.0], [0.0, 9.0]],   # (1, 1): a 5 on call 0; b 9 on call 1
            [[1.0, 0.0], [0.0, 8.0]],   # (1, .9)
            [[4.0, 0.0], [0.0, 2.0]],   # (.9, 1)
            [[9.0, 0.0], [0.0, 9.5]]]   # (.9, .9)
    own = [[3.0, 3.0], [1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]
    tb = _table(nums, [[10.0, 10.0], [10.0, 10.0]], own)
    assert tb.target() == 1 and tb.target([0]) == 0
    assert shortcuts.exact(tb)[0] == 2
    assert shortcuts.target_on_first_call(tb)[0] == 1  # scored at "b": 8 against 2
    assert shortcuts.own_top(2)(tb)[0] == 2  # own errors rank 1, 2 first: 2 survives
    assert shortcuts.own_top(1)(tb)[0] == 1  # only 1 survives: pruned winner
    scores = shortcuts.score([tb])
    assert scores["exact (best first)"] == dict(worst_db=0.0, layers_differ=0,
                                                cost_vs_exact=1.0)
    assert scores["target on call 0"]["worst_db"] == pytest.approx(6.021, abs=1e-3)  # 10·lg 4
    assert scores["own-error top 3"]["worst_db"] == 0.0


def test_tables_reproduce_search_layer_on_a_tiny_model():
    from clq_compile.testing import TINY_MODELS

    model, inputs = TINY_MODELS["dit"]()
    tabs = shortcuts.tables(model, [inputs(i) for i in range(2)], w_grid=(1.0, 0.9),
                            a_grid=(1.0, 0.8), clps_samples=2)
    assert len(tabs) == 12 and all(len(tb.grid) == 4 and tb.calls == 2 for tb in tabs)
    scores = shortcuts.score(tabs)
    assert scores["exact (best first)"]["worst_db"] == 0.0
    assert all(r["worst_db"] >= 0.0 and r["cost_vs_exact"] > 0 for r in scores.values())
