"""Models larger than memory: parameters on the meta device, their values read from a
safetensors checkpoint when a pass first needs them and dropped again after.

The model is built without weights (``accelerate.init_empty_weights()`` or
``torch.device("meta")``); export traces it with zero-cost stand-ins; the graph keeps
meta tensors and ``gm.meta[CHECKPOINT_KEY]`` points at a :class:`Checkpoint`, which
``fetch_attr`` asks for a value. The calibration runner streams block by block, so only
the blocks in flight are read; a byte-bounded LRU keeps re-reads (CLPS windows) cheap.

Tensors are read with plain file reads, not through a memory map: a mapped file's
touched pages count as the process's memory until it is unmapped, so reading every block
once through a map ends with the whole checkpoint resident.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from clq_compile.annotations import CHECKPOINT_KEY
from clq_compile.errors import ConfigError, QuantizationError
from clq_compile.passes.find_linears import set_attr
from clq_compile.passes.graph_utils import block_containers, block_key

log = logging.getLogger(__name__)

# safetensors dtype names (the format's header), as torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def _entries(path: Path) -> dict[str, Entry]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConfigError(f"option checkpoint: {path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (ValueError, MemoryError) as e:
            raise ConfigError(f"option checkpoint: {path} has no readable safetensors header "
                              f"({e})") from None
    out = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        if e["dtype"] not in DTYPES:
            raise ConfigError(f"option checkpoint: {path}: tensor {key!r} has dtype "
                              f"{e['dtype']}, not one of {sorted(DTYPES)}")
        a, b = e["data_offsets"]
        out[key] = Entry(path, DTYPES[e["dtype"]], tuple(e["shape"]), 8 + n + a, b - a)
    return out


def checkpoint_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A safetensors file, a folder of them (a sharded checkpoint), or a list of files."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            files = sorted(p.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"option checkpoint: folder {p} holds no *.safetensors file")
            return files
        paths = [p]
    else:
        paths = [Path(s) for s in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise ConfigError(f"option checkpoint: no such safetensors file: {missing or 'none'}")
    return paths


class Checkpoint:
    """Tensors of one or more safetensors files, read on demand; the last ``capacity``
    bytes read are kept (least recently used dropped first)."""

    def __init__(self, source: Any, capacity: int) -> None:
        self.entries: dict[str, Entry] = {}
        for path in checkpoint_files(source):
            for key, e in _entries(path).items():
                if key in self.entries:
                    raise ConfigError(f"option checkpoint: tensor {key!r} is in both "
                                      f"{self.entries[key].path} and {path}")
                self.entries[key] = e
        self.capacity = capacity
        self._kept: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._kept_bytes = 0
        self.reads = 0
        self.read_bytes = 0
        self.peak_kept_bytes = 0

    def __deepcopy__(self, memo: dict) -> Checkpoint:  # a graph copy reads the same files
        return self

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor stored under ``key``, freshly read (not kept), in ``dtype`` when
        given (cast as ``load_state_dict`` would copy it)."""
        e = self.entries[key]
        t = torch.empty(e.shape, dtype=e.dtype)
        if e.nbytes:
            with open(e.path, "rb") as f:
                f.seek(e.start)
                if f.readinto(t.view(-1).view(torch.uint8).numpy()) != e.nbytes:
                    raise QuantizationError(f"checkpoint {e.path}: tensor {key!r} is cut short")
        self.reads += 1
        self.read_bytes += e.nbytes
        return t if dtype is None else t.to(dtype)

    def get(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """``key``'s values in ``like``'s dtype, kept for later calls."""
        t = self._kept.get(key)
        if t is not None:
            self._kept.move_to_end(key)
            return t
        t = self.read(key, like.dtype)
        nbytes = t.numel() * t.element_size()
        self._kept[key] = t
        self._kept_bytes += nbytes
        while self._kept_bytes > self.capacity and len(self._kept) > 1:
            _, old = self._kept.popitem(last=False)
            self._kept_bytes -= old.numel() * old.element_size()
        self.peak_kept_bytes = max(self.peak_kept_bytes, self._kept_bytes)
        return t

    def clear(self) -> None:
        """Drop the kept tensors (reads go on working)."""
        self._kept.clear()
        self._kept_bytes = 0

    def stats(self) -> dict[str, int]:
        return {"reads": self.reads, "read_bytes": self.read_bytes,
                "capacity": self.capacity, "peak_kept_bytes": self.peak_kept_bytes}


def _meta_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.device.type == "meta"}


