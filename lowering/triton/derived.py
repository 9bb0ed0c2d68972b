"""Tensors derived once from a graph constant (an unpacked weight, a rotation's kernel
operand), cached for as long as the constant lives and until it is modified in place.

Keyed by ``id`` (a WeakKeyDictionary would compare tensor keys with ``==``); a weakref
finalizer drops an entry with its tensor, and ``_version`` catches in-place changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

_entries: dict[tuple[int, Hashable], tuple[weakref.ref, int, Any]] = {}


def derived(t: torch.Tensor, tag: Hashable, make: Callable[[torch.Tensor], Any]) -> Any:
    """``make(t)``, computed on the first call for (t, tag) and after t changes in place."""
    key = (id(t), tag)
    hit = _entries.get(key)
    live = hit is not None and hit[0]() is t
    if live and hit[1] == t._version:
        return hit[2]
    value = make(t)
    if not live:
        weakref.finalize(t, _entries.pop, key, None)
    _entries[key] = (weakref.ref(t), t._version, value)
    return value


def tensor_bytes(kind: str) -> int:
    """Bytes held by cached tensors whose tag is ``(kind, ...)``."""
    return sum(v.numel() * v.element_size() for (_, tag), (_, _, v) in _entries.items()
               if isinstance(tag, tuple) and tag[0] == kind and isinstance(v, torch.Tensor))
