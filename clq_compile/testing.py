"""Tiny random-weight diffusers transformers with matching call inputs.

Used by tests, examples and benchmarks, so every layer of the project exercises the same
five architectures. Weights are seeded; nothing is downloaded.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import torch

Inputs = dict[str, Any]


def plant_outliers(
    model: torch.nn.Module, sites: list[str], scale: float, n: int = 4, seed: int = 0
) -> torch.nn.Module:
    """Scale ``n`` output channels of the modules matching ``sites`` (fnmatch patterns)
    by ``scale``: random weights get the channel outliers trained DiTs have (massive
    residual-stream channels from the patch embedding, heavy MLP hidden channels)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if any(fnmatch.fnmatch(name, p) for p in sites) and hasattr(mod, "weight"):
                idx = torch.randperm(mod.weight.shape[0], generator=g)[:n]
                mod.weight[idx] *= scale
                if getattr(mod, "bias", None) is not None:
                    mod.bias[idx] *= scale
    return model


# Where each tiny model gets its planted outliers (test scaffolding, not library policy).
OUTLIER_SITES: dict[str, list[str]] = {
    "dit": ["pos_embed.proj", "transformer_blocks.*.ff.net.0.proj"],
    "pixart": ["pos_embed.proj", "transformer_blocks.*.ff.net.0.proj"],
    "sd3": ["pos_embed.proj", "transformer_blocks.*.ff.net.0.proj"],
    "flux": ["x_embedder", "transformer_blocks.*.ff.net.0.proj",
             "single_transformer_blocks.*.proj_mlp"],
    "wan": ["patch_embedding", "blocks.*.ffn.net.0.proj"],
}