def block_weight_bytes(names_bytes: dict[str, int]) -> int:
    """The largest repeated block's bytes (parameters named ``container.i.…``); the
    whole model's when it has no repeated blocks."""
    containers = block_containers(list(names_bytes))
    per: dict[str | None, int] = {}
    for name, n in names_bytes.items():
        key = block_key(name, containers)
        per[key] = per.get(key, 0) + n
    blocks = [v for k, v in per.items() if k is not None]
    return max(blocks) if blocks else sum(names_bytes.values())


def open_checkpoint(model: torch.nn.Module, source: Any,
                    max_weight_bytes: int | None = None) -> Checkpoint | None:
    """The checkpoint ``model``'s meta tensors are read from, checked against them (every
    one present, same shape); None when ``source`` is None. ``max_weight_bytes``: bytes
    of weights kept between reads (default: the largest block's, so a block's weights
    are read once per pass over the calibration set)."""
    if source is None:
        if max_weight_bytes is not None:
            raise ConfigError("option max_weight_bytes needs checkpoint=...")
        return None
    if max_weight_bytes is not None and (not isinstance(max_weight_bytes, int)
                                         or isinstance(max_weight_bytes, bool)
                                         or max_weight_bytes < 0):
        raise ConfigError(f"option max_weight_bytes={max_weight_bytes!r} is not allowed: "
                          "expected a number of bytes (int >= 0) or None")
    lazy = _meta_tensors(model)
    if not lazy:
        raise ConfigError("option checkpoint: the model has no tensor on the meta device; "
                          "build it without weights (accelerate.init_empty_weights() or "
                          "torch.device('meta')) to read them from the checkpoint")
    capacity = max_weight_bytes
    if capacity is None:
        capacity = block_weight_bytes({n: t.numel() * t.element_size()
                                       for n, t in lazy.items()})
    ckpt = Checkpoint(source, capacity)
    persistent = set(model.state_dict(keep_vars=True))
    for name, t in lazy.items():
        e = ckpt.entries.get(name)
        if e is None:
            hint = ("" if name in persistent else " (a non-persistent buffer: build the model "
                    "with accelerate.init_empty_weights(), which keeps buffers real)")
            raise QuantizationError(f"{type(model).__name__}.{name} is on the meta device "
                                    f"and the checkpoint has no tensor of that name{hint}")
        if e.shape != tuple(t.shape):
            raise QuantizationError(f"checkpoint tensor {name!r} has shape {list(e.shape)}, "
                                    f"the model's is {list(t.shape)}")
    log.info("reading %d tensors from %s, keeping up to %.1f MiB of them", len(lazy),
             source, capacity / 2**20)
    return ckpt


@contextmanager
def stand_ins(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While export traces ``model``, each meta parameter/buffer is a CPU tensor of its
    shape holding one value broadcast (a few bytes); restored on exit. Yields the meta
    tensors by name. Export only reads shapes, so the stand-in values never reach a graph
    (:func:`attach` puts meta tensors back into it)."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    lazy: dict[str, torch.Tensor] = {}
    try:
        for prefix, mod in model.named_modules():
            for table in (mod._parameters, mod._buffers):
                for leaf, t in list(table.items()):
                    if t is None or t.device.type != "meta":
                        continue
                    lazy[f"{prefix}.{leaf}" if prefix else leaf] = t
                    stand = torch.full((1,) * max(t.dim(), 1), 0.02, dtype=t.dtype)
                    stand = stand.expand(t.shape) if t.dim() else stand.reshape(())
                    if isinstance(t, torch.nn.Parameter):
                        stand = torch.nn.Parameter(stand, requires_grad=False)
                    swapped.append((table, leaf, t))
                    table[leaf] = stand
        yield lazy
    finally:
        for table, leaf, t in swapped:
            table[leaf] = t


def attach(gm: fx.GraphModule, lazy: dict[str, torch.Tensor], ckpt: Checkpoint) -> None:
    """Point ``gm``'s copies of the stand-ins back at meta tensors read from ``ckpt``."""
    for name, t in gm.state_dict(keep_vars=True).items():
        if name in lazy:
            set_attr(gm, name, torch.empty_like(t, device="meta"))
    gm.meta[CHECKPOINT_KEY] = ckpt


def materialize(gm: fx.GraphModule) -> None:
    """Read every tensor the graph still holds on the meta device (the weights left in
    float: embeddings, norms, skipped linears) and detach the checkpoint."""
    ckpt = gm.meta.pop(CHECKPOINT_KEY, None)
    if ckpt is None:
        return
    for name, t in gm.state_dict(keep_vars=True).items():
        if t.device.type == "meta":
            set_attr(gm, name, ckpt.read(name, t.dtype))
    ckpt.clear()
    log.info("checkpoint reads: %s", ckpt.stats())

