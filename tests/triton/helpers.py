"""Shared data makers and tolerance checks for the kernel tests.

Tolerances are derived, not tuned. Two float computations of the same exact sum differ
by at most the sum of their rounding-error bounds (Higham: a length-n fp32 dot product
is within gamma_n = n*u/(1-n*u) of exact, relative to sum|terms|, u = 2^-24), plus one
unit in the last place of the output dtype when both are rounded to it.

A kernel and a reference given the same inputs may still disagree on an activation's
integer code: where the value before rounding lies within the two paths' float error of
a rounding tie. ``assert_quant_linear_agrees`` allows exactly those flips (derived bound
on the transformed values, ``transformed_bound``) and bounds the output by the GEMM's
summation error plus the flipped codes' own effect, so the check holds on any CPU's (or
GPU's) float kernels, whatever order they sum in.
"""

from __future__ import annotations

import inspect

import torch

from clq_compile.hadamard import block_hadamard
from clq_compile.lowering.triton.reference import activation_ints
from clq_compile.ops import (
    DEFAULT_NORM_EPS,
    GELU_PROLOGUES,
    apply_prologue,
    quant_linear_reference,
    reference_weight,
    transform_reference,
    weight_group,
)
from clq_compile.quant import quantize
from tests.triton.conftest import ON_GPU

U32 = 2.0**-24  # fp32 unit roundoff
# Relative spacing of representable values (2^-(p-1), p = mantissa bits incl. implicit)
# and the smallest subnormal, per output dtype.
_ULP = {
    torch.float32: (2.0**-23, 2.0**-149),
    torch.bfloat16: (2.0**-7, 2.0**-133),
    torch.float16: (2.0**-10, 2.0**-24),
}


