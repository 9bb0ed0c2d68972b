"""The model's call signature, kept beside the graph so a quantized model takes what the
model takes, also after ``clq.load`` in a process without the model class.

A call (positional or keyword, defaults omitted) is bound to the forward's parameters and
becomes one keyword dict: the layout the graph was captured with. ``check`` says, before
the graph runs, which input a call gets wrong (its name, the captured size or value, and
the remedy); ``explain`` turns the guard failures that only the graph can detect (a size
the model specializes on) into the same kind of message. ``return_dict`` (the
transformers/diffusers convention) is captured as ``False`` and applied here, so omitting
it returns the model's output class, as the model would.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

log = logging.getLogger(__name__)

RETURN_DICT = "return_dict"


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()  # a parameter without a default
_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "positional" (also by keyword), "keyword" (keyword-only), "var_keyword"
    default: Any = REQUIRED


def params_of(fn: Any) -> list[Param]:
    """The parameters of ``fn`` (a bound ``forward``); ``*args`` cannot be kept."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"forward(*{p.name}) takes variable positional arguments, which a "
                            "captured graph cannot bind; give them names")
        default = REQUIRED if p.default is inspect.Parameter.empty else p.default
        out.append(Param(p.name, _KINDS[p.kind], default))
    return out


def bind(params: list[Param], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Python's binding rules on recorded parameters: one keyword dict, defaults filled.
    Raises TypeError with Python's wording on a call that does not bind."""
    positional = [p for p in params if p.kind == "positional"]
    if len(args) > len(positional):
        raise TypeError(f"takes {len(positional)} positional arguments but {len(args)} were given")
    call: dict[str, Any] = {p.name: a for p, a in zip(positional, args, strict=False)}
    names = {p.name for p in params if p.kind != "var_keyword"}
    var_kw = any(p.kind == "var_keyword" for p in params)
    for k, v in kwargs.items():
        if k in call:
            raise TypeError(f"got multiple values for argument {k!r}")
        if k not in names and not var_kw:
            raise TypeError(f"got an unexpected keyword argument {k!r}")
        call[k] = v
    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "var_keyword":
            continue
        if p.name in call:
            out[p.name] = call[p.name]
        elif p.default is REQUIRED:
            raise TypeError(f"missing a required argument: {p.name!r}")
        else:
            out[p.name] = p.default
    out.update({k: v for k, v in call.items() if k not in out})
    return out


@dataclass(frozen=True)
class TensorSpec:
    """One tensor input: its static sizes, and the symbol of each dynamic dim."""

    path: str  # pytree key path in the keyword call, e.g. "['hidden_states']"
    dtype: torch.dtype
    shape: tuple[int | str, ...]  # a static size, or the graph's symbol for a dynamic dim
    example: tuple[int, ...]  # sizes at capture


@dataclass(frozen=True)
class ConstSpec:
    """A non-tensor input: fixed at capture (export specializes on it)."""

    path: str
    value: Any


@dataclass
class OutputSpec:
    """The output class the model returns with ``return_dict=True``."""

    module: str
    qualname: str
    fields: list[str]
    _cls: Any = field(default=None, repr=False, compare=False)

    def resolve(self) -> Any | None:
        """The class, imported only from a library or a module already loaded: a saved
        file must not make ``clq.load`` import arbitrary code."""
        if self._cls is None:
            allowed = self.module in sys.modules or self.module.split(".")[0] in (
                "diffusers", "transformers", "clq_compile")
            if not allowed:
                return None
            try:
                obj: Any = importlib.import_module(self.module)
                for part in self.qualname.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError):
                return None
            self._cls = obj if isinstance(obj, type) and dataclasses.is_dataclass(obj) else None
        return self._cls


def keyname(path: str) -> str:
    """"['added_cond_kwargs']['resolution']" -> "added_cond_kwargs['resolution']"."""
    m = re.match(r"^\['([^']+)'\](.*)$", path)
    return f"{m.group(1)}{m.group(2)}" if m else path


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    if isinstance(v, Mapping):
        return f"a dict with keys {sorted(map(str, v))}"
    if isinstance(v, list | tuple):
        return f"a {type(v).__name__} of {len(v)}"
    return repr(v)


