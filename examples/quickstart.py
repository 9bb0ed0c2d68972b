"""Quickstart: quantize a diffusers PixArt transformer through clq_compile's graph passes,
print the per-layer table, and the output SQNR against full precision per bits setting."""

from __future__ import annotations

import argparse
import logging

import torch
from diffusers import PixArtTransformer2DModel

import clq_compile as clq
from clq_compile.qlinear import sqnr


def pixart(layers: int, seed: int = 0) -> PixArtTransformer2DModel:
    """A PixArt-α-shaped transformer (adaLN-single, self + cross attention), small."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
        num_layers=layers, cross_attention_dim=128, sample_size=16, patch_size=2,
        caption_channels=64, num_embeds_ada_norm=1000,
    ).eval()


def call(seed: int, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 8, 64, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--recipe", default="rtn")
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w4a16", "w4a8", "w4a4"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = pixart(args.layers)
    calib = [call(i) for i in range(4)]  # e.g. transformer inputs at several timesteps
    test = call(100)
    with torch.no_grad():
        ref = model(**test)[0]
    results = []
    for bits in args.bits:
        qm = clq.quantize(model, calib, recipe=args.recipe, bits=bits)
        results.append((bits, sqnr(ref, qm(**test)[0])))
        if bits == args.bits[-1]:
            print(clq.inspect(qm))
    print("\noutput SQNR vs full precision (held-out call):")
    for bits, db in results:
        print(f"  {args.recipe} {bits:6s} {db:6.1f} dB")


if __name__ == "__main__":
    main()
