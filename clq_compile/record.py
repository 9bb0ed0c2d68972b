"""``clq.record_calls``: record a module's real inputs while a pipeline runs, as
calibration calls.

    with clq.record_calls(pipe.transformer, max_calls=16) as calib:
        pipe(prompts, num_inference_steps=20)
    pipe.transformer = clq.quantize(pipe.transformer, calib, recipe="clq", bits="w4a4")

Each call is recorded as the module saw it (a classifier-free-guidance batch stays one
call), detached and cloned. Over budget, the recording keeps an evenly spaced subset of
all calls (so of all timesteps) while holding at most ``2 * max_calls`` of them: when the
buffer fills, every other call is dropped and the keep-stride doubles.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

from clq_compile.errors import ConfigError

log = logging.getLogger(__name__)


def _clone(value: Any) -> Any:
    return pytree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, value)


@contextlib.contextmanager
def record_calls(module: torch.nn.Module, max_calls: int = 32,
                 device: str | torch.device | None = None) -> Iterator[list[dict[str, Any]]]:
    """Yield a list that, when the block exits, holds up to ``max_calls`` recorded calls
    (dicts of keyword arguments, positional ones named by ``forward``'s signature).
    ``device``: where to keep the recorded tensors (default: where they were)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"clq.record_calls takes the torch.nn.Module whose calls to record "
                        f"(e.g. pipe.transformer), got {type(module).__name__}")
    if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
        raise ConfigError(f"option max_calls={max_calls!r} is not allowed: expected an "
                          "integer >= 1")
    import inspect

    names = [p.name for p in inspect.signature(module.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kept: list[dict[str, Any]] = []
    state = {"seen": 0, "stride": 1}

    def hook(_mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        i = state["seen"]
        state["seen"] += 1
        if i % state["stride"]:
            return
        call = {**dict(zip(names, args, strict=False)), **kwargs}
        call = _clone(call)
        if device is not None:
            call = pytree.tree_map(
                lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, call)
        kept.append(call)
        if len(kept) >= 2 * max_calls:
            del kept[1::2]
            state["stride"] *= 2

    out: list[dict[str, Any]] = []
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield out
    finally:
        handle.remove()
        if len(kept) > max_calls:
            idx = torch.linspace(0, len(kept) - 1, max_calls).round().long().tolist()
            kept[:] = [kept[i] for i in idx]
        out.extend(kept)
        log.info("recorded %d of %d calls to %s", len(out), state["seen"],
                 type(module).__name__)
