"""Serve ``torch.ops.clq.*`` with the Triton kernels on CUDA tensors.

``register()`` adds CUDA kernels for ``clq::quant_linear`` (activation-quantize kernel +
the GEMM of the route ``routes.choose`` picks: packed int4, int8-stored or fp8
``_scaled_mm``; weight-only when ``a_bits`` is 16) and ``clq::transform`` (the same row
kernel in transform-only mode). CPU calls keep the reference implementations.

``quant_linear_triton`` / ``transform_triton`` are the registered functions: they decide
(:func:`plan_linear`), make the derived operands (unpacked weight, the rotation's kernel
form; cached per tensor) and call the ``clq_triton`` triton_ops (``kernel_ops``) that
``lower.LowerToKernels`` puts in compiled graphs. They also run on CPU tensors under
``TRITON_INTERPRET=1``, which is how CI tests this exact path. A
call the kernels do not take (shape, group, dtype, GPU generation), or for which no
autotune config fits this GPU (``OutOfResources``), runs the reference instead, with the
reason logged once per shape.

Kernel modules are imported on first use, not by ``register()``: ``@triton.jit`` fixes
interpret-vs-compile when its module is imported, and the test suite must get to set
``TRITON_INTERPRET`` first.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from clq_compile.lowering.triton import configs, routes
from clq_compile.lowering.triton.support import (
    Unsupported,
    plan_gemm,
    plan_modulation,
    plan_prologue,
    plan_quantize,
    plan_rows,
)
from clq_compile.ops import DEFAULT_NORM_EPS, quant_linear_reference, transform_reference

log = logging.getLogger(__name__)

_registered = False
_fallbacks_logged: set[tuple] = set()
# int8 tl.dot is broken on Turing (triton#9349) and int8 mma needs sm_80 for our tiles.
MIN_CAPABILITY = (8, 0)


def triton_available() -> tuple[bool, str]:
    """(usable, reason if not)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, ""


def kernels(name: str) -> ModuleType:
    return importlib.import_module(f"clq_compile.lowering.triton.{name}")


def _log_fallback(op: str, key: tuple, reason: str) -> None:
    """Log a reference fallback once per (op, shape, reason)."""
    full = (op, key, reason)
    if full not in _fallbacks_logged:
        _fallbacks_logged.add(full)
        log.warning("clq::%s %s runs the reference implementation: %s", op, key, reason)


def _launch_errors() -> tuple[type[BaseException], ...]:
    """Errors a real launch raises when every autotune config of a kernel is too big for
    this GPU (shared memory, registers): the call then runs the reference, logged, instead
    of crashing the model."""
    errs: list[type[BaseException]] = [Unsupported]
    try:
        from triton.runtime.errors import OutOfResources

        errs.append(OutOfResources)
    except ImportError:  # pragma: no cover - older/newer Triton layouts
        pass
    return tuple(errs)


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, Unsupported) else f"{type(e).__name__}: {e}"


def device_reason(x: Tensor) -> str:
    if x.device.type == "cuda":
        cap = torch.cuda.get_device_capability(x.device)
        if cap < MIN_CAPABILITY:
            return f"GPU sm_{cap[0]}{cap[1]} < sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]}"
        return ""
    if x.device.type == "cpu" and configs.interpreting():
        return ""
    return f"no Triton kernel for {x.device.type} tensors (CPU needs TRITON_INTERPRET=1)"


@dataclass(frozen=True)
class LinearCall:
    """How the kernels run one ``clq::quant_linear`` call: the static part of
    ``clq_triton::quant_linear``'s arguments (route, effective bits and groups). Made by
    :func:`plan_linear` from shapes and dtypes only, so the eager dispatch (per call) and
    ``lower.LowerToKernels`` (once, at compile time) take the same decision."""

    route: str
    w_bits: int
    a_bits: int
    a_group: int
    a_clip: float
    prologue: str | None
    lzs_group: int
    norm_eps: float
    pro_fp32: bool

    def weight(self, w_q: Tensor, cached: bool = True) -> Tensor:
        """The weight operand of this call's GEMM (int8 / fp8 unpacked; cached per tensor
        unless ``cached`` is False)."""
        if self.route == "packed" or self.a_bits == 16:
            return w_q
        return routes.unpacked_weight(w_q, self.w_bits, self.route, cached)

    def args(self) -> tuple:
        """The trailing arguments of ``clq_triton::quant_linear``."""
        return (self.route, self.w_bits, self.a_bits, self.a_group, self.a_clip,
                self.prologue, self.lzs_group, self.norm_eps, self.pro_fp32)


