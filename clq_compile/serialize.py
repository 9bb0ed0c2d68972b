"""``qm.save(dir)`` / ``clq.load(dir)``: a quantized model as three files, no pickle.

- ``graph_<i>.json``: each quantized graph in torch.export's own serialization (its JSON
  program; the ``torch.ops.clq`` ops are registered by importing clq_compile); a model
  that specializes on sizes has one graph per specialization;
- ``weights.safetensors``: every tensor the graphs read, stored once (packed int4/int8
  weights, scales, permutations, Hadamard blocks, full-precision layers), the plan's
  tensors and one example call per graph;
- ``clq.json``: format version, the plan, the call signature, the model config, and a
  SHA-256 of every other file, so a corrupt or truncated file is caught on load.

The directory is written under a temporary name and renamed when complete. Loading
needs neither the model class nor calibration data, and recalibrates nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch._export.serde.serialize import SerializedArtifact, deserialize, serialize

import clq_compile.ops  # noqa: F401 - the graph's clq ops must exist before deserializing
from clq_compile.atomic import atomic_dir
from clq_compile.capture import EXPORT_LOCK, Captured, auto_dynamic_shapes
from clq_compile.digest import content_key
from clq_compile.errors import LoadError, SaveError
from clq_compile.model import QuantizedModel
from clq_compile.plan import Plan
from clq_compile.signature import CallSpec, TensorSpec

log = logging.getLogger(__name__)

FORMAT = "clq_compile.quantized_model"
VERSION = 1
INDEX, WEIGHTS = "clq.json", "weights.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Store:
    """Tensors to write, each distinct content once: graphs of one model share weights, the
    plan's rotations are the graph's buffers, and every Hadamard block is the same matrix.
    ``names`` maps every logical name to the key its content is stored under."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.names: dict[str, str] = {}
        self._by_digest: dict[tuple, str] = {}

    def add(self, name: str, t: torch.Tensor) -> str:
        t = t.detach().to("cpu").contiguous()
        digest = content_key(t)
        key = self._by_digest.get(digest)
        if key is None:
            key = self._by_digest[digest] = name
            self.tensors[key] = t.clone()
        self.names[name] = key
        return key


def save(qm: QuantizedModel, path: str | os.PathLike) -> Path:
    """Write ``qm`` to directory ``path`` (replacing it atomically if it exists)."""
    path = Path(path)
    t0 = time.perf_counter()
    store = _Store()
    graphs, blobs = [], []
    for i, g in enumerate(qm.graphs):
        ep = qm.exported_program(i)
        with EXPORT_LOCK:
            blobs.append(serialize(ep, serialize_state_dict=False, serialize_constants=False,
                                   serialize_example_inputs=False).exported_program)
        keys: dict[str, dict[str, str]] = {"state_dict": {}, "constants": {}}
        for kind, table in (("state_dict", ep.state_dict), ("constants", ep.constants)):
            for k, v in table.items():
                if not isinstance(v, torch.Tensor):
                    raise SaveError(0, f"could not save {path}: constant {k} is a "
                                       f"{type(v).__name__}, not a tensor")
                keys[kind][k] = store.add(f"g{i}.{kind}.{k}", v)
        example = {str(j): store.add(f"g{i}.example.{j}", t)
                   for j, t in enumerate(pytree.tree_leaves(g.example))
                   if isinstance(t, torch.Tensor)}
        graphs.append({
            "file": f"graph_{i}.json", "call_spec": g.call_spec.to_json(), "tensors": keys,
            "example": example,
            "parameters": [s.target for s in ep.graph_signature.input_specs
                           if s.kind.name == "PARAMETER"],
        })
    plan_state, plan_tensors = qm.plan.to_state()
    for k, v in plan_tensors.items():
        store.add(k, v)
    with atomic_dir(path) as tmp:
        for entry, blob in zip(graphs, blobs, strict=True):
            (tmp / entry["file"]).write_bytes(blob)
        save_file(store.tensors, str(tmp / WEIGHTS))
        files = [WEIGHTS, *(entry["file"] for entry in graphs)]
        index = {
            "format": FORMAT, "version": VERSION,
            "written_by": {"clq_compile": _version(), "torch": torch.__version__},
            "files": {name: _sha256(tmp / name) for name in files},
            "graphs": graphs,
            "plan": plan_state,
            "plan_tensors": {k: store.names[k] for k in plan_tensors},
            "config": None if qm.config is None else dict(qm.config),
            "source": qm.source,
            "fp_weight_bytes": qm.fp_weight_bytes,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=1, default=_plain))
    log.info("saved %s (%.1f MB) in %.2f s", path, _size(path) / 1e6, time.perf_counter() - t0)
    return path


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | set):
        return list(v)
    return str(v)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clq-compile")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _read_index(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise LoadError(f"{path} is not a directory: clq.load takes the directory "
                        "qm.save(...) wrote")
    index_file = path / INDEX
    if not index_file.is_file():
        raise LoadError(f"{path} holds no {INDEX}: not a model saved by qm.save(...)")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{index_file} is corrupt (not JSON: {e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise LoadError(f"{index_file} is not a clq_compile model index")
    version = index.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise LoadError(
            f"{path} was saved in format version {version}; this clq_compile reads "
            f"versions up to {VERSION}: upgrade clq_compile to load it")
    files = index.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise LoadError(f"{index_file} lists no files: it is corrupt")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise LoadError(f"{path} is incomplete: {name} is missing")
        if _sha256(f) != digest:
            raise LoadError(f"{f} does not match the checksum recorded when it was saved: "
                            "the file is corrupt or truncated")
    return index


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> QuantizedModel:
    """A ``QuantizedModel`` from a directory written by ``qm.save`` (then moved to
    ``device`` if given)."""
    path = Path(path)
    index = _read_index(path)
    try:
        # Copies at fresh, aligned addresses: safetensors' tensors are views at the file's
        # byte offsets, and CPU kernels may vectorize differently on unaligned data (1 ulp
        # apart from the saved model's outputs).
        tensors = {k: v.clone() for k, v in load_file(str(path / WEIGHTS)).items()}
        plan = Plan.from_state(index["plan"], {k: tensors[v]
                                               for k, v in index["plan_tensors"].items()})
        graphs = [_load_graph(path, entry, tensors) for entry in index["graphs"]]
    except LoadError:
        raise
    except (KeyError, TypeError, ValueError, SafetensorError) as e:
        raise LoadError(f"{path} is corrupt: {type(e).__name__}: {e}") from None
    qm = QuantizedModel(graphs, plan, config=index.get("config"),
                        fp_weight_bytes=index.get("fp_weight_bytes", 0),
                        source=index.get("source"))
    return qm if device is None else qm.to(device)


def _load_graph(path: Path, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Captured:
    call_spec = CallSpec.from_json(entry["call_spec"])
    params = set(entry["parameters"])
    state = {k: tensors[key] for k, key in entry["tensors"]["state_dict"].items()}
    state = {k: torch.nn.Parameter(v, requires_grad=False) if k in params else v
             for k, v in state.items()}
    consts = {k: tensors[key] for k, key in entry["tensors"]["constants"].items()}
    leaves = [tensors[entry["example"][str(j)]] if isinstance(leaf, TensorSpec) else leaf.value
              for j, leaf in enumerate(call_spec.leaves)]
    example = pytree.tree_unflatten(leaves, call_spec.in_spec)
    with EXPORT_LOCK:
        ep = deserialize(SerializedArtifact((path / entry["file"]).read_bytes(), state, consts,
                                            ((), example)))
        gm = ep.module()
    return Captured(gm, call_spec, example, auto_dynamic_shapes(example))