def lzs_threshold_row(k: int, group: int, clip: float = 1.0, seed: int = 5) -> torch.Tensor:
    """One token for LZS tests whose int8 codes (scale 1 under ``clip``) peak, per group
    from the second, exactly at a FLAG threshold (8, 16, 32, 64) among odd codes: where
    a threshold is read as ``>`` instead of ``>=``, those groups keep a low bit they
    must lose."""
    g = _seeded(seed)
    codes = torch.randint(0, 4, (k // group, group), generator=g) * 2 + 1.0
    codes[1:, 0] = torch.tensor([8.0, 16.0, 32.0, 64.0]).repeat(k // group)[: k // group - 1]
    codes = codes.reshape(k) * torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    codes[0] = 127.0 / clip  # the absmax, in group 0: clip · absmax / 127 = 1
    return codes


def orthogonal_blocks(n: int, b: int, seed: int = 0) -> torch.Tensor:
    """``n`` different Haar-random B×B orthogonal blocks (float32), a per-block rotation
    (K/B, B, B) as ``rotation="adaptive"`` makes them, for tests of the ops and lowerings."""
    from clq_compile.passes.obs import random_orthogonal

    gen = torch.Generator().manual_seed(seed)
    return torch.stack([random_orthogonal(b, gen).float() for _ in range(n)])


def _seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def tiny_dit(batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, Callable[[int], Inputs]]:
    from diffusers import DiTTransformer2DModel

    _seeded(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    )

    def inputs(i: int = 0, b: int = batch) -> Inputs:
        g = torch.Generator().manual_seed(1000 + i)
        return dict(
            hidden_states=torch.randn(b, 4, 8, 8, generator=g),
            timestep=torch.randint(0, 1000, (b,), generator=g),
            class_labels=torch.randint(0, 1000, (b,), generator=g),
            return_dict=False,
        )

    return m.eval(), inputs


def tiny_pixart(
    batch: int = 2, seed: int = 0, layers: int = 2
) -> tuple[torch.nn.Module, Callable[[int], Inputs]]:
    from diffusers import PixArtTransformer2DModel

    _seeded(seed)
    m = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
        num_layers=layers, cross_attention_dim=64, sample_size=8, patch_size=2, caption_channels=32,
        num_embeds_ada_norm=1000,
    )

    def inputs(i: int = 0, b: int = batch) -> Inputs:
        g = torch.Generator().manual_seed(1000 + i)
        return dict(
            hidden_states=torch.randn(b, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(b, 6, 32, generator=g),
            timestep=torch.randint(0, 1000, (b,), generator=g),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )

    return m.eval(), inputs


def tiny_sd3(batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, Callable[[int], Inputs]]:
    from diffusers import SD3Transformer2DModel

    _seeded(seed)
    m = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
    )

    def inputs(i: int = 0, b: int = batch) -> Inputs:
        g = torch.Generator().manual_seed(1000 + i)
        return dict(
            hidden_states=torch.randn(b, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(b, 6, 32, generator=g),
            pooled_projections=torch.randn(b, 16, generator=g),
            timestep=torch.randint(0, 1000, (b,), generator=g),
            return_dict=False,
        )

    return m.eval(), inputs


def tiny_flux(batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, Callable[[int], Inputs]]:
    from diffusers import FluxTransformer2DModel

    _seeded(seed)
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        axes_dims_rope=(4, 6, 6),
    )

    def inputs(i: int = 0, b: int = batch) -> Inputs:
        g = torch.Generator().manual_seed(1000 + i)
        img, txt = 16, 6
        return dict(
            hidden_states=torch.randn(b, img, 16, generator=g),
            encoder_hidden_states=torch.randn(b, txt, 32, generator=g),
            pooled_projections=torch.randn(b, 16, generator=g),
            timestep=torch.rand(b, generator=g),
            img_ids=torch.stack(
                [torch.zeros(img), torch.arange(img) // 4, torch.arange(img) % 4], -1
            ).float(),
            txt_ids=torch.zeros(txt, 3),
            return_dict=False,
        )

    return m.eval(), inputs


def tiny_wan(batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, Callable[[int], Inputs]]:
    from diffusers import WanTransformer3DModel

    _seeded(seed)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32,
    )

    def inputs(i: int = 0, b: int = batch) -> Inputs:
        g = torch.Generator().manual_seed(1000 + i)
        return dict(
            hidden_states=torch.randn(b, 4, 2, 8, 8, generator=g),
            timestep=torch.randint(0, 1000, (b,), generator=g),
            encoder_hidden_states=torch.randn(b, 6, 32, generator=g),
            return_dict=False,
        )

    return m.eval(), inputs


TINY_MODELS: dict[str, Callable[..., tuple[torch.nn.Module, Callable[..., Inputs]]]] = {
    "dit": tiny_dit,
    "pixart": tiny_pixart,
    "sd3": tiny_sd3,
    "flux": tiny_flux,
    "wan": tiny_wan,
}


def held_out_sqnr(model: torch.nn.Module, qm: Any, inputs: Callable[..., Inputs],
                  calls: tuple[int, ...] = (10, 11)) -> float:
    """Mean output SQNR (dB) of ``qm`` against ``model`` on input seeds no calibration set
    of the tests uses (``inputs(i)`` for i in ``calls``)."""
    from clq_compile.qlinear import sqnr

    with torch.no_grad():
        return sum(sqnr(model(**inputs(i))[0], qm(**inputs(i))[0]) for i in calls) / len(calls)


def plan_context(model: torch.nn.Module, calls: list[Any], spec: Any = None,
                 recipe: str = "rtn") -> Any:
    """A PlanContext over ``model``'s analyzed graph and ``calls`` (default W4A4), for
    tests of the calibration stages below the recipes."""
    from clq_compile.api import capture_calls
    from clq_compile.build import analyze
    from clq_compile.calibration import flatten_calls
    from clq_compile.recipes import resolve_recipe
    from clq_compile.runner import GraphRunner, PlanContext
    from clq_compile.spec import QuantSpec

    spec = spec or QuantSpec(4, 4)
    graphs, calls = capture_calls(model, calls)
    gm = analyze(graphs[0].gm, spec, resolve_recipe(recipe))
    return PlanContext(gm, spec, flatten_calls(gm, calls), GraphRunner(gm))


def recording_backend() -> tuple[list[tuple[Any, list[Any]]], Callable[..., Any]]:
    """(runs, backend): a torch.compile backend running the ``clq`` one (options passed
    through) that records each compiled callable with its example inputs, for tests that
    read the rewritten graph (``run.graph_module``) or what was lowered."""
    from clq_compile import backend as be

    runs: list[tuple[Any, list[Any]]] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: list[Any], **kw: Any) -> Any:
        runs.append((be.clq_backend(gm, example_inputs, **kw), example_inputs))
        return runs[-1][0]

    return runs, keep
