"""Sharded calibration (issue 15): two gloo ranks on CPU split each block's CLPS probes,
sensitivity probes and GPTQ solves, and end with the plan one process builds, bit for bit."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import clq_compile as clq
from clq_compile.shard import Shard
from clq_compile.testing import tiny_pixart

# Every sharded stage runs: CLPS probes and GPTQ solves (clq), the budget's own
# sensitivity probes (quarot has no CLPS errors to reuse). Small grids keep it short.
CONFIGS = {
    "clq": dict(recipe="clq", weights="gptq", budget=0.1, w_grid=(1.0, 0.9),
                a_grid=(1.0, 0.9, 0.8)),
    "quarot": dict(recipe="quarot", budget=0.2),
}


def _plan(config: str, distributed: bool = False):
    torch.set_num_threads(1)  # the same arithmetic in every process
    model, inputs = tiny_pixart()
    return clq.quantize(model, [inputs(i) for i in range(3)], bits="w4a4", measure=False,
                        extra_shapes=None, distributed=distributed, **CONFIGS[config]).plan


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for config in CONFIGS:
            state, tensors = _plan(config, distributed=True).to_state()
            torch.save({"state": state, "tensors": tensors}, f"{out}/{config}{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comparable(state: dict) -> dict:
    """The plan without what may differ: timings, memory, and the per-rank counts."""
    meta = {k: v for k, v in state["meta"].items() if not k.endswith(("_s", "_per_rank"))
            and k not in ("ranks", "calib_peak_bytes")}
    budget = {k: v for k, v in meta.pop("budget", {}).items() if k != "seconds"}
    return {**state, "meta": meta, "budget": budget}


def test_two_ranks_build_the_plan_one_process_builds(tmp_path):
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for config in CONFIGS:
        single_state, single_tensors = _plan(config).to_state()
        ranks = [torch.load(tmp_path / f"{config}{r}.pt", weights_only=False) for r in range(2)]
        for got in ranks:
            assert _comparable(got["state"]) == _comparable(single_state), config
            assert got["tensors"].keys() == single_tensors.keys()
            for k, t in single_tensors.items():
                assert torch.equal(got["tensors"][k], t), (config, k)
        assert ranks[0]["state"]["meta"]["ranks"] == 2
        assert ranks[0]["state"]["meta"]["budget"]["promoted"]
    # each rank did half of clq's probes (the layers are dealt round-robin over the model)
    meta = torch.load(tmp_path / "clq0.pt", weights_only=False)["state"]["meta"]
    per_rank = meta["clps_probes_per_rank"]
    assert sum(per_rank) == meta["clps_probes"]
    assert max(per_rank) <= 1.1 * min(per_rank), per_rank


def test_distributed_without_a_process_group_is_a_config_error():
    model, inputs = tiny_pixart()
    with pytest.raises(clq.ConfigError, match="initialized torch.distributed process group"):
        clq.quantize(model, [inputs(0)], distributed=True)
    with pytest.raises(clq.ConfigError, match="distributed='yes'"):
        clq.quantize(model, [inputs(0)], distributed="yes")


def test_an_unused_process_group_of_several_ranks_is_said(monkeypatch, caplog):
    """Under torchrun without ``distributed=True`` every rank does all the work: a
    warning says so (the group is faked: the check reads only its size)."""
    import clq_compile.shard as shard_module

    monkeypatch.setattr(shard_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(shard_module.dist, "get_world_size", lambda group=None: 2)
    with caplog.at_level("WARNING", logger="clq_compile.shard"):
        assert Shard.requested(False).world == 1
    assert "group of 2 ranks is initialized but distributed=False" in caplog.text
    monkeypatch.setattr(shard_module.dist, "get_world_size", lambda group=None: 1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="clq_compile.shard"):
        Shard.requested(False)
    assert caplog.text == ""  # one rank: nothing to split


def test_one_process_does_everything():
    shard = Shard()
    assert (shard.rank, shard.world) == (0, 1)
    assert shard.map(lambda x: x * x, [3, 1, 2]) == {3: 9, 1: 1, 2: 4}
    assert shard.per_rank({3: 5, 1: 1}) == [6]
