"""Shared data makers and tolerance checks for the kernel tests.

Tolerances are derived, not tuned. Two float computations of the same exact sum differ
by at most the sum of their rounding-error bounds (Higham: a length-n fp32 dot product
is within gamma_n = n*u/(1-n*u) of exact, relative to sum|terms|, u = 2^-24), plus one
unit in the last place of the output dtype when both are rounded to it.
"""

from __future__ import annotations

import torch

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
