"""``qm.save(dir)`` / ``clq.load(dir)``: a quantized model as three files, no pickle.

- ``graph_<i>.json``: each quantized graph in torch.export's own serialization (its JSON
  program; the ``torch.ops.clq`` ops are registered by importing clq_compile); a model
  that specializes on sizes has one graph per specialization;
- ``weights.safetensors``: every tensor the graphs read, stored once (packed int4/int8
  weights, scales, permutations, Hadamard blocks, full-precision layers), the plan's
  tensors and one example call per graph;
- ``clq.json``: format version, the plan, the call signature, the model config, a
  SHA-256 of every other file and one of its own body, so a corrupt, truncated or
  hand-edited file is caught on load.

The directory is written under a temporary name and renamed when complete; it replaces
only an empty directory or a previous save unless ``overwrite=True`` (see
``clq_compile.atomic``). Loading needs neither the model class nor calibration data, and
recalibrates nothing. It reads only files ``clq.json`` lists (plain names in the folder),
verifies every digest, and runs nothing written in the folder: each graph file passes
``clq_compile.safe_graph`` before torch.export's reader sees it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch._export.serde.serialize import SerializedArtifact, SerializeError, deserialize, serialize

import clq_compile.ops  # noqa: F401 - the graph's clq ops must exist before deserializing
from clq_compile.atomic import atomic_dir, check_target
from clq_compile.capture import EXPORT_LOCK, Captured, auto_dynamic_shapes
from clq_compile.digest import content_key
from clq_compile.errors import LoadError, SaveError
from clq_compile.model import QuantizedModel
from clq_compile.plan import Plan
from clq_compile.safe_graph import check_graph
from clq_compile.signature import CallSpec, TensorSpec

log = logging.getLogger(__name__)

FORMAT = "clq_compile.quantized_model"
VERSION = 2  # 2: clq.json carries the digest of its own body
INDEX, WEIGHTS = "clq.json", "weights.safetensors"
INDEX_DIGEST = "index_sha256"
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # in the folder: no '/', no '..'


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


def save(qm: QuantizedModel, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``qm`` to directory ``path``. An existing ``path`` is replaced atomically
    when it is empty or a previous save; one holding anything else only with
    ``overwrite=True``; the current directory or a parent of it never (``SaveError``)."""
    path = Path(path)
    check_save_target(path, overwrite)  # before the minutes of serializing
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
    with atomic_dir(path, replaceable=_is_previous_save, overwrite=overwrite) as tmp:
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
        body = json.loads(json.dumps(index, default=_plain))  # keys and values as read back
        body[INDEX_DIGEST] = _index_digest(body)
        (tmp / INDEX).write_text(json.dumps(body, indent=1))
    log.info("saved %s (%.1f MB) in %.2f s", path, _size(path) / 1e6, time.perf_counter() - t0)
    return path


