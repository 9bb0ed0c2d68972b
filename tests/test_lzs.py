"""QuaRTZ leading-zero suppression (clq_compile/lzs.py): exact integer behaviour on
hand-computed examples, the integer GEMM against float64, and where it beats INT4."""

from __future__ import annotations

import pytest
import torch

from clq_compile.errors import QuantizationError
from clq_compile.lzs import lzs_decode, lzs_encode, lzs_fake_quantize, lzs_matmul
from clq_compile.qlinear import sqnr
from clq_compile.quant import quantize


def group_of(*values: int, group: int = 16) -> torch.Tensor:
    return torch.tensor(list(values) + [0] * (group - len(values)), dtype=torch.int8)


def test_paper_example() -> None:
    """[100, 3, -2, 10]: the OR of the magnitudes needs 7 bits, FLAG 4; 100 >> 4 = 6
    (stands for 96), and 3, -2, 10 all become 0 (methods.md §2)."""
    codes, flags = lzs_encode(group_of(100, 3, -2, 10), 16)
    assert flags.tolist() == [4]
    assert codes.tolist() == group_of(6, 0, 0, 0).tolist()
    assert lzs_decode(codes, flags, 16).tolist() == group_of(96).tolist()


@pytest.mark.parametrize(("peak", "flag"), [(0, 0), (7, 0), (8, 1), (15, 1), (16, 2), (31, 2),
                                            (32, 3), (63, 3), (64, 4), (127, 4)])
def test_flag_bands(peak: int, flag: int) -> None:
    """FLAG = max(bitlen(m) - 3, 0): 0-7 lossless, 8-15 → 1, ..., 64-127 → 4; the peak
    keeps its top three bits, with its sign."""
    codes, flags = lzs_encode(group_of(5, -peak, group=32), 32)
    assert flags.tolist() == [flag]
    assert codes[:2].tolist() == [5 >> flag, -(peak >> flag)]


def test_truncates_toward_zero_in_sign_magnitude() -> None:
    """11 and -11 in a group whose peak is 15 (FLAG 1): 11 >> 1 = 5 (10), not rounded to
    6 (12); the sign is applied after the shift, so -11 gives -10, not -12."""
    codes, flags = lzs_encode(group_of(15, 11, -11), 16)
    assert flags.tolist() == [1]
    assert lzs_decode(codes, flags, 16)[:3].tolist() == [14, 10, -10]


def test_small_groups_are_lossless_and_groups_are_independent() -> None:
    x8 = torch.cat([group_of(7, -7, 3), group_of(120, 9)])
    codes, flags = lzs_encode(x8, 16)
    assert flags.tolist() == [0, 4]
    assert torch.equal(lzs_decode(codes, flags, 16)[:16], x8[:16].int())
    assert codes.abs().max() <= 7


def test_integer_gemm_is_exact() -> None:
    """Per-group partial sums shifted by their flags equal the decoded values' product,
    bit for bit (unit scales; every sum is an integer below 2^24, exact in float32)."""
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(-127, 128, (5, 64), generator=g, dtype=torch.int8)
    x8[:, 16:32] = torch.randint(-7, 8, (5, 16), generator=g, dtype=torch.int8)  # FLAG 0
    w = torch.randint(-8, 8, (6, 64), generator=g, dtype=torch.int8)
    codes, flags = lzs_encode(x8, 16)
    out = lzs_matmul(codes, flags, torch.ones(5, 1), w, torch.ones(6, 1), 16)
    ref = lzs_decode(codes, flags, 16).double() @ w.double().T
    assert torch.equal(out.double(), ref)
    scaled = lzs_matmul(codes, flags, torch.full((5, 1), 0.5), w, torch.full((6, 1), 0.25), 16)
    assert torch.equal(scaled, (ref * 0.125).float())


def test_beats_int4_per_token_on_an_outlier_channel() -> None:
    """One outlier channel per token sets INT4's per-token scale, so every other value
    rounds to 0; LZS shifts only the group holding the outlier (QuaRTZ's argument: it
    wins when few groups need a large shift)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[:, 3] *= 60
    int4 = quantize(x, 4, 0).dequantize()
    lzs = lzs_fake_quantize(x, 16)
    assert sqnr(x, lzs) > sqnr(x, int4) + 3


def test_errors() -> None:
    with pytest.raises(QuantizationError, match="group 8"):
        lzs_encode(torch.zeros(4, 16, dtype=torch.int8), 8)
    with pytest.raises(QuantizationError, match="does not divide"):
        lzs_encode(torch.zeros(4, 24, dtype=torch.int8), 16)
    with pytest.raises(QuantizationError, match="127"):
        lzs_encode(group_of(-128), 16)
