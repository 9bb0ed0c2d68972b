"""Fused transform + activation-quantize kernel vs ``clq_compile.quant`` / ``ops``.

Bit-exact where the math is exact: scales are max(clip*absmax, EPS)/qmax with the same
fp32 multiply and IEEE division, integers are round-half-even of the same fp32 quotient,
and perm / smooth are one fp32 multiply per element. A rotation is a B-term fp32 dot
whose summation order differs between tl.dot and torch, so it is compared exactly only on
inputs where every partial sum is representable (integers x Hadamard of size 4^j, whose
entries are powers of two), and otherwise within the derived bound below.
"""

from __future__ import annotations

import pytest
import torch

from clq_compile.hadamard import hadamard
from clq_compile.lowering.triton.act_quant import rotate_quantize, transform
from clq_compile.lowering.triton.reference import activation_ints, rotate_quantize_reference
from clq_compile.lowering.triton.support import Unsupported, modulation_operand
from clq_compile.ops import transform_reference
from clq_compile.qlinear import sqnr
from clq_compile.testing import lzs_threshold_row
from tests.triton.helpers import (
    U32,
    assert_equal,
    assert_within,
    integer_activation,
    random_activation,
    ulp_bound,
)

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_quant(x, perm, smooth, rot, bits, group, clip, device, round_in=True) -> None:
    q, s = rotate_quantize(x.to(device), _dev(perm, device), _dev(smooth, device),
                           _dev(rot, device), bits, group, clip, round_in)
    q_ref, s_ref = rotate_quantize_reference(x, perm, smooth, rot, bits, group, clip, round_in)
    assert_equal(s, s_ref, "scales")
    assert_equal(q, q_ref, "quantized values")


def _dev(t: torch.Tensor | None, device: str) -> torch.Tensor | None:
    return None if t is None else t.to(device)


# (M, K, dtype, bits, group, clip): ragged M (1, 17, 33, 48), K not a multiple of the
# K tile (96, 160: tiles of 64), per token and per group, both bit widths, clip < 1.
_PLAIN_CASES = [
    (1, 64, "fp32", 4, 0, 1.0),
    (17, 96, "bf16", 4, 0, 1.0),
    (33, 160, "fp16", 4, 0, 0.85),
    (48, 256, "bf16", 8, 0, 1.0),
    (17, 96, "fp32", 8, 0, 0.7),
    (17, 128, "bf16", 4, 16, 1.0),
    (33, 192, "fp32", 4, 64, 0.9),
    (48, 128, "fp16", 8, 32, 1.0),
    (5, 256, "bf16", 4, 128, 1.0),
    (9, 96, "bf16", 4, 96, 1.0),  # one group spanning K (not a power of two) = per token
]


@pytest.mark.parametrize(("m", "k", "dt", "bits", "group", "clip"), _PLAIN_CASES)
def test_quantize_bit_exact(m, k, dt, bits, group, clip, device) -> None:
    """No transform: integers (packed for 4 bits) and scales equal clq_compile.quant."""
    x = random_activation(m, k, _DT[dt], seed=m * k + bits)
    _check_quant(x, None, None, None, bits, group, clip, device)


def test_quantize_edge_values_bit_exact(device) -> None:
    """An all-zero row (scale EPS/qmax), exact .5 ties (half-to-even), values that the clip
    pushes past qmax (clamped), and a 3-D input (leading dims flattened)."""
    x = random_activation(2 * 9, 64, torch.float32, seed=3).reshape(2, 9, 64)
    x[0, 0] = 0.0
    x[0, 1, :8] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])  # scale 1 -> ties
    x[0, 1, 8:] = 0.25
    for bits, group, clip in ((4, 0, 1.0), (4, 0, 0.5), (8, 0, 1.0), (4, 16, 1.0)):
        _check_quant(x, None, None, None, bits, group, clip, device)
    q, _ = rotate_quantize(x.to(device), None, None, None, 4, 0, 1.0)
    assert q.shape == (18, 32)


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize(("bits", "group"), [(4, 0), (4, 32), (8, 0)])
def test_perm_smooth_bit_exact(dt, bits, group, device) -> None:
    """Channel gather and per-channel scaling are single fp32 operations per element."""
    m, k = 20, 128
    x = random_activation(m, k, _DT[dt], seed=7)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(k, generator=g)
    smooth = torch.rand(k, generator=g) + 0.25
    _check_quant(x, perm, smooth, None, bits, group, 1.0, device)


