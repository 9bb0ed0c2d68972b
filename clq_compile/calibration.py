"""Calibration inputs: checked before any work starts, bound to the model's signature,
then checked against the captured graph; every error names the call and the input."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx import _pytree as fx_pytree

from clq_compile.errors import CalibrationError
from clq_compile.signature import Param, bind

Call = tuple[tuple[Any, ...], dict[str, Any]]


def as_call(item: Any, i: int) -> Call:
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, tuple | list):
        return tuple(item), {}
    raise CalibrationError(
        f"calibration call {i} is a {type(item).__name__}; expected a dict of keyword "
        "arguments or a tuple of positional arguments for model.forward"
    )


def as_calls(calib: Any) -> list[Call]:
    """A list of calls from any iterable of calls (a generator is consumed once)."""
    if calib is None:
        raise CalibrationError("calibration set is None: pass a list of calls, e.g. "
                               "[dict(hidden_states=..., timestep=...), ...]")
    if isinstance(calib, Mapping):
        raise CalibrationError(
            "calibration set is one dict; pass a list of calls, e.g. [call] for one call "
            f"(got a dict with keys {sorted(map(str, calib))[:6]})")
    if isinstance(calib, torch.Tensor | str | bytes) or not isinstance(calib, Iterable):
        raise CalibrationError(
            f"calibration set is a {type(calib).__name__}; pass a list of calls (dicts of "
            "forward keyword arguments or tuples of positional arguments)")
    calls = [as_call(item, i) for i, item in enumerate(calib)]
    if not calls:
        raise CalibrationError(
            "calibration set is empty: pass at least one call (a dict of forward kwargs)")
    return calls


def _tensors(call: Any) -> list[tuple[str, torch.Tensor]]:
    return [(pytree.keystr(p), t) for p, t in pytree.tree_flatten_with_path(call)[0]
            if isinstance(t, torch.Tensor)]


def bind_calls(params: list[Param], calib: Any, model_name: str,
               device: torch.device | None = None) -> list[dict[str, Any]]:
    """Each call bound to ``forward``'s parameters, with defaults filled; values checked."""
    out = []
    for i, (args, kwargs) in enumerate(as_calls(calib)):
        try:
            call = bind(params, args, kwargs)
        except TypeError as e:
            raise CalibrationError(
                f"calibration call {i} does not match {model_name}.forward: {e}") from None
        for path, t in _tensors(call):
            where = f"calibration call {i}, input {path}"
            if t.device.type == "meta":
                raise CalibrationError(f"{where} is on the meta device (it holds no values)")
            if device is not None and t.device != device:
                raise CalibrationError(f"{where} is on {t.device} but the model is on "
                                       f"{device}: move the calibration inputs to {device}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CalibrationError(f"{where} holds NaN or Inf")
        out.append(call)
    return out


def flatten_calls(gm: fx.GraphModule, calls: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Flat placeholder values of each keyword call, in the order of ``gm``'s placeholders."""
    spec = getattr(gm, "_in_spec", None)
    out = []
    for i, call in enumerate(calls):
        try:
            flat = fx_pytree.tree_flatten_spec(((), dict(call)), spec)
        except Exception as e:  # noqa: BLE001 - re-raised with the call index
            raise CalibrationError(
                f"calibration call {i} does not fit the captured graph: {e}") from None
        out.append(list(flat))
    return out