def ulp_bound(dtype: torch.dtype, magnitude: torch.Tensor) -> torch.Tensor:
    """An upper bound on one ulp of ``dtype`` at ``magnitude`` (float64)."""
    rel, tiny = _ULP[dtype]
    return magnitude.double().abs() * rel + tiny


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor,
                  what: str) -> None:
    """Elementwise |actual - expected| <= bound, with the worst offender in the message."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double().cpu() - expected.double().cpu()).abs()
    excess = err - bound.double().cpu()
    assert torch.isfinite(err).all(), f"{what}: non-finite values"
    worst = int(excess.flatten().argmax())
    assert excess.max() <= 0, (
        f"{what}: error {err.flatten()[worst]:.3e} exceeds bound "
        f"{bound.double().flatten()[worst]:.3e} at flat index {worst}"
    )


def matmul_bound(
    x_abs: torch.Tensor,
    w_abs: torch.Tensor,
    bias: torch.Tensor | None,
    expected: torch.Tensor,
    out_dtype: torch.dtype,
    n_segments: int,
) -> torch.Tensor:
    """Bound on |kernel - reference| for y = x·wᵀ + b computed two ways in fp32.

    The reference (``quant_linear_reference``) rounds each dequantized operand once, sums
    K products in fp32 and adds the bias: <= (K + 3)·u·T, with T = |x|·|w|ᵀ + |b|. The
    kernel sums exactly in int32 (weight-only: a K-term fp32 dot, <= K·u·T), then rounds
    per segment scale product, segment sum and bias: <= (K + G + 3)·u·T for G segments.
    Their difference is within the sum, (2K + G + 8)·u·T with slack; both are then
    rounded to ``out_dtype``: one ulp there. On a GPU the tf32x3 dots of the fp32
    weight-only path earn a factor of 4.
    """
    k = x_abs.shape[-1]
    t = x_abs.double() @ w_abs.double().t()
    if bias is not None:
        t = t + bias.double().abs().cpu()[None, :]
    fp32 = (2 * k + n_segments + 8) * U32 * t * (4 if ON_GPU else 1)
    return fp32 + ulp_bound(out_dtype, expected.double().cpu().abs() + fp32)


def assert_twin(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Kernel vs its twin that spells out the same fp32 operations in the same order:
    bit-exact. The interpreter does IEEE fp32 op by op like torch; compiled kernels are
    launched with ``enable_fp_fusion=False`` so no a*b+c is contracted into an FMA."""
    actual = actual.cpu()
    assert actual.dtype == expected.dtype, f"{what}: {actual.dtype} vs {expected.dtype}"
    mismatch = (actual != expected) & ~(actual.isnan() & expected.isnan())
    assert not mismatch.any(), (
        f"{what}: {int(mismatch.sum())} of {mismatch.numel()} values differ, e.g. "
        f"{actual[mismatch][:4].tolist()} vs {expected[mismatch][:4].tolist()}"
    )


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-exact comparison (integers, scales computed by identical fp32 ops)."""
    actual = actual.cpu()
    assert actual.shape == expected.shape, f"{what}: {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: {actual.dtype} vs {expected.dtype}"
    mismatch = actual != expected
    assert not mismatch.any(), (
        f"{what}: {int(mismatch.sum())} of {mismatch.numel()} values differ, e.g. "
        f"{actual[mismatch][:4].tolist()} vs {expected[mismatch][:4].tolist()}"
    )


def random_activation(m: int, k: int, dtype: torch.dtype, seed: int, outliers: bool = True
                      ) -> torch.Tensor:
    """Gaussian activations with a few large channels, as DiT activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if outliers and k >= 8:
        cols = torch.randperm(k, generator=g)[: max(1, k // 32)]
        x[:, cols] *= 20.0
    return x.to(dtype)


def integer_activation(m: int, k: int, dtype: torch.dtype, seed: int, hi: int = 60
                       ) -> torch.Tensor:
    """Small integers: every product and partial sum with dyadic matrices (Hadamard
    blocks of size 4^j, int weights) is exactly representable, so any summation order
    gives the same bits and float dots can be compared exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-hi, hi + 1, (m, k), generator=g).to(dtype)


# Accuracy assumed of each path's float32 erf, tanh and exp: within FN_ULPS units in the
# last place (glibc, Sleef's u10/u35 routines that torch vectorizes with, numpy's SIMD
# loops that the interpreter calls, CUDA libdevice: 1 to 3.5 ulps).
FN_ULPS = 4


def _rounded(dtype: torch.dtype, v: torch.Tensor) -> torch.Tensor:
    """One path's error from rounding ``v`` to ``dtype`` (half an ulp; fp32 values
    already are fp32, their roundings are counted where they happen)."""
    return torch.zeros_like(v) if dtype == torch.float32 else 0.5 * ulp_bound(dtype, v)


def _norm_error(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm of float64 ``x`` over the last dim, one fp32 path's error bound).

    Whatever the order or merge (two-pass, Welford, Chan's tiles, a GPU's tree): the
    mean is within eμ = 4K·u·max|x| (K terms, each step a few roundings of at most
    max|x|); the biased variance, a K-term sum of (x − m)(x − m') over K with
    |x − m| <= 2·max|x|, within 32K·u·max|x|² + eμ² (the sum 4K·u·max|x|², each
    product's roundings 12u·max|x|², the means' errors through 2·|x − m|
    16K·u·max|x|²); 1/sqrt(var + eps) within half the variance's relative error plus
    four roundings. Normalizing as (x − μ)·r or as x·r − μ·r (torch's CPU kernel)
    rounds at most 2u·(|x| + |μ|)·r, then u·|n|. Loose for rows far from zero mean,
    but whatever the kernels' order."""
    k = x.shape[-1]
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    rstd = (var + eps).rsqrt()
    n = (x - mu) * rstd
    amax = x.abs().amax(-1, keepdim=True)
    e_mu = 4 * k * U32 * amax
    rel = 0.5 * (32 * k * U32 * amax**2 + e_mu**2) / (var + eps) + 4 * U32
    return n, (e_mu + 2 * U32 * (x.abs() + mu.abs())) * rstd + n.abs() * (rel + U32)


def _prologue_error(x: torch.Tensor, prologue: str | None, pro_mul: torch.Tensor | None,
                    pro_add: torch.Tensor | None, norm_eps: float, pro_fp32: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the prologue's exact value, one fp32 path's error bound), float64, x's shape.

    GELU: 0.5·x·(1 + f) with f = erf or tanh (torch) or 2·sigmoid − 1 (the kernel's tanh
    form): f's own error 2·FN_ULPS·u (|f| <= 1) from each of exp/erf/tanh and the division
    of the sigmoid, its argument's few roundings (at most 8u relative) moving f by less
    than 2u, two more roundings: (2·FN_ULPS + 5)·u·|x| in all. Each step rounds to x's
    dtype (to fp32 with ``pro_fp32``, then once to x's dtype)."""
    step = torch.float32 if pro_fp32 else x.dtype
    xd = x.double()
    err = torch.zeros_like(xd)
    if prologue in GELU_PROLOGUES:
        p = torch.nn.functional.gelu(xd, approximate=GELU_PROLOGUES[prologue])
        err = (2 * FN_ULPS + 5) * U32 * xd.abs()
        err = err + _rounded(step, p.abs() + err)
    elif prologue == "layer_norm":
        p, err = _norm_error(xd, norm_eps)
        err = err + _rounded(step, p.abs() + err)
    else:
        assert prologue is None, prologue
        p = xd
    for op, t in ((torch.mul, pro_mul), (torch.add, pro_add)):
        if t is not None:
            q = op(p, t.double().cpu())
            err = (err * t.double().cpu().abs() if op is torch.mul else err) + U32 * q.abs()
            p, err = q, err + _rounded(step, q.abs() + err)
    if pro_fp32:
        err = err + _rounded(x.dtype, p.abs() + err)
    return p, err.expand_as(p)


def transformed_bound(x: torch.Tensor, perm: torch.Tensor | None,
                      smooth: torch.Tensor | None, rot: torch.Tensor | None,
                      prologue: str | None = None, pro_mul: torch.Tensor | None = None,
                      pro_add: torch.Tensor | None = None,
                      norm_eps: float = DEFAULT_NORM_EPS, pro_fp32: bool = False
                      ) -> torch.Tensor:
    """Bound on |kernel − reference| for the activation a quantizer sees, (M, K) float64
    in the transformed column order: the prologue (``_prologue_error``), one rounding per
    smoothing multiply, a rotation's B-term dot per path ((B + 2)·u·Σ|p_j·h_j|, the +2
    for H's own rounding; 4x on a GPU's tf32x3 dot) with the prologue's error carried
    through |H|, then each path's rounding to x's dtype; both paths' errors added."""
    k = x.shape[-1]
    p, err = (t.reshape(-1, k) for t in _prologue_error(x.cpu(), prologue, pro_mul,
                                                         pro_add, norm_eps, pro_fp32))
    if perm is not None:
        p, err = p[:, perm.cpu()], err[:, perm.cpu()]
    if smooth is not None:
        p = p * smooth.double().cpu()
        err = err * smooth.double().cpu().abs() + U32 * p.abs()
    if rot is not None:
        h = rot.double().cpu()
        dot = (rot.shape[-1] + 2) * U32 * (4 if ON_GPU else 1)
        err = block_hadamard(err, h.abs()) + dot * block_hadamard(p.abs(), h.abs())
        p = block_hadamard(p, h)
    if perm is not None or smooth is not None or rot is not None:
        err = err + _rounded(x.dtype, p.abs() + err)
    return 2 * err


def quant_linear_arguments(*args, **kwargs) -> dict:
    """A ``clq::quant_linear`` call's arguments by name, defaults filled in (the form
    ``assert_quant_linear_agrees`` takes)."""
    call = inspect.signature(quant_linear_reference).bind(*args, **kwargs)
    call.apply_defaults()
    return dict(call.arguments)


def _reference_activation(args: dict) -> torch.Tensor:
    """What ``clq::quant_linear``'s reference quantizes: (M, K) in x's dtype."""
    x = apply_prologue(args["x"], args["prologue"], args["pro_mul"], args["pro_add"],
                       args["norm_eps"], args["pro_fp32"])
    if any(args[n] is not None for n in ("perm", "smooth", "rot")):
        x = transform_reference(x, args["perm"], args["smooth"], args["rot"])
    return x.reshape(-1, x.shape[-1])


def kernel_ints(q: torch.Tensor, a_bits: int, container: str) -> torch.Tensor:
    """The activation codes (M, K) from the quantize kernel's ``container``."""
    if container == "fp8":
        return q.cpu().float().to(torch.int8)
    return activation_ints(q.cpu(), a_bits if container == "packed" else 8)


def assert_codes_agree(ints: torch.Tensor, scale: torch.Tensor, t_ref: torch.Tensor,
                       bound: torch.Tensor, bits: int, group: int, clip: float, what: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's codes and scales against the reference quantizer of ``t_ref`` (the
    reference's transformed values, |kernel's − t_ref| <= ``bound``). Scales: the group
    absmax moves by at most the group's bound, so the scale by clip·bound/qmax, plus two
    roundings per path. Codes: equal, or one apart where the reference's quotient v lies
    within the two quotients' distance of a tie (|δt| + |v|·|δs|)/(s − |δs|) + two
    divisions per path. Returns the reference's (codes, scales)."""
    m, k = t_ref.shape
    g = group or k
    qmax = (1 << (bits - 1)) - 1
    ref = quantize(t_ref.float(), bits, group, clip, check=False)
    s_ref = ref.scale.reshape(m, -1).double()
    b = bound.reshape(m, -1, g)
    s_bound = clip * b.amax(-1) / qmax + 4 * U32 * s_ref
    assert_within(scale.reshape(m, -1), s_ref, s_bound, f"{what}: scales")
    v = t_ref.double().reshape(m, -1, g) / s_ref[..., None]
    dv = ((b + v.abs() * s_bound[..., None]) / (s_ref - s_bound).clamp_min(0)[..., None]
          + 4 * U32 * v.abs())
    near_tie = ((v - v.floor() - 0.5).abs() <= dv).reshape(m, k)
    diff = (ints.cpu().int() - ref.q.int()).abs()
    flipped = diff > 0
    assert int(diff.max()) <= 1 and not (flipped & ~near_tie).any(), (
        f"{what}: {int(flipped.sum())} codes differ, {int((flipped & ~near_tie).sum())} "
        f"away from a rounding tie (max difference {int(diff.max())}; "
        f"{int(near_tie.sum())} of {near_tie.numel()} quotients lie near one)")
    return ref.q, ref.scale.reshape(m, -1)


def _dequantized(ints: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    m, k = ints.shape
    return (ints.double().reshape(m, scale.shape[1], -1)
            * scale.double().cpu()[..., None]).reshape(m, k)


def assert_quant_linear_agrees(y: torch.Tensor, args: dict,
                               codes: tuple[torch.Tensor, torch.Tensor] | None, what: str
                               ) -> None:
    """A kernel's ``clq::quant_linear`` output ``y`` (and ``codes``: its activation's
    integers (M, K) and scales; None when weight-only) against the op's reference on the
    same ``args`` (the call's arguments by name). Codes and scales: ``assert_codes_agree``.
    Output: within the GEMM bound (``matmul_bound``, on |a| + |δa|) plus |δa|·|W|ᵀ, with
    δa the difference of the two paths' activations: exactly that of the dequantized
    codes (flipped codes and moved scales), or ``transformed_bound`` when weight-only."""
    x, a_bits, a_group = args["x"], args["a_bits"], args["a_group"]
    assert args["a_format"] == "int" and args["w_format"] == "int", args
    assert args["a8_rows"] is None, "per-sample bits"
    assert (codes is None) == (a_bits == 16), "codes come with quantized activations only"
    k = x.shape[-1]
    t_ref = _reference_activation(args).cpu()
    bound = transformed_bound(x, args["perm"], args["smooth"], args["rot"],
                              args["prologue"], args["pro_mul"], args["pro_add"],
                              args["norm_eps"], args["pro_fp32"])
    if codes is None:
        a_ref, delta = t_ref.double(), bound
    else:
        ints, scale = codes
        ints_ref, s_ref = assert_codes_agree(ints, scale, t_ref, bound, a_bits, a_group,
                                             args["a_clip"], what)
        a_ref = _dequantized(ints_ref, s_ref)
        delta = (_dequantized(ints.cpu(), scale.cpu().reshape(s_ref.shape)) - a_ref).abs()
    w = reference_weight(args["w_q"], args["w_scale"], args["w_bits"], "int", k).cpu()
    y_ref = quant_linear_reference(**args).cpu()
    n = y_ref.shape[-1]
    seg = min(a_group if a_group and a_bits < 16 else k, weight_group(k, args["w_scale"]) or k)
    bias = None if args["bias"] is None else args["bias"].cpu()
    out = matmul_bound(a_ref.abs() + delta, w.abs(), bias, y_ref.reshape(-1, n), x.dtype,
                       k // seg) + delta @ w.double().abs().t()
    assert_within(y.reshape(-1, n), y_ref.reshape(-1, n), out, f"{what}: output")


def assert_transform_agrees(y: torch.Tensor, args: dict, what: str) -> None:
    """A kernel's ``clq::transform`` against the op's reference on the same ``args``:
    within ``transformed_bound``."""
    k = args["x"].shape[-1]
    y_ref = transform_reference(**args).cpu()
    bound = transformed_bound(**args)
    assert_within(y.reshape(-1, k), y_ref.reshape(-1, k), bound, what)