def check_save_target(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ``SaveError`` now if ``save(qm, path, overwrite)`` would refuse ``path``."""
    check_target(Path(path), _is_previous_save, overwrite)


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


def _index_digest(body: dict[str, Any]) -> str:
    """SHA-256 of the index without its own digest, in a canonical JSON text."""
    rest = {k: v for k, v in body.items() if k != INDEX_DIGEST}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_previous_save(path: Path) -> bool:
    """Whether directory ``path`` holds a clq save (its clq.json names the format): a new
    save may replace it without ``overwrite=True``."""
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(index, dict) and index.get("format") == FORMAT


def _parse_index(path: Path) -> dict[str, Any]:
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
    except RecursionError:
        raise LoadError(f"{index_file} is corrupt (not JSON clq_compile writes: nested "
                        "deeper than Python's parser allows)") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise LoadError(f"{index_file} is not a clq_compile model index")
    return index


def _check_version(index: dict[str, Any], index_file: Path) -> None:
    version = index.get("version")
    if type(version) is not int:
        raise LoadError(f"{index_file} is corrupt: its format version {version!r} is a "
                        f"{type(version).__name__}, not an integer")
    if version > VERSION:
        raise LoadError(
            f"{index_file.parent} was saved in format version {version}; this clq_compile "
            f"reads versions up to {VERSION}: upgrade clq_compile to load it")
    if version < 1:
        raise LoadError(f"{index_file} is corrupt: format version {version} was never "
                        "written by clq_compile")
    if version < VERSION:
        raise LoadError(
            f"{index_file.parent} was saved in format version {version}, whose {INDEX} "
            f"carries no digest of itself; this clq_compile reads version {VERSION}: "
            "quantize and save the model again")


def _expect(value: Any, kind: type | tuple[type, ...], field: str, index_file: Path) -> Any:
    if not isinstance(value, kind):
        raise LoadError(f"{index_file} is corrupt: {field} is a {type(value).__name__}, "
                        "not what qm.save writes")
    return value


def _check_name(name: Any, field: str, index_file: Path) -> str:
    if not (isinstance(name, str) and _FILE_NAME.fullmatch(name) and ".." not in name):
        raise LoadError(f"{index_file} is corrupt: {field} {name!r} is not a plain file "
                        "name in the model's directory (no '/', no '..')")
    return name


def _check_shape(index: dict[str, Any], index_file: Path) -> None:
    """The types of the fields load reads (the plan's and call spec's insides are checked
    as they are read)."""
    plan = _expect(index.get("plan"), dict, "plan", index_file)
    for key in ("layers", "transforms"):
        _expect(plan.get(key), dict, f"plan.{key}", index_file)
    _expect(index.get("plan_tensors"), dict, "plan_tensors", index_file)
    _expect(index.get("config"), dict | None, "config", index_file)
    _expect(index.get("source"), dict | None, "source", index_file)
    _expect(index.get("fp_weight_bytes", 0), int, "fp_weight_bytes", index_file)
    for i, entry in enumerate(index["graphs"]):
        for key, kind in (("call_spec", dict), ("tensors", dict), ("example", dict),
                          ("parameters", list)):
            _expect(entry.get(key), kind, f"graphs[{i}].{key}", index_file)


def _check_files(index: dict[str, Any], index_file: Path) -> dict[str, str]:
    """The files the loader reads (weights and every graph file), each listed with its
    digest under a plain name."""
    files = _expect(index.get("files"), dict, "files", index_file)
    for name, digest in files.items():
        _check_name(name, "files entry", index_file)
        _expect(digest, str, f"files[{name!r}]", index_file)
    graphs = _expect(index.get("graphs"), list, "graphs", index_file)
    if not graphs:
        raise LoadError(f"{index_file} is corrupt: it lists no graphs")
    read = [WEIGHTS]
    for i, entry in enumerate(graphs):
        entry = _expect(entry, dict, f"graphs[{i}]", index_file)
        read.append(_check_name(entry.get("file"), f"graphs[{i}].file", index_file))
    for name in read:
        if name not in files:
            raise LoadError(f"{index_file} is corrupt: {name} is read on load but not "
                            "listed in its files with a digest")
    return files


def _read_index(path: Path) -> dict[str, Any]:
    index = _parse_index(path)
    index_file = path / INDEX
    _check_version(index, index_file)
    try:
        intact = index.get(INDEX_DIGEST) == _index_digest(index)
    except RecursionError:  # nested near the parser's limit: not what save writes
        intact = False
    if not intact:
        raise LoadError(f"{index_file} does not match the digest recorded in it when it was "
                        "saved: it is corrupt or was edited; save the model again")
    files = _check_files(index, index_file)
    _check_shape(index, index_file)
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
        qm = QuantizedModel(graphs, plan, config=index.get("config"),
                            fp_weight_bytes=index.get("fp_weight_bytes", 0),
                            source=index.get("source"))
    except LoadError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError,
            SafetensorError) as e:
        raise LoadError(f"{path / INDEX} is corrupt: {_one_line(e)}") from None
    return qm if device is None else qm.to(device)


def _one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 300 else text[:300] + "..."


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
    graph_file = path / entry["file"]
    data = graph_file.read_bytes()
    check_graph(data, str(graph_file))  # before torch's reader sees a string of it
    with EXPORT_LOCK:
        try:
            ep = deserialize(SerializedArtifact(data, state, consts, ((), example)))
            gm = ep.module()
        except (SerializeError, AssertionError, ArithmeticError, LookupError, TypeError,
                ValueError, AttributeError, RuntimeError, RecursionError, SyntaxError) as e:
            raise LoadError(f"{graph_file} could not be read by torch.export "
                            f"({_one_line(e)}); save the model again") from None
    return Captured(gm, call_spec, example, auto_dynamic_shapes(example))
