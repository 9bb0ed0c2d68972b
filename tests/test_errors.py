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


def test_measure_and_dynamic_shapes_are_checked_where_they_enter(pixart):
    """A truthy string is not a flag, and torch.export's own failure on a malformed
    dynamic_shapes does not name the option."""
    model, inputs = pixart
    with pytest.raises(clq.ConfigError, match="option measure='yes'"):
        clq.quantize(model, [inputs(0)], measure="yes")
    with pytest.raises(clq.ConfigError, match="option measure=1 "):
        clq.api.plan_model(model, [inputs(0)], measure=1)
    with pytest.raises(clq.ConfigError, match="option dynamic_shapes=5 "):
        clq.quantize(model, [inputs(0)], dynamic_shapes=5)
    with pytest.raises(clq.ConfigError, match=r"names \['hiden_states'\].*hidden_states"):
        clq.quantize(model, [inputs(0)], dynamic_shapes={"hiden_states": {0: None}})


def test_inspect_export_and_record_name_what_they_take(pixart):
    model, inputs = pixart
    with pytest.raises(TypeError, match="takes a QuantizedModel .*got PixArtTransformer2DModel"):
        clq.inspect(model)
    qm = clq.quantize(model, [inputs(0)], measure=False, extra_shapes=None)
    with pytest.raises(clq.ConfigError, match="option tablefmt='markdown'"):
        clq.inspect(qm, tablefmt="markdown")
    assert clq.inspect(qm, tablefmt="github").startswith("| ")
    with pytest.raises(TypeError, match="export_onnx takes a QuantizedModel .*quantize it"):
        clq.export_onnx(model, "never_written.onnx")
    with pytest.raises(TypeError, match="record_calls takes the torch.nn.Module"):
        with clq.record_calls("transformer"):
            pass


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