@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("b", "k", "group"), [(16, 96, 0), (64, 128, 0), (64, 192, 64),
                                               (16, 64, 32)])
def test_rotation_bit_exact_on_exact_inputs(dt, b, k, group, device) -> None:
    """Integer activations, power-of-two smooth and Hadamard blocks of 16 and 64 (entries
    ±1/4, ±1/8): every sum is exact, so the fused kernel must match bit for bit,
    including the rounding of the transformed values to the input dtype."""
    m = 19
    x = integer_activation(m, k, _DT[dt], seed=b + k)
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(k, generator=g)
    smooth = 2.0 ** torch.randint(-2, 3, (k,), generator=g).float()
    rot = hadamard(b)
    for bits in (4, 8):
        _check_quant(x, perm, smooth, rot, bits, group, 1.0, device)
    _check_quant(x, perm, smooth, rot, 4, group, 1.0, device, round_in=False)
    y = transform(x.to(device), perm.to(device), smooth.to(device), rot.to(device))
    assert_equal(y, transform_reference(x, perm, smooth, rot), "transform")


def _rotation_error_bound(x, perm, smooth, rot, dtype) -> torch.Tensor:
    """|kernel - reference| for transformed values: two B-term fp32 dots (2·gamma_B on
    sum|x_j h_j|) plus one ulp of the dtype both round to."""
    xs = x.double()[:, perm] * smooth.double()
    b = rot.shape[0]
    blocks = xs.abs().reshape(x.shape[0], -1, b) @ rot.double().abs()
    fp32 = 2 * (b + 2) * U32 * blocks.reshape(x.shape)
    ref = transform_reference(x.float(), perm, smooth, rot).double()
    return fp32 + (ulp_bound(dtype, ref.abs() + fp32) if dtype != torch.float32 else 0)


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize(("b", "group"), [(32, 0), (128, 0), (32, 32)])
def test_rotation_general_inputs(dt, b, group, device) -> None:
    """Random inputs and B = 32, 128 (entries ±1/sqrt(B), not dyadic).

    Transformed values: within the bound above. Scales: the row/group absmax moves by at
    most that bound, so scale differs by at most clip·bound/qmax plus its own two
    roundings. Integers: may differ by one, and only where the reference quotient lies
    within the propagated error of a rounding tie or of the clamp edge.
    """
    m, k, bits, qmax = 24, 256, 4, 7
    dtype = _DT[dt]
    x = random_activation(m, k, dtype, seed=b)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(k, generator=g)
    smooth = torch.rand(k, generator=g) + 0.5
    rot = hadamard(b)
    err = _rotation_error_bound(x, perm, smooth, rot, dtype)

    y = transform(x.to(device), perm.to(device), smooth.to(device), rot.to(device))
    y_ref = transform_reference(x, perm, smooth, rot)
    assert_within(y, y_ref, err, "transformed values")

    q, s = rotate_quantize(x.to(device), perm.to(device), smooth.to(device), rot.to(device),
                           bits, group)
    q_ref, s_ref = rotate_quantize_reference(x, perm, smooth, rot, bits, group)
    gsz = group or k
    err_g = err.reshape(m, -1, gsz).amax(-1)
    s_bound = err_g / qmax + 4 * U32 * s_ref.double()
    assert_within(s, s_ref, s_bound, "scales")

    from clq_compile.quant import unpack_int4

    qi, qi_ref = unpack_int4(q.cpu()).int(), unpack_int4(q_ref).int()
    diff = (qi - qi_ref).abs()
    assert diff.max() <= 1
    v = y_ref.double().reshape(m, -1, gsz) / s_ref.double()[:, :, None]
    dv = (err.reshape(m, -1, gsz) / s_ref.double()[:, :, None]
          + v.abs() * (s_bound / s_ref.double())[:, :, None] + 8 * U32 * v.abs())
    near_tie = (v - v.floor() - 0.5).abs() <= dv
    near_clamp = (v.abs() - (qmax + 0.5)).abs() <= dv
    explained = (near_tie | near_clamp).reshape(m, k)
    assert not (diff.bool() & ~explained).any(), "integer mismatch away from a rounding edge"


