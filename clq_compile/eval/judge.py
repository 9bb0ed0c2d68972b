"""The ShapeEval judge: a small CNN that reads (shape, colour, position) off a 32x32 image.

Why: a sampled image counts as correct when the judge's three predictions all match its
caption. The judge is trained on the procedural generator only (with mild noise/blur
augmentation so slightly imperfect samples are still read fairly), never on model samples,
so it cannot learn a quantized model's artefacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clq_compile.eval.shapes_data import COLOUR_NAMES, POSITIONS, SHAPES
from clq_compile.eval.shapes_model import ASSETS

JUDGE_DIR = ASSETS / "shapes_judge"
ATTRIBUTES = ("shape", "colour", "position")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ShapeJudge(nn.Module):
    """Three-headed classifier; input float images ``(B, 3, 32, 32)`` in [0, 1]."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.features = nn.Sequential(_block(3, width), _block(width, 2 * width),
                                      _block(2 * width, 2 * width), nn.Flatten())
        feat = 2 * width * 4 * 4
        self.trunk = nn.Sequential(nn.Linear(feat, 128), nn.ReLU())
        self.heads = nn.ModuleDict({
            "shape": nn.Linear(128, len(SHAPES)),
            "colour": nn.Linear(128, len(COLOUR_NAMES)),
            "position": nn.Linear(128, len(POSITIONS)),
        })

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features(images * 2 - 1))
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Each attribute's logits ``(B, classes)``, in batches, on clamped images."""
        out: dict[str, list[torch.Tensor]] = {a: [] for a in ATTRIBUTES}
        for chunk in images.split(batch_size):
            logits = self(chunk.float().clamp(0, 1))
            for a in ATTRIBUTES:
                out[a].append(logits[a])
        return {a: torch.cat(p) for a, p in out.items()}

    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted labels ``(B, 3)`` = (shape, colour, position)."""
        return labels_of(self.logits(images, batch_size))

    def margins(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """:func:`margins_of` the images' logits."""
        return margins_of(self.logits(images, batch_size))


def labels_of(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, 3)`` labels from :meth:`ShapeJudge.logits` (one judge pass serves both this
    and :func:`margins_of`)."""
    return torch.stack([logits[a].argmax(-1) for a in ATTRIBUTES], dim=1)


def margins_of(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, 3)`` top-1 minus top-2 probability per attribute: how far each reading is
    from a tie (a sample near 0 flips under any small redrawing)."""
    top = [logits[a].softmax(-1).topk(2, dim=-1).values for a in ATTRIBUTES]
    return torch.stack([t[:, 0] - t[:, 1] for t in top], dim=1)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-attribute and joint (all three correct) accuracy."""
    hits = pred == labels
    acc = {name: hits[:, i].float().mean().item() for i, name in enumerate(ATTRIBUTES)}
    acc["joint"] = hits.all(dim=1).float().mean().item()
    return acc


def save_judge(judge: ShapeJudge, out_dir: Path, metadata: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in judge.state_dict().items()},
              str(out_dir / "judge.safetensors"))
    config = {"width": judge.width, "attributes": list(ATTRIBUTES), "shapes": list(SHAPES),
              "colours": list(COLOUR_NAMES), "positions": list(POSITIONS), "training": metadata}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_judge(path: str | Path | None = None) -> ShapeJudge:
    """Load the committed judge in eval mode (CPU, float32)."""
    root = Path(path) if path is not None else JUDGE_DIR
    weights, cfg_file = root / "judge.safetensors", root / "config.json"
    if not weights.exists() or not cfg_file.exists():
        raise FileNotFoundError(
            f"shapes judge not found in {root} (need judge.safetensors and config.json); "
            "train it with `python examples/train_judge.py`"
        )
    config = json.loads(cfg_file.read_text())
    judge = ShapeJudge(width=config["width"])
    judge.load_state_dict(load_file(str(weights)), strict=True)
    return judge.eval().requires_grad_(False)
