"""A quantized model takes what the model takes: positional or keyword arguments,
omitted defaults (``return_dict`` included), any batch, and the token counts the model
lets vary; a call it cannot take names the input, the captured size and the remedy."""

import logging

import pytest
import torch

import clq_compile as clq
from clq_compile.qlinear import sqnr
from clq_compile.testing import TINY_MODELS, tiny_pixart

W8A8_FLOOR_DB = 30.0  # W8A8 on these random-weight models keeps ~50-60 dB; a call routed
# to the wrong graph or inputs bound to the wrong names land near 0 dB


@pytest.fixture(scope="module")
def pixart_q():
    model, inputs = tiny_pixart()
    qm = clq.quantize(model, [inputs(i) for i in range(2)], recipe="rtn", bits="w8a8")
    return model, inputs, qm


def _close(model, qm, x):
    with torch.no_grad():
        return sqnr(model(**x)[0], qm(**x)[0])


def test_positional_and_keyword_calls_agree(pixart_q):
    model, inputs, qm = pixart_q
    x = inputs(5)
    hs = x.pop("hidden_states")
    with torch.no_grad():
        assert torch.equal(qm(hs, **x)[0], qm(hidden_states=hs, **x)[0])


def test_omitted_return_dict_returns_the_models_output_class(pixart_q):
    model, inputs, qm = pixart_q
    x = inputs(5)
    x.pop("return_dict")
    with torch.no_grad():
        ref, out = model(**x), qm(**x)
    assert type(out) is type(ref)
    assert torch.equal(out.sample, qm(**x, return_dict=False)[0])


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_any_batch(pixart_q, batch):
    model, inputs, qm = pixart_q
    assert _close(model, qm, inputs(6, b=batch)) > W8A8_FLOOR_DB


def test_other_caption_length(pixart_q):
    model, inputs, qm = pixart_q
    x = inputs(6, b=3)
    x["encoder_hidden_states"] = torch.randn(3, 11, 32)
    assert _close(model, qm, x) > W8A8_FLOOR_DB


@pytest.mark.parametrize("size", [12, 16, 6])
def test_other_resolution_runs_through_a_second_graph(pixart_q, size):
    """PixArt builds its positional embedding for one resolution (a guard); the probe at
    doubled sizes captured a second graph that takes every other resolution."""
    model, inputs, qm = pixart_q
    assert len(qm.graphs) == 2
    x = inputs(7)
    x["hidden_states"] = torch.randn(2, 4, size, size)
    assert _close(model, qm, x) > W8A8_FLOOR_DB


def test_explicit_extra_shapes():
    model, inputs = tiny_pixart()
    other = inputs(1)
    other["hidden_states"] = torch.randn(2, 4, 10, 10)
    qm = clq.quantize(model, [inputs(0)], bits="w8a8", extra_shapes=[other])
    assert len(qm.graphs) == 2
    x = inputs(3)
    x["hidden_states"] = torch.randn(2, 4, 14, 14)
    assert _close(model, qm, x) > W8A8_FLOOR_DB


def test_calibration_at_two_resolutions_gets_two_graphs(caplog):
    model, inputs = tiny_pixart()
    other = inputs(1)
    other["hidden_states"] = torch.randn(2, 4, 12, 12)
    with caplog.at_level(logging.WARNING, logger="clq_compile"):
        qm = clq.quantize(model, [inputs(0), other, inputs(2)], bits="w8a8", extra_shapes=None)
    assert len(qm.graphs) == 2 and qm.plan.meta["calib_calls"] == 2
    assert any("calibrating on the 2 of 3 calls" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name,change", [
    ("sd3", {"hidden_states": (3, 4, 12, 12)}),  # resolution (cropped positional table)
    ("wan", {"hidden_states": (1, 4, 3, 10, 12)}),  # frames and resolution
])
def test_models_that_allow_other_sizes_take_them_in_one_graph(name, change):
    model, inputs = TINY_MODELS[name]()
    qm = clq.quantize(model, [inputs(0)], bits="w8a8", extra_shapes=None)
    (key, shape), = change.items()
    x = inputs(4, b=shape[0])
    x[key] = torch.randn(shape)
    assert _close(model, qm, x) > W8A8_FLOOR_DB


def test_flux_other_token_counts():
    model, inputs = TINY_MODELS["flux"]()
    qm = clq.quantize(model, [inputs(0)], bits="w8a8", extra_shapes=None)
    x = inputs(4, b=3)
    img, txt = 25, 7
    x["hidden_states"] = torch.randn(3, img, 16)
    x["img_ids"] = torch.stack([torch.zeros(img), torch.arange(img) // 5,
                                torch.arange(img) % 5], -1).float()
    x["encoder_hidden_states"] = torch.randn(3, txt, 32)
    x["txt_ids"] = torch.zeros(txt, 3)
    assert _close(model, qm, x) > W8A8_FLOOR_DB


def test_mismatched_dynamic_sizes_are_named(pixart_q):
    model, inputs, qm = pixart_q
    x = inputs(5)
    x["timestep"] = torch.randint(0, 1000, (3,))
    with pytest.raises(clq.InputError, match=r"timestep dim 0 is 3 but hidden_states dim 0 is 2"):
        qm(**x)


def test_a_tensor_where_the_graph_had_none_is_named(pixart_q):
    model, inputs, qm = pixart_q
    x = inputs(5)
    x["attention_mask"] = torch.ones(2, 16)
    with pytest.raises(clq.InputError, match=r"input attention_mask is a torch.float32 tensor"):
        qm(**x)


def test_pipeline_attributes_and_device_moves(pixart_q):
    model, inputs, qm = pixart_q
    assert qm.dtype == torch.float32 and qm.device == torch.device("cpu")
    assert qm.config.sample_size == model.config.sample_size  # attribute access, as pipelines do
    with pytest.raises(clq.ConfigError, match="cannot convert a quantized torch.float32"):
        qm.to(torch.float16)
    assert qm.to("cpu") is qm


def test_record_calls_keeps_an_even_spread_within_budget():
    class Net(torch.nn.Module):
        def forward(self, x, t, scale=1.0):
            return x * scale

    net = Net()
    with clq.record_calls(net, max_calls=8) as calib:
        for step in range(100):
            net(torch.full((2, 3), float(step)), torch.tensor([step]), scale=2.0)
    assert len(calib) == 8
    steps = [int(c["t"]) for c in calib]
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] >= 84
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert max(gaps) - min(gaps) <= 8  # evenly spread over all 100 calls
    assert set(calib[0]) == {"x", "t", "scale"}  # positional arguments are named


def test_record_calls_clones_what_it_records():
    net = torch.nn.Linear(3, 3)
    x = torch.zeros(2, 3)
    with clq.record_calls(net) as calib:
        net(x)
    x += 1.0
    assert float(calib[0]["input"].sum()) == 0.0