@dataclass
class CallSpec:
    params: list[Param]
    in_spec: pytree.TreeSpec  # of the keyword call dict
    leaves: list[TensorSpec | ConstSpec]
    ranges: dict[str, tuple[int, int | None]]  # symbol -> (min, max or None)
    output: OutputSpec | None = None
    names: dict[str, str] = field(default_factory=dict)  # symbol -> "input dim d", first use

    def __post_init__(self) -> None:
        for leaf in self.leaves:
            if isinstance(leaf, TensorSpec):
                for d, s in enumerate(leaf.shape):
                    if isinstance(s, str):
                        self.names.setdefault(s, f"{keyname(leaf.path)} dim {d}")

    # -- calls -----------------------------------------------------------------------
    def normalize(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[dict, bool]:
        """(keyword call in the captured layout, whether the caller wants the output class)."""
        call = bind(self.params, args, kwargs)
        want_dict = False
        if RETURN_DICT in call:
            want_dict = bool(call[RETURN_DICT])
            call[RETURN_DICT] = self.captured(RETURN_DICT)
        return call, want_dict

    def captured(self, name: str) -> Any:
        path = f"['{name}']"
        for leaf in self.leaves:
            if isinstance(leaf, ConstSpec) and leaf.path == path:
                return leaf.value
        return None

    def problems(self, call: Mapping[str, Any], sizes: bool = True) -> list[str]:
        """Why the graph cannot take ``call`` (empty when it can), one line per input.
        ``sizes=False`` checks only the layout (structure, constants, dtypes, ranks): what
        another graph of the same model, captured at other sizes, could not fix either."""
        leaves, spec = pytree.tree_flatten(dict(call))
        if spec != self.in_spec:
            return self._structure_problems(call)
        out: list[str] = []
        seen: dict[str, tuple[int, str]] = {}
        for value, leaf in zip(leaves, self.leaves, strict=True):
            name = keyname(leaf.path)
            if isinstance(leaf, ConstSpec):
                if not isinstance(value, type(leaf.value)) or value != leaf.value:
                    out.append(
                        f"input {name} is {_describe(value)}, but the graph was captured with "
                        f"{leaf.value!r}; non-tensor inputs are fixed when the graph is "
                        "captured: quantize with calibration calls that pass this value")
                continue
            if not isinstance(value, torch.Tensor):
                out.append(f"input {name} is {_describe(value)}, but the graph takes a "
                           f"{leaf.dtype} tensor of shape {leaf.example}")
                continue
            out.extend(self._tensor_problems(name, value, leaf, seen, sizes))
        return out

    def _tensor_problems(self, name: str, value: torch.Tensor, leaf: TensorSpec,
                         seen: dict[str, tuple[int, str]], sizes: bool) -> list[str]:
        if value.dtype != leaf.dtype:
            return [f"input {name} is {value.dtype}, but the graph was captured with "
                    f"{leaf.dtype}: cast it to {leaf.dtype}"]
        if value.dim() != len(leaf.shape):
            return [f"input {name} has {value.dim()} dims (shape {tuple(value.shape)}), but the "
                    f"graph takes {len(leaf.shape)} (captured shape {leaf.example})"]
        if not sizes:
            return []
        out = []
        for d, (n, s) in enumerate(zip(value.shape, leaf.shape, strict=True)):
            n = int(n)
            if isinstance(s, int):
                if n != s:
                    out.append(
                        f"input {name} dim {d} is {n}, but the graph was captured with {s} and "
                        "the model does not let it vary: quantize with calibration calls of "
                        "this size (or pass dynamic_shapes= to clq.quantize)")
                continue
            lo, hi = self.ranges.get(s, (0, None))
            lo = min(lo, 1)  # export assumes >= 2 while tracing; sizes 0/1 run too
            if n < lo or (hi is not None and n > hi):
                out.append(f"input {name} dim {d} is {n}, outside the range [{lo}, "
                           f"{'inf' if hi is None else hi}] the graph supports")
            elif s in seen and seen[s][0] != n:
                first, where = seen[s]
                out.append(f"input {name} dim {d} is {n} but {where} is {first}: the graph "
                           "needs them equal (one dynamic size, e.g. the batch)")
            else:
                seen.setdefault(s, (n, f"{name} dim {d}"))
        return out

    def _structure_problems(self, call: Mapping[str, Any]) -> list[str]:
        skeleton = pytree.tree_unflatten(list(self.leaves), self.in_spec)
        out = []
        for key in sorted(set(skeleton) | set(call)):
            want, got = skeleton.get(key, "<absent>"), call.get(key, "<absent>")
            if pytree.tree_structure(want) == pytree.tree_structure(got):
                continue
            out.append(f"input {key} is {_describe(got)}, but the graph was captured with "
                       f"{self._describe_skeleton(want)}; quantize with calibration calls "
                       "that pass it the same way")
        return out or ["the call's inputs are not laid out as the captured call's"]

    @staticmethod
    def _describe_skeleton(v: Any) -> str:
        if isinstance(v, TensorSpec):
            return f"a {v.dtype} tensor of shape {v.example}"
        if isinstance(v, ConstSpec):
            return repr(v.value)
        if isinstance(v, Mapping):
            return f"a dict with keys {sorted(map(str, v))}"
        return _describe(v)

    def explain(self, err: BaseException, call: Mapping[str, Any]) -> str | None:
        """A message for a guard or runtime-assert failure of the graph, naming the inputs
        and sizes involved; None when ``err`` is not one."""
        text = str(err)
        if not re.search(r"Guard failed|Runtime assertion failed|Expected input", text):
            return None
        first = text.strip().splitlines()[0]
        named = []
        for inp, d in re.findall(r"(\w+)\.size\(\)\[(\d+)\]", first):
            named.append(self._size_note(inp, int(d), call))
        for sym in sorted(set(re.findall(r"\bs\d+\b", first))):
            where = self.names.get(sym)
            if where:
                inp, _, d = where.rpartition(" dim ")
                named.append(self._size_note(inp, int(d), call))
        detail = "; ".join(dict.fromkeys(n for n in named if n))
        return (f"the graph cannot take this call ({first}){': ' + detail if detail else ''}. "
                "The model specializes on these sizes: give clq.quantize a calibration call "
                "(or extra_shapes=[call]) of this size")

    def _size_note(self, inp: str, d: int, call: Mapping[str, Any]) -> str:
        value = call.get(inp)
        leaf = next((t for t in self.leaves if isinstance(t, TensorSpec)
                     and keyname(t.path) == inp), None)
        if not isinstance(value, torch.Tensor) or leaf is None or d >= value.dim():
            return ""
        return f"input {inp} dim {d} is {int(value.shape[d])} (captured: {leaf.example[d]})"

    # -- outputs ---------------------------------------------------------------------
    def pack(self, out: Any, want_dict: bool) -> Any:
        if not want_dict or self.output is None:
            return out
        cls = self.output.resolve()
        if cls is None:
            log.warning("output class %s.%s is not importable; returning a tuple",
                        self.output.module, self.output.qualname)
            return out
        return cls(**dict(zip(self.output.fields, out, strict=False)))

    # -- serialization ---------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        def leaf(t: TensorSpec | ConstSpec) -> dict[str, Any]:
            if isinstance(t, ConstSpec):
                return {"path": t.path, "value": t.value}
            return {"path": t.path, "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": list(t.shape), "example": list(t.example)}

        return {
            # A default JSON cannot hold becomes required after load (the call must pass it).
            "params": [{"name": p.name, "kind": p.kind,
                        **({"default": p.default} if _jsonable(p.default) else {})}
                       for p in self.params],
            "in_spec": pytree.treespec_dumps(self.in_spec),
            "leaves": [leaf(t) for t in self.leaves],
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "output": None if self.output is None else {
                "module": self.output.module, "qualname": self.output.qualname,
                "fields": self.output.fields},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CallSpec:
        def leaf(t: Mapping[str, Any]) -> TensorSpec | ConstSpec:
            if "dtype" not in t:
                return ConstSpec(t["path"], t["value"])
            return TensorSpec(t["path"], getattr(torch, t["dtype"]), tuple(t["shape"]),
                              tuple(t["example"]))

        out = d.get("output")
        return cls(
            params=[Param(p["name"], p["kind"], p.get("default", REQUIRED)) for p in d["params"]],
            in_spec=pytree.treespec_loads(d["in_spec"]),
            leaves=[leaf(t) for t in d["leaves"]],
            ranges={k: (v[0], v[1]) for k, v in d["ranges"].items()},
            output=None if out is None else OutputSpec(out["module"], out["qualname"],
                                                        list(out["fields"])),
        )


def _jsonable(v: Any) -> bool:
    if v is None or isinstance(v, bool | int | float | str):
        return v is not REQUIRED
    if isinstance(v, list | tuple):
        return all(map(_jsonable, v))
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False


def output_spec(out: Any) -> OutputSpec | None:
    """What ``pack`` needs to rebuild ``out`` (an output dataclass) from a tuple."""
    if not dataclasses.is_dataclass(out) or isinstance(out, type):
        return None
    cls = type(out)
    names = list(out.keys()) if isinstance(out, Mapping) else [
        f.name for f in dataclasses.fields(out) if getattr(out, f.name) is not None]
    return OutputSpec(cls.__module__, cls.__qualname__, names, cls)
