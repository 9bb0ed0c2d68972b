"""Capture: torch.export (non-strict) with a dynamic batch dimension, parameters lifted.

The unlifted module (``ep.module()``) is what passes rewrite: weights are ``get_attr``
constants, user inputs are placeholders, and the pytree in/out specs keep the original
call signature (keyword inputs, diffusers output tuples/dataclasses).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim

from clq_compile.errors import CaptureError

log = logging.getLogger(__name__)


def batch_dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``Dim.AUTO`` on dim 0 of every tensor whose leading size is the batch size.

    The batch size is the leading size of the first tensor with two or more dims, so
    per-token tables without a batch dim (e.g. Flux's ``img_ids``) stay static.
    """
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    batch = next((x.shape[0] for x in leaves if x.dim() >= 2), None)

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch:
            return {0: Dim.AUTO}
        return None

    return pytree.tree_map(spec, (args, kwargs))


def _name_op(err: Exception) -> str:
    text = str(err)
    m = re.search(r"(aten\.[\w.]+|torch\.ops\.[\w.]+)", text)
    return f" (op {m.group(1)})" if m else ""


def capture(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """Export ``model`` on one example call; raise CaptureError naming the op or input."""
    if dynamic_shapes is None:
        dyn_args, dyn_kwargs = batch_dynamic_shapes(args, kwargs)
        names = _arg_names(model, len(args))
        dynamic_shapes = {**dict(zip(names, dyn_args, strict=True)), **dyn_kwargs}
    try:
        with torch.no_grad():
            ep = torch.export.export(
                model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False
            )
    except Exception as e:  # noqa: BLE001 - every export failure is reported the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}{_name_op(e)}: "
            f"{type(e).__name__}: {first}"
        ) from e
    gm = ep.module()
    gm.meta["clq_dynamic_shapes"] = dynamic_shapes
    return gm


def _arg_names(model: torch.nn.Module, n: int) -> list[str]:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return params[:n]
