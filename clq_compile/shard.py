"""Sharded calibration over torch.distributed ranks.

Within a block, the per-layer work of calibration (CLPS's probes, the budget's
sensitivity probes, GPTQ's solves) depends only on the block's inputs and the plan of
earlier blocks, not on the other layers of the block. So each rank does its share of a
block's layers and the results are all-gathered; every rank then advances CBC on the same
values and ends with the same plan as one process would. Without an initialized process
group (or with one rank) everything runs here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch.distributed as dist

from clq_compile.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Shard:
    """This process's share of the work: all of it (the default), or with ``distributed``
    its rank's share in the initialized process group ``group`` (every rank must then
    plan the same model on the same calibration set). Items are dealt round-robin,
    continuing across calls, so over a model every rank gets the same number of layers
    within one."""

    def __init__(self, distributed: bool = False, group: Any = None) -> None:
        if not isinstance(distributed, bool):
            raise ConfigError(f"distributed={distributed!r}: expected True or False")
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "distributed=True needs an initialized torch.distributed process group "
                "(launch with torchrun and call dist.init_process_group first, or use "
                "clq_compile.shard.process_group_from_env())")
        self.group = group
        self.rank = dist.get_rank(group) if distributed else 0
        self.world = dist.get_world_size(group) if distributed else 1
        self.owner: dict[Any, int] = {}  # item -> the rank that did it
        self._dealt = 0

    @classmethod
    def requested(cls, distributed: bool) -> Shard:
        """The share the user's ``distributed`` option asks for. A process group of several
        ranks left unused is said at WARNING: every rank would then plan the whole model
        alone, N times the work for the same plan."""
        shard = cls(distributed)
        if not distributed and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            log.warning("a torch.distributed process group of %d ranks is initialized but "
                        "distributed=False: this rank plans the whole model alone (pass "
                        "distributed=True on every rank to split the calibration work)",
                        dist.get_world_size())
        return shard

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> dict[T, R]:
        """``{item: fn(item)}`` for every item; this rank computes its share."""
        start, self._dealt = self._dealt, self._dealt + len(items)
        for k, item in enumerate(items):
            self.owner[item] = (start + k) % self.world
        mine = {it: fn(it) for it in items if self.owner[it] == self.rank}
        if self.world == 1:
            return mine
        parts: list[dict | None] = [None] * self.world
        dist.all_gather_object(parts, mine, group=self.group)
        merged = {k: v for part in parts for k, v in (part or {}).items()}
        missing = [it for it in items if it not in merged]
        if missing:  # a rank that returned nothing for its items: never silently skip them
            raise RuntimeError(f"sharded calibration lost results for {missing}")
        return {it: merged[it] for it in items}

    def per_rank(self, cost: dict[Any, int]) -> list[int]:
        """Sum of ``cost`` per rank, by who did each item."""
        out = [0] * self.world
        for item, c in cost.items():
            out[self.owner.get(item, 0)] += c
        return out


@contextmanager
def process_group_from_env() -> Iterator[Shard]:
    """Within: this process's ``Shard`` of the process group ``torchrun`` describes
    (``WORLD_SIZE`` > 1 in the environment; gloo on CPU, NCCL with CUDA), joined on entry
    and left on exit when it was joined here. A single process: no group."""
    import os

    import torch

    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        log.info("rank %d of %d", dist.get_rank(), dist.get_world_size())
    try:
        yield Shard(distributed=dist.is_initialized())
    finally:
        if joined:
            dist.destroy_process_group()