@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
def test_transform_only_matches_op_reference(dt, device) -> None:
    """clq::transform semantics (fp32 math, output in x's dtype) on any subset of
    perm / smooth / rot, exact inputs so the comparison is bit for bit."""
    m, k = 10, 64
    x = integer_activation(m, k, _DT[dt], seed=11)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(4))
    smooth = torch.full((k,), 0.5)
    rot = hadamard(16)
    for args in ((perm, None, None), (None, smooth, None), (None, None, rot),
                 (perm, smooth, rot), (None, None, None)):
        y = transform(x.to(device), *(_dev(a, device) for a in args))
        assert_equal(y, transform_reference(x, *args), f"transform {[a is not None for a in args]}")


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize(("dt", "rot_b"), [("bf16", 0), ("fp32", 0), ("fp16", 0), ("bf16", 64)])
def test_prologue_gelu(kind, dt, rot_b, device) -> None:
    """GELU fused in front of the quantizer. Triton's erf / sigmoid and torch's erf / tanh
    are different fp32 approximations (a few ulps apart), so a value near a rounding
    boundary of x's dtype or of the quantization grid may land one step apart: at most
    0.5% of the codes may differ, each by 1, and every scale within 2 ulps of x's dtype
    (the row absmax moves by at most one rounding). With a rotation, in bf16 only: its
    fp32 summation-order differences stay far below the bf16 rounding after it."""
    m, k = 33, 128
    x = random_activation(m, k, _DT[dt], seed=7)
    rot = hadamard(rot_b) if rot_b else None
    q, s = rotate_quantize(x.to(device), None, None, _dev(rot, device), 4, 0, 1.0,
                           prologue=kind)
    q_ref, s_ref = rotate_quantize_reference(x, None, None, rot, 4, 0, 1.0, prologue=kind)
    assert_within(s, s_ref, 2 * ulp_bound(_DT[dt], s_ref), "scales")
    a, a_ref = activation_ints(q.cpu(), 4), activation_ints(q_ref, 4)
    diff = (a.int() - a_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.005, \
        f"{int((diff > 0).sum())} of {diff.numel()} codes differ"


def _modulation(shape: tuple[int, ...], dtype: torch.dtype, seed: int, offset: float = 0.0
                ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.5 + offset).to(dtype)


# (B, T, K, dtype, modulation shape (None: that operand absent), bits, group, perm and
# H64, container): per sample (adaLN), per token, one row for all; K=96 ends on a part
# tile (64 wide); mul only and add only; 8-bit groups; the fp8 and int8 containers; the
# prologue in fp32 on a bf16 x (fp32 operands, one rounding at the end); a per-sample
# mul beside a one-row add (each operand indexes its own rows).
_NORM_CASES = [
    (2, 9, 96, "fp32", (2, 1, 96), (2, 1, 96), 4, 0, False, "packed", False),
    (3, 7, 128, "bf16", (3, 1, 128), (3, 1, 128), 4, 0, True, "packed", False),
    (2, 5, 128, "fp16", (2, 5, 128), None, 8, 32, False, "packed", False),
    (1, 17, 64, "bf16", None, (64,), 8, 0, True, "int8", False),
    (2, 8, 128, "bf16", (2, 1, 128), (2, 1, 128), 4, 0, True, "fp8", False),
    (2, 3, 64, "fp32", None, None, 4, 0, False, "packed", False),
    (2, 9, 128, "bf16", (2, 1, 128), (2, 1, 128), 4, 0, True, "packed", True),  # Wan's fp32
    (3, 5, 64, "fp32", (3, 1, 64), (64,), 8, 0, False, "packed", False),  # rows differ
]


@pytest.mark.parametrize(("b", "t", "k", "dt", "mul", "add", "bits", "group", "rot", "box",
                          "fp32"), _NORM_CASES)
def test_prologue_layer_norm(b, t, k, dt, mul, add, bits, group, rot, box, fp32,
                             device) -> None:
    """LayerNorm + adaLN modulation fused in front of the quantizer. The kernel's row
    statistics are a tiled fp32 reduction, torch's another order: the normalized values
    are a few fp32 ulps apart before rounding to x's dtype, so, as for GELU, at most 0.5%
    of the codes may differ, each by 1, and each scale within 2 ulps of x's dtype (64 fp32
    ulps for fp32 x: no rounding to a coarser dtype absorbs the statistics' error). Rows
    carry a mean of 30 against a spread of 1, where a one-pass E[x²] − mean² would lose
    the variance."""
    dtype = _DT[dt]
    x = (random_activation(b * t, k, torch.float32, seed=5) + 30.0).to(dtype).reshape(b, t, k)
    mod = torch.float32 if fp32 else dtype
    pro_mul = None if mul is None else _modulation(mul, mod, 1, offset=1.0)
    pro_add = None if add is None else _modulation(add, mod, 2)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3)) if rot else None
    h = hadamard(64) if rot else None
    kernel_form = [_dev(modulation_operand(o, x.shape, mod), device) for o in (pro_mul, pro_add)]
    q, s = rotate_quantize(x.to(device), _dev(perm, device), None, _dev(h, device), bits,
                           group, 1.0, container=box, prologue="layer_norm",
                           pro_mul=kernel_form[0], pro_add=kernel_form[1], norm_eps=1e-6,
                           pro_fp32=fp32)
    q_ref, s_ref = rotate_quantize_reference(x, perm, None, h, bits, group, 1.0,
                                             prologue="layer_norm", pro_mul=pro_mul,
                                             pro_add=pro_add, norm_eps=1e-6, pro_fp32=fp32)
    ulps = 64 if dtype == torch.float32 else 2
    assert_within(s.reshape(s_ref.shape), s_ref, ulps * ulp_bound(dtype, s_ref), "scales")
    if box == "fp8":
        a = q.cpu().float().to(torch.int8)
    else:
        a = activation_ints(q.cpu(), bits if box == "packed" else 8)
    a_ref = activation_ints(q_ref, bits)
    diff = (a.int() - a_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.005, \
        f"{int((diff > 0).sum())} of {diff.numel()} codes differ"


@pytest.mark.parametrize(("dt", "floor"), [("fp32", 110.0), ("bf16", 40.0)])
def test_transform_with_norm_prologue(dt, floor, device) -> None:
    """clq::transform holding LayerNorm + adaLN (the input of q/k/v that CLPS gave their
    own clips): the row kernel in transform-only mode. Its row statistics differ from
    torch's in summation order, so a normalized value may round to the neighbouring
    value of x's dtype before the rotation mixes 64 of them: an SQNR floor (one bf16
    step on a few values stays above 40 dB; measured here: fp32 135 dB, bf16 exact), far
    above a wrong prologue (no modulation 6.8 dB, another sample's row 1.6 dB, no norm
    1.1 dB against the reference)."""
    dtype = _DT[dt]
    b, t, k = 3, 7, 128
    x = (random_activation(b * t, k, torch.float32, seed=8) + 3.0).to(dtype).reshape(b, t, k)
    mul, add = (_modulation((b, 1, k), dtype, s, offset=o) for s, o in ((1, 1.0), (2, 0.0)))
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(6))
    h = hadamard(64)
    rows = [_dev(modulation_operand(o, x.shape, dtype), device) for o in (mul, add)]
    y = transform(x.to(device), _dev(perm, device), None, _dev(h, device),
                  prologue="layer_norm", pro_mul=rows[0], pro_add=rows[1], norm_eps=1e-6)
    ref = transform_reference(x, perm, None, h, "layer_norm", mul, add, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    assert sqnr(y.cpu().float(), ref.float()) > floor


def test_layer_norm_rows_past_k_stay_out_of_the_absmax(device) -> None:
    """K=80 is not a multiple of the K tile (64 here, 128 on a GPU): the last tile's 48
    padding columns load as 0, which the norm maps to −mean·rstd. Rows with mean 30 and
    spread 1 put that at about −30, ten times the real values' absmax: left unmasked it
    would set every row's scale."""
    x = random_activation(6, 80, torch.float32, seed=2, outliers=False) + 30.0
    q, s = rotate_quantize(x.to(device), None, None, None, 8, 0, 1.0, prologue="layer_norm")
    q_ref, s_ref = rotate_quantize_reference(x, None, None, None, 8, 0, 1.0,
                                             prologue="layer_norm")
    assert_within(s, s_ref, 64 * ulp_bound(torch.float32, s_ref), "scales")
    assert (q.cpu().int() - q_ref.int()).abs().max() <= 1


def test_modulation_operand_refuses_other_broadcasts() -> None:
    x = torch.empty(2, 5, 8)
    assert modulation_operand(torch.ones(2, 1, 8), x.shape, x.dtype).shape == (2, 8)
    assert modulation_operand(torch.ones(8), x.shape, x.dtype).shape == (1, 8)
    for bad, why in ((torch.ones(1, 5, 8), "per sample or token"),
                     (torch.ones(2, 1, 8, dtype=torch.bfloat16), "bfloat16")):
        with pytest.raises(Unsupported, match=why):
            modulation_operand(bad, x.shape, x.dtype)


@pytest.mark.parametrize(("m", "k", "dt", "lzs_group", "clip", "b"), [
    (17, 96, "bf16", 16, 1.0, 0),   # K not a multiple of the K tile
    (9, 128, "fp32", 32, 0.8, 0),
    (19, 128, "bf16", 16, 1.0, 64),  # exact inputs through perm, smooth and H64
])
def test_lzs_bit_exact(m, k, dt, lzs_group, clip, b, device) -> None:
    """LZS (QuaRTZ): int8 per token, then per group the low FLAG bits dropped. Integers
    (stored decoded, code << FLAG) and token scales equal clq_compile.lzs; with a
    rotation, on inputs whose transform is exact (see test_rotation_bit_exact_...)."""
    if b:
        x = integer_activation(m, k, _DT[dt], seed=k)
        g = torch.Generator().manual_seed(2)
        perm, rot = torch.randperm(k, generator=g), hadamard(b)
        smooth = 2.0 ** torch.randint(-2, 3, (k,), generator=g).float()
    else:
        x = random_activation(m, k, _DT[dt], seed=m * k)
        x[0, :lzs_group] *= 1e-3  # a group far below the row's absmax: FLAG 0
        x[1] = lzs_threshold_row(k, lzs_group, clip).to(x.dtype)  # peaks at 8, 16, 32, 64
        perm = smooth = rot = None
    q, s = rotate_quantize(x.to(device), _dev(perm, device), _dev(smooth, device),
                           _dev(rot, device), 8, 0, clip, lzs_group=lzs_group)
    q_ref, s_ref = rotate_quantize_reference(x, perm, smooth, rot, 8, 0, clip,
                                             lzs_group=lzs_group)
    assert_equal(s, s_ref, "scales")
    assert_equal(q, q_ref, "LZS values")
    if not b:  # both ends of the FLAG range ran
        peaks = q_ref.reshape(m, -1, lzs_group).abs().amax(-1)
        assert (peaks < 8).any() and (peaks >= 64).any()


def test_lzs_refuses_what_it_cannot_code(device) -> None:
    x = random_activation(4, 64, torch.float32, seed=0).to(device)
    for bits, group, lzs_group in ((4, 0, 16), (8, 32, 16), (8, 0, 8)):
        with pytest.raises(Unsupported, match="LZS group"):
            rotate_quantize(x, None, None, None, bits, group, 1.0, lzs_group=lzs_group)
