"""Bad input gets a clear, named error before any work starts."""

import pytest
import torch

import clq_compile as clq
from clq_compile.testing import tiny_pixart


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart()


def test_empty_calibration(pixart):
    model, _ = pixart
    with pytest.raises(clq.CalibrationError, match="empty"):
        clq.quantize(model, [])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_names_the_input(pixart, bad):
    model, inputs = pixart
    call = inputs(0)
    call["encoder_hidden_states"][0, 1, 2] = bad
    with pytest.raises(clq.CalibrationError, match="encoder_hidden_states"):
        clq.quantize(model, [inputs(1), call])


def test_calibration_not_matching_forward(pixart):
    model, inputs = pixart
    call = inputs(0)
    call["hiden_states"] = call.pop("hidden_states")
    with pytest.raises(clq.CalibrationError, match="does not match"):
        clq.quantize(model, [call])


def test_calibration_calls_with_different_structure(pixart):
    """An input the first call left at its default (None) and a later call passes as a
    tensor cannot share one graph: named, with the call index."""
    model, inputs = pixart
    second = inputs(1)
    second["encoder_attention_mask"] = torch.ones(2, 6)
    with pytest.raises(clq.CalibrationError, match="call 1: input encoder_attention_mask"):
        clq.quantize(model, [inputs(0), second])


def test_unknown_recipe_bits_and_option(pixart):
    model, inputs = pixart
    with pytest.raises(clq.ConfigError, match="unknown recipe"):
        clq.quantize(model, [inputs(0)], recipe="gptq-magic")
    with pytest.raises(clq.ConfigError, match="unknown bits"):
        clq.quantize(model, [inputs(0)], bits="w3a5")
    with pytest.raises(clq.ConfigError, match="no option"):
        clq.quantize(model, [inputs(0)], recipe="rtn", alpha=0.5)


def test_capture_error_names_the_problem():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            n = int((x > 0).sum())  # data-dependent python int: not exportable
            return self.lin(x)[:, :n]

    with pytest.raises(clq.CaptureError, match="DataDependent"):
        clq.quantize(DataDependent(), [(torch.randn(2, 4),)])
