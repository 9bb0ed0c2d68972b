import pytest
import torch

from clq_compile.errors import ConfigError
from clq_compile.hadamard import block_diag, block_hadamard, choose_block, hadamard


@pytest.mark.parametrize("n", [1, 2, 4, 16, 128, 256])
def test_hadamard_is_orthonormal_and_pm_one(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-5)
    assert torch.equal(hadamard(n, normalized=False).abs(), torch.ones(n, n))


def test_non_power_of_two_rejected():
    with pytest.raises(ConfigError):
        hadamard(12)


def test_choose_block_falls_back_with_reason():
    assert choose_block(1152, 128) == (128, "")
    b, why = choose_block(96, 128)
    assert b == 32 and "does not divide" in why
    b, why = choose_block(1152, 256)
    assert b == 128 and "256" in why


def test_block_hadamard_matches_dense_block_diagonal():
    x = torch.randn(3, 5, 96)
    rot = hadamard(32)
    assert torch.allclose(block_hadamard(x, rot), x @ block_diag(rot, 96), atol=1e-5)
