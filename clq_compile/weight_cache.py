"""Packing weights that arrive at run time (the ``clq`` torch.compile backend), and knowing
when a cached pack is stale.

Dynamo passes weights as unguarded graph inputs, and a weight can change without its
version counter moving: ``w.data += delta`` (PEFT merges, diffusers ``fuse_lora``) writes
through a fresh tensor, and ``w.data = new`` may reuse a freed address. So the cache key
holds a content fingerprint ``u·W·v`` (u, v fixed pseudo-random float64 vectors): any
change of W's values moves it, except on a set of measure zero. It reads W once per call
(one GEMV); on CUDA it also waits for that result.

``check="version"`` trades that read for trust, for serving: a pack is kept while the
weight is the same tensor object with the same ``_version`` (in-place tensor ops and
``load_state_dict`` move it; ``.data`` writes do not). No weight is read per call and
nothing waits on the GPU, so a CUDA graph replay is not held up by the packers.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from clq_compile.plan import LayerPlan, TransformPlan
from clq_compile.qlinear import pack_weight

_CHUNK = 1 << 22  # elements per float64 chunk: bounds the temporary copy
CHECKS = ("content", "version")  # what tells a packer that a weight changed


@functools.lru_cache(maxsize=256)
def _probe(n: int, device: torch.device, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0x5EED + 7919 * salt + n)
    return torch.rand(n, generator=g, dtype=torch.float64).add_(0.5).to(device)


def fingerprint(w: torch.Tensor) -> float:
    """``u·W·v`` in float64 over W viewed as (rows, cols)."""
    w2 = w.detach().reshape(w.shape[0], -1) if w.dim() else w.detach().reshape(1, 1)
    rows, cols = w2.shape
    u, v = _probe(rows, w2.device, 1), _probe(cols, w2.device, 2)
    step = max(1, _CHUNK // max(cols, 1))
    total = torch.zeros((), dtype=torch.float64, device=w2.device)
    for r in range(0, rows, step):
        total += u[r:r + step] @ (w2[r:r + step].to(torch.float64) @ v)
    return float(total)


class WeightPacker(torch.nn.Module):
    """Packs whatever weight tensor arrives, once per (tensor object, content), or with
    ``check="version"`` once per (tensor object, version)."""

    def __init__(self, layer: LayerPlan, transform: TransformPlan | None) -> None:
        super().__init__()
        self.layer, self.transform = layer, transform
        self.check = "content"  # see set_check
        self._cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.packs = 0  # how many times a weight was (re)packed; tests read it

    def forward(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = fingerprint(w) if self.check == "content" else w._version
        key = (tuple(w.shape), w.dtype, w.device, state)
        hit = self._cache.get(w)
        if hit is not None and hit[0] == key:
            return hit[1]
        packed = pack_weight(w, self.layer, self.transform)
        self.packs += 1
        out = (packed.w_q.to(w.device), packed.w_scale.to(w.device))
        self._cache[w] = (key, out)
        return out


def set_check(module: torch.nn.Module, check: str) -> None:
    """Make every packer under ``module`` use ``check`` (one of ``CHECKS``)."""
    if check not in CHECKS:
        raise ValueError(f"check {check!r} not in {CHECKS}")
    for m in module.modules():
        if isinstance(m, WeightPacker):
            m.check = check
