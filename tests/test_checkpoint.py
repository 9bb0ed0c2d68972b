"""Planning from a safetensors checkpoint with the model on the meta device
(``quantize(..., checkpoint=...)``): same plan and output as the loaded model, bounded
weight memory, clear errors."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file

import clq_compile as clq
from clq_compile.annotations import CHECKPOINT_KEY
from clq_compile.checkpoint import Checkpoint
from clq_compile.testing import tiny_pixart


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    model, inputs = tiny_pixart()
    path = tmp_path_factory.mktemp("safetensors") / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path)
    return model, inputs, path, state


def empty_like(model: torch.nn.Module) -> torch.nn.Module:
    with init_empty_weights():  # parameters on meta, buffers real
        return type(model).from_config(model.config).eval()


def quantize_both(model, inputs, source, recipe="quarot", options=None, **lazy_options):
    calib = [inputs(i) for i in range(2)]
    lazy = empty_like(model)
    q_ref = clq.quantize(model, calib, recipe=recipe, **(options or {}))
    q_lazy = clq.quantize(lazy, calib, recipe=recipe, checkpoint=source, **(options or {}),
                          **lazy_options)
    return q_ref, q_lazy, lazy


@pytest.mark.parametrize(("recipe", "options"), [
    ("quarot", {}), ("clq", {}),
    ("clq", {"clps": False, "rotation": "adaptive", "rotation_steps": 4}),
    ("smoothquant", {"weights": "gptq", "lowrank": 4, "budget": 0.1, "timestep_bits": 6.0}),
])
def test_checkpoint_plan_and_output_are_those_of_the_loaded_model(pixart, recipe,
                                                                  options) -> None:
    model, inputs, path, _ = pixart
    q_ref, q_lazy, lazy = quantize_both(model, inputs, path, recipe, options)
    x = inputs(9)
    assert torch.equal(q_ref(**x)[0], q_lazy(**x)[0])
    for name, lp in q_ref.plan.layers.items():
        other = q_lazy.plan.layers[name]
        assert (lp.w_clip, lp.a_clip, lp.spec) == (other.w_clip, other.a_clip, other.spec)
    # the model is left as it was; the graphs hold real tensors and no checkpoint
    assert all(p.device.type == "meta" for p in lazy.parameters())
    for gm in q_lazy.graph_modules:
        assert CHECKPOINT_KEY not in gm.meta
        assert all(t.device.type != "meta" for t in gm.state_dict().values())
    stats = q_lazy.plan.meta["checkpoint"]
    assert stats["peak_kept_bytes"] <= stats["capacity"]
    if "timestep_bits" in options:  # the policy searched from the checkpoint is the same
        assert torch.equal(q_ref.plan.timesteps.a8, q_lazy.plan.timesteps.a8)


def test_sharded_folder_and_no_cache(pixart, tmp_path) -> None:
    """A folder of shards reads as one checkpoint; with nothing kept between reads
    (max_weight_bytes=0) every use reads again and the result is unchanged."""
    model, inputs, _, state = pixart
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, tmp_path / "a.safetensors")
    save_file({k: state[k] for k in keys[1::2]}, tmp_path / "b.safetensors")
    q_ref, q_lazy, _ = quantize_both(model, inputs, tmp_path, max_weight_bytes=0)
    x = inputs(9)
    assert torch.equal(q_ref(**x)[0], q_lazy(**x)[0])
    assert q_lazy.plan.meta["checkpoint"]["reads"] > len(keys)


def test_bf16_checkpoint_is_cast_like_load_state_dict(pixart, tmp_path) -> None:
    model, inputs, _, state = pixart
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v
               for k, v in state.items()}, path)
    rounded = empty_like(model)
    rounded.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in load_file(path).items()}, assign=True)
    q_ref, q_lazy, _ = quantize_both(rounded, inputs, path)
    x = inputs(9)
    assert torch.equal(q_ref(**x)[0], q_lazy(**x)[0])


def test_reader_matches_safetensors(tmp_path) -> None:
    """The plain-read reader against safetensors' own loader, every dtype it names."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "f64": torch.randn(4, generator=g).double(),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (4, 4), generator=g, dtype=torch.uint8),
        "i64": torch.randint(-9, 9, (3,), generator=g), "bool": torch.tensor([True, False]),
        "f8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    ref = load_file(tmp_path / "t.safetensors")
    ckpt = Checkpoint(tmp_path / "t.safetensors", capacity=0)
    for k, v in ref.items():
        got = ckpt.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_errors_name_the_problem(pixart, tmp_path) -> None:
    model, inputs, path, state = pixart
    calib = [inputs(0)]
    lazy = empty_like(model)
    with pytest.raises(clq.QuantizationError, match="checkpoint="):
        clq.quantize(lazy, calib)
    with pytest.raises(clq.ConfigError, match="no tensor on the meta device"):
        clq.quantize(model, calib, checkpoint=path)
    with pytest.raises(clq.ConfigError, match="no such safetensors file"):
        clq.quantize(lazy, calib, checkpoint=tmp_path / "missing.safetensors")
    with pytest.raises(clq.ConfigError, match="holds no"):
        clq.quantize(lazy, calib, checkpoint=tmp_path)
    for bad in (-1, "1GB", 1.5):
        with pytest.raises(clq.ConfigError, match="max_weight_bytes"):
            clq.quantize(lazy, calib, checkpoint=path, max_weight_bytes=bad)
    with pytest.raises(clq.ConfigError, match="needs checkpoint"):
        clq.quantize(model, calib, max_weight_bytes=10)
    with pytest.raises(clq.ConfigError, match=r"hessian='fisher'.*checkpoint"):
        clq.quantize(lazy, calib, checkpoint=path, weights="gptq", hessian="fisher")
    name = "transformer_blocks.1.ff.net.2.weight"
    save_file({k: v for k, v in state.items() if k != name}, tmp_path / "short.safetensors")
    with pytest.raises(clq.QuantizationError, match=name.replace(".", r"\.")):
        clq.quantize(lazy, calib, checkpoint=tmp_path / "short.safetensors")
    save_file({**state, name: torch.zeros(3, 3)}, tmp_path / "shape.safetensors")
    with pytest.raises(clq.QuantizationError, match=r"shape \[3, 3\]"):
        clq.quantize(lazy, calib, checkpoint=tmp_path / "shape.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05")
    with pytest.raises(clq.ConfigError, match="not a safetensors file"):
        clq.quantize(lazy, calib, checkpoint=tmp_path / "junk.safetensors")
    with torch.device("meta"):  # the positional table is a non-persistent buffer
        all_meta = type(model).from_config(model.config).eval()
    with pytest.raises(clq.QuantizationError, match="init_empty_weights"):
        clq.quantize(all_meta, calib, checkpoint=path)
