"""PixArt-α-shaped transformers with random weights, for the calibration benchmarks:
28 blocks of 16 heads × 72 = 1152 hidden at full size, smaller depths and widths alike."""

from __future__ import annotations

import torch


def pixart_like(depth: int = 28, heads: int = 16, tokens_side: int = 16, batch: int = 2,
                calls: int = 4, head_dim: int = 72, caption_tokens: int = 16):
    """(model, calib): ``tokens_side``² image tokens (patch 2), ``calls`` calibration calls
    of ``batch`` rows (CFG's cond + uncond at batch 2)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    width = heads * head_dim
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=depth, cross_attention_dim=width, sample_size=tokens_side * 2,
        patch_size=2, caption_channels=4096, num_embeds_ada_norm=1000,
    ).eval()

    def call(i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        side = tokens_side * 2
        return dict(
            hidden_states=torch.randn(batch, 4, side, side, generator=g),
            encoder_hidden_states=torch.randn(batch, caption_tokens, 4096, generator=g),
            timestep=torch.randint(0, 1000, (batch,), generator=g),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )

    return model, [call(i) for i in range(calls)]
