"""The shapes text-to-image DiT: a plain diffusers ``PixArtTransformer2DModel`` in pixel space
plus a tiny learned caption encoder kept *outside* the transformer.

Why this split: the transformer is what gets quantized, so it must keep the stock diffusers
forward signature (hidden_states, encoder_hidden_states, timestep, added_cond_kwargs). The
caption encoder is an embedding table standing in for a text encoder (T5 in real PixArt);
it stays in full precision, like a real pipeline's text encoder would.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file, save_file

from clq_compile.eval.shapes_data import CAPTION_LEN, IMAGE_SIZE, VOCAB, tokenize

log = logging.getLogger(__name__)

# Shipped as package data, so an installed (not editable) clq_compile finds them too.
ASSETS = Path(__file__).resolve().parent / "assets"
DIT_DIR = ASSETS / "shapes_dit"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Noise schedule shared by training (DDPMScheduler) and sampling (DPM-Solver). Scaled-linear
# betas end at alpha_bar ~ 5e-3 rather than the cosine schedule's ~2e-9: with epsilon
# prediction the x0 error is eps_error * sigma / alpha, so near-zero-SNR timesteps teach
# the model almost nothing about the image and amplify its errors when sampling.
# The target is v (``DDPMScheduler.get_velocity``), diffusers' other standard DDPM target:
# x0 = alpha * x_t - sigma * v has no 1/alpha amplification, which is what lets a model
# trained for ~25 CPU minutes sample coherent images (eps-prediction pilots at this budget
# produced patch noise).
NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "v_prediction",
    "clip_sample": False,
}

DEFAULT_TRANSFORMER: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 6,
    "cross_attention_dim": 256,
    "sample_size": IMAGE_SIZE,
    "patch_size": 4,
    "caption_channels": 128,
    "norm_type": "ada_norm_single",
    "num_embeds_ada_norm": 1000,
    "use_additional_conditions": False,
}


class CaptionEncoder(torch.nn.Module):
    """Caption token ids -> ``encoder_hidden_states`` ``(B, 3, caption_channels)``.

    A token embedding plus a per-slot embedding (so the three null tokens of the null
    caption are distinguishable by slot, as T5 outputs would be).
    """

    def __init__(self, vocab_size: int = VOCAB.size, caption_channels: int = 128) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.caption_channels = caption_channels
        self.token = torch.nn.Embedding(vocab_size, caption_channels)
        self.slot = torch.nn.Parameter(torch.zeros(CAPTION_LEN, caption_channels))
        torch.nn.init.normal_(self.token.weight, std=1.0)
        torch.nn.init.normal_(self.slot, std=0.1)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.token(token_ids) + self.slot

    def encode(self, captions: list[str | None]) -> torch.Tensor:
        """Caption strings (``None``/``""`` = null caption) -> embeddings."""
        ids = tokenize(captions).to(self.token.weight.device)
        return self(ids)

    def config(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "caption_channels": self.caption_channels}


def build_transformer(**overrides: Any) -> PixArtTransformer2DModel:
    """A freshly initialized shapes DiT (``DEFAULT_TRANSFORMER`` updated by ``overrides``)."""
    cfg = {**DEFAULT_TRANSFORMER, **overrides}
    return PixArtTransformer2DModel(**cfg)


def save_shapes_dit(out_dir: Path, transformer: PixArtTransformer2DModel,
                    encoder: CaptionEncoder, training: dict[str, Any]) -> None:
    """Write fp16 safetensors (transformer.* / caption_encoder.*) and config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().to(torch.float16).contiguous()
               for k, v in transformer.state_dict().items()}
    tensors.update({f"caption_encoder.{k}": v.detach().to(torch.float16).contiguous()
                    for k, v in encoder.state_dict().items()})
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    tcfg = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    config = {
        "transformer": tcfg,
        "caption_encoder": encoder.config(),
        "vocab": list(VOCAB.tokens),
        "noise_schedule": NOISE_SCHEDULE,
        "training": training,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")


def load_shapes_dit(path: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32,
                    ) -> tuple[PixArtTransformer2DModel, CaptionEncoder]:
    """Load the committed shapes DiT: ``(transformer, caption_encoder)``, both in eval mode.

    Weights are stored in fp16 to keep the checkpoint small; they are upcast to ``dtype``.
    """
    root = Path(path) if path is not None else DIT_DIR
    weights, cfg_file = root / WEIGHTS_FILE, root / CONFIG_FILE
    if not weights.exists() or not cfg_file.exists():
        raise FileNotFoundError(
            f"shapes DiT checkpoint not found in {root} (need {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "train it with `python examples/train_shapes_dit.py`"
        )
    config = json.loads(cfg_file.read_text())
    transformer = PixArtTransformer2DModel(**config["transformer"])
    encoder = CaptionEncoder(**config["caption_encoder"])
    state = load_file(str(weights))
    for prefix, module in (("transformer.", transformer), ("caption_encoder.", encoder)):
        sub = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    transformer.to(device=device)
    if dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op one
        transformer.to(dtype=dtype)
    transformer.eval().requires_grad_(False)
    encoder.to(device=device).eval().requires_grad_(False)
    return transformer, encoder


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The checkpoint's config.json (transformer config, schedule, training metadata)."""
    root = Path(path) if path is not None else DIT_DIR
    cfg_file = root / CONFIG_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(
            f"{cfg_file} not found; train it with `python examples/train_shapes_dit.py`"
        )
    return json.loads(cfg_file.read_text())
