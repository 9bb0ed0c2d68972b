"""Running an exported model in onnxruntime's CPU EP the way the exactness claims assume."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.utils._pytree as pytree

INPUT_PATHS_KEY = "clq.input_paths"  # model metadata: pytree key path of each graph input
PARAMS_KEY = "clq.params"  # model metadata: forward's positional parameter names


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """ORT options under which the "qdq" model equals the reference up to fp32 rounding.

    ORT fuses a weight-only ``DequantizeLinear → MatMul`` into ``MatMulNBits``; with its
    default accuracy level 4 that kernel re-quantizes the activation to int8 (not exact).
    Level 0 keeps the activation in float32.
    """
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def ort_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), session_options(threads), providers=["CPUExecutionProvider"]
    )


def ort_feeds(
    session: ort.InferenceSession, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Map a model call ``(args, kwargs)`` onto the graph's inputs by pytree key path
    (recorded at export), so keyword order and nested dicts do not matter."""
    meta = session.get_modelmeta().custom_metadata_map
    paths = json.loads(meta[INPUT_PATHS_KEY])
    if args and PARAMS_KEY in meta:  # the graph takes keywords: name positional arguments
        names = json.loads(meta[PARAMS_KEY])
        kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
        args = ()
    leaves = {
        pytree.keystr(p): v for p, v in pytree.tree_flatten_with_path((args, kwargs))[0]
    }
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        value = leaves.get(paths[inp.name])
        if not isinstance(value, torch.Tensor):
            raise KeyError(f"graph input {inp.name!r} ({paths[inp.name]}) missing from the call")
        feeds[inp.name] = value.detach().cpu().numpy()
    return feeds


def ort_run(
    session: ort.InferenceSession, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[np.ndarray]:
    return session.run(None, ort_feeds(session, args, kwargs))
