"""``clq.record_calls``: record a module's real inputs while a pipeline runs, as
calibration calls.

    with clq.record_calls(pipe.transformer, max_calls=16) as calib:
        pipe(prompts, num_inference_steps=20)
    pipe.transformer = clq.quantize(pipe.transformer, calib, recipe="clq", bits="w4a4")

Each call is recorded as the module saw it (a classifier-free-guidance batch stays one
call), detached and cloned. Over budget, the recording keeps an evenly spaced subset of
all calls (so of all timesteps) while holding at most ``2 * max_calls`` of them: when the
buffer fills, every other call is dropped and the keep-stride doubles. A call whose
forward raised is not kept (the error still propagates and the hooks come off). One
``record_calls`` object makes one recording: entering it again raises
``CalibrationError`` (create a new one for another recording).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.utils._pytree as pytree

from clq_compile.errors import CalibrationError, ConfigError

log = logging.getLogger(__name__)


def _clone(value: Any) -> Any:
    return pytree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, value)


class record_calls:  # noqa: N801 - used as ``with clq.record_calls(...)``, like a function
    """A context manager whose ``with`` block yields a list that, when the block exits,
    holds up to ``max_calls`` recorded calls (dicts of keyword arguments, positional ones
    named by ``forward``'s signature). ``device``: where to keep the recorded tensors
    (default: where they were). See the module for what is kept."""

    def __init__(self, module: torch.nn.Module, max_calls: int = 32,
                 device: str | torch.device | None = None) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"clq.record_calls takes the torch.nn.Module whose calls to record "
                            f"(e.g. pipe.transformer), got {type(module).__name__}")
        if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
            raise ConfigError(f"option max_calls={max_calls!r} is not allowed: expected an "
                              "integer >= 1")
        self.module, self.max_calls, self.device = module, max_calls, device
        self.names = [p.name for p in inspect.signature(module.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.calls: list[dict[str, Any]] | None = None  # the list the block gets
        self._kept: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any] | None] = []  # per forward in flight
        self._seen, self._stride = 0, 1
        self._handles: list[Any] = []

    def __enter__(self) -> list[dict[str, Any]]:
        if self.calls is not None:
            raise CalibrationError(
                f"this clq.record_calls({type(self.module).__name__}) was entered before (it "
                f"holds {len(self.calls)} calls): create a new clq.record_calls(...) for "
                "another recording")
        self.calls = []
        self._handles = [
            self.module.register_forward_pre_hook(self._before, with_kwargs=True),
            self.module.register_forward_hook(self._after)]
        return self.calls

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._pending.clear()
        kept = self._kept
        if len(kept) > self.max_calls:
            idx = torch.linspace(0, len(kept) - 1, self.max_calls).round().long().tolist()
            kept = [kept[i] for i in idx]
        self.calls.extend(kept)
        log.info("recorded %d of %d calls to %s", len(self.calls), self._seen,
                 type(self.module).__name__)

    def _before(self, _mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Clone the call's inputs (before forward can change them in place); it is kept
        once forward returns."""
        if self._seen % self._stride:
            self._pending.append(None)
            return
        call = _clone({**dict(zip(self.names, args, strict=False)), **kwargs})
        if self.device is not None:
            call = pytree.tree_map(
                lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x, call)
        self._pending.append(call)

    def _after(self, *_: Any) -> None:
        """Keep the call whose forward just returned (the innermost in flight; one whose
        forward raised never gets here, and is dropped with the pending list at exit)."""
        call = self._pending.pop()
        self._seen += 1
        if call is None:
            return
        self._kept.append(call)
        if len(self._kept) >= 2 * self.max_calls:
            del self._kept[1::2]
            self._stride *= 2
