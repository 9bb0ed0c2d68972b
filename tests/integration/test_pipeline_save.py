"""A pipeline holding a quantized transformer, saved with diffusers' ``save_pretrained``.

diffusers 0.42 (``DiffusionPipeline.save_pretrained``) saves a component through its own
``save_pretrained`` only when its class derives from one of diffusers'/transformers' base
classes (``ModelMixin``, ..., ``LOADABLE_CLASSES``); any other component is skipped with a
"cannot be saved" warning and written as ``[null, null]`` in model_index.json, a folder
that does not load. ``QuantizedModel`` is made a ``ModelMixin`` for that reason, and its
``save_pretrained`` raises a ``SaveError`` that says how to save it."""

import pytest

import clq_compile as clq
from tests.integration.test_pipelines import _pixart, pixart_pipe  # noqa: F401 - a fixture


@pytest.fixture
def quantized_pipe(pixart_pipe):  # noqa: F811 - the imported fixture
    pipe = pixart_pipe
    fp = pipe.transformer
    with clq.record_calls(fp, max_calls=1) as calib:
        _pixart(pipe, "a red circle", seed=0, max_sequence_length=8)
    pipe.transformer = clq.quantize(fp, calib, recipe="rtn", bits="w8a8", measure=False,
                                    extra_shapes=None)
    try:
        yield pipe
    finally:
        pipe.transformer = fp


def test_a_quantized_transformer_can_be_set_in_a_pipeline(quantized_pipe):
    assert isinstance(quantized_pipe.transformer, clq.QuantizedModel)
    assert tuple(quantized_pipe.config["transformer"]) == ("clq_compile.model", "QuantizedModel")


def test_pipeline_save_pretrained_says_how_to_save_the_transformer(quantized_pipe, tmp_path):
    with pytest.raises(clq.SaveError, match=r"qm\.save\(path\).*clq\.load\(path\)"):
        quantized_pipe.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p" / "model_index.json").exists()  # no folder that loads