def _modulation_rows(x: Tensor, pro_fp32: bool, *operands: Tensor | None) -> tuple[int, ...]:
    dtype = torch.float32 if pro_fp32 else x.dtype
    rows = (plan_modulation(t, x.shape, dtype) for t in operands)
    return tuple(r for r in rows if r is not None)


def plan_linear(
    x: Tensor, w_q: Tensor, w_scale: Tensor, w_bits: int, a_bits: int, a_group: int,
    a_clip: float, perm: Tensor | None = None, smooth: Tensor | None = None,
    rot: Tensor | None = None, prologue: str | None = None, a_format: str = "int",
    w_format: str = "int", a8_rows: bool = False, route: str | None = None,
    capability: tuple[int, int] | None = None, pro_mul: Tensor | None = None,
    pro_add: Tensor | None = None, norm_eps: float = DEFAULT_NORM_EPS, pro_fp32: bool = False,
) -> LinearCall:
    """Whether the kernels take a ``clq::quant_linear`` call, and how; reads only shapes
    and dtypes (x may be a fake tensor). ``capability``: the CUDA device's (None: not a
    GPU, the route off Hopper). Raises :class:`Unsupported` with the reason."""
    if a8_rows:
        raise Unsupported("per-sample activation bits (timestep_bits): the kernels "
                          "quantize every row to one width")
    if w_format != "int":
        raise Unsupported(f"{w_format} weights: the GEMMs take integer weights with scales, "
                          "not a per-row table")
    lzs_group = 0
    if a_format == "lzs":  # int8 codes, truncated per group (rotate_quantize)
        a_bits, a_group, lzs_group = 8, 0, a_group
    elif a_format != "int":
        raise Unsupported(f"activation format {a_format!r}")
    k, n = x.shape[-1], w_q.shape[0]
    if a_bits < 16 and a_group and k % a_group:
        raise Unsupported(f"activation group {a_group} does not divide K={k}")
    if route is None:
        route = routes.choose(capability, x.dtype, w_bits, a_bits, a_group, w_scale.shape[1],
                              k, n)
    elif route not in routes.ROUTES:
        raise ValueError(f"route {route!r} not in {routes.ROUTES}")
    g_bits = (8, 8) if route == "int8" and a_bits < 16 else (a_bits, w_bits)
    plan_gemm(*g_bits, k, k // a_group if a_group else 1, w_scale.shape[1], x.dtype)
    rows = _modulation_rows(x, pro_fp32, pro_mul, pro_add)
    if a_bits == 16:
        if any(t is not None for t in (perm, smooth, rot)):
            plan_rows(x, perm, smooth, rot, 0, 0)
    else:
        plan_quantize(x, perm, smooth, rot, a_bits, a_group, a_clip, route, prologue,
                      lzs_group, rows)
    return LinearCall(route, w_bits, a_bits, a_group, a_clip, prologue, lzs_group,
                      float(norm_eps), bool(pro_fp32))


def capability_of(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def quant_linear_triton(
    x: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    w_bits: int,
    a_bits: int,
    a_group: int,
    a_clip: float,
    perm: Tensor | None = None,
    smooth: Tensor | None = None,
    rot: Tensor | None = None,
    prologue: str | None = None,
    a_format: str = "int",
    w_format: str = "int",
    a8_rows: Tensor | None = None,
    pro_mul: Tensor | None = None,
    pro_add: Tensor | None = None,
    norm_eps: float = DEFAULT_NORM_EPS,
    pro_fp32: bool = False,
    route: str | None = None,
) -> Tensor:
    """``clq::quant_linear`` on the kernels: :func:`plan_linear` decides, then
    ``clq_triton::quant_linear`` transforms and quantizes x (one launch) and runs the
    route's GEMM (``route`` forces one, for benchmarks); output in x's dtype."""
    key = (tuple(x.shape), str(x.dtype), tuple(w_q.shape), tuple(w_scale.shape), w_bits,
           a_bits, a_group, perm is not None, smooth is not None,
           None if rot is None else tuple(rot.shape), prologue, a_format, w_format,
           a8_rows is not None, pro_fp32,
           *(None if t is None else tuple(t.shape) for t in (pro_mul, pro_add)))
    reason = device_reason(x)
    if not reason:
        try:
            call = plan_linear(x, w_q, w_scale, w_bits, a_bits, a_group, a_clip, perm, smooth,
                               rot, prologue, a_format, w_format, a8_rows is not None, route,
                               capability_of(x.device), pro_mul, pro_add, norm_eps, pro_fp32)
            tile, outer = rotation_operand(rot, x.device)
            kernels("kernel_ops")  # defines torch.ops.clq_triton
            return torch.ops.clq_triton.quant_linear(
                x, call.weight(w_q), w_scale, bias, perm, smooth, tile, outer, pro_mul,
                pro_add, *call.args())
        except _launch_errors() as e:
            reason = _reason(e)
    _log_fallback("quant_linear", key, reason)
    return quant_linear_reference(x, w_q, w_scale, bias, w_bits, a_bits, a_group, a_clip,
                                  perm, smooth, rot, prologue, a_format, w_format, a8_rows,
                                  pro_mul, pro_add, norm_eps, pro_fp32)


def rotation_operand(rot: Tensor | None, device: torch.device) -> tuple[Tensor | None, int]:
    if rot is None:
        return None, 1
    return kernels("act_quant").rotation_operand(rot, device)


def plan_transform(x: Tensor, perm: Tensor | None, smooth: Tensor | None,
                   rot: Tensor | tuple[int, ...] | None, prologue: str | None = None,
                   pro_mul: Tensor | None = None, pro_add: Tensor | None = None,
                   pro_fp32: bool = False) -> None:
    """Whether the row kernel takes a ``clq::transform`` call (shapes and dtypes only, as
    :func:`plan_linear`). Raises :class:`Unsupported` with the reason."""
    plan_prologue(x, prologue, _modulation_rows(x, pro_fp32, pro_mul, pro_add))
    plan_rows(x, perm, smooth, rot, 0, 0)


def transform_triton(
    x: Tensor, perm: Tensor | None, smooth: Tensor | None, rot: Tensor | None,
    prologue: str | None = None, pro_mul: Tensor | None = None, pro_add: Tensor | None = None,
    norm_eps: float = DEFAULT_NORM_EPS, pro_fp32: bool = False,
) -> Tensor:
    """``clq::transform`` on the row kernel (fp32 math, output in x's dtype)."""
    key = (tuple(x.shape), str(x.dtype), None if rot is None else tuple(rot.shape),
           perm is not None, smooth is not None, prologue, pro_fp32,
           *(None if t is None else tuple(t.shape) for t in (pro_mul, pro_add)))
    reason = device_reason(x)
    if not reason:
        try:
            plan_transform(x, perm, smooth, rot, prologue, pro_mul, pro_add, pro_fp32)
            tile, outer = rotation_operand(rot, x.device)
            kernels("kernel_ops")
            return torch.ops.clq_triton.transform(x, perm, smooth, tile, outer, pro_mul,
                                                  pro_add, prologue, float(norm_eps),
                                                  bool(pro_fp32))
        except _launch_errors() as e:
            reason = _reason(e)
    _log_fallback("transform", key, reason)
    return transform_reference(x, perm, smooth, rot, prologue, pro_mul, pro_add, norm_eps,
                               pro_fp32)


def register() -> bool:
    """Register the CUDA kernels for ``clq::quant_linear`` and ``clq::transform``.

    Idempotent. Without Triton it registers nothing, logs why and returns False; CUDA
    tensors then keep the reference implementations."""
    global _registered
    if _registered:
        return True
    ok, reason = triton_available()
    if not ok:
        log.info("Triton lowering not registered: %s; clq ops use their references", reason)
        return False
    import clq_compile.ops  # noqa: F401 - defines the ops we attach kernels to

    torch.library.register_kernel("clq::quant_linear", "cuda", quant_linear_triton)
    torch.library.register_kernel("clq::transform", "cuda", transform_triton)
    _registered = True
    log.debug("registered Triton CUDA kernels for clq::quant_linear and clq::transform")
    return True


def is_registered() -> bool:
    return _registered
