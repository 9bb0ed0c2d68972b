"""Train the ShapeEval judge (shape / colour / position CNN) on generated images and write it to
clq_compile/eval/assets/shapes_judge/. Takes a couple of minutes on CPU.

Augmentation (noise, blur, brightness/contrast) makes the judge read slightly imperfect
diffusion samples fairly; held-out accuracy is measured on clean, freshly generated images
from seeds never used in training.

    python examples/train_judge.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clq_compile.eval.judge import ATTRIBUTES, JUDGE_DIR, ShapeJudge, accuracy, save_judge
from clq_compile.eval.shapes_data import generate

HELD_OUT_SEED = 999_983


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    x = images * (1 - mix) + blurred * mix
    contrast = 0.9 + 0.2 * torch.rand(n, 1, 1, 1, generator=g)
    shift = 0.1 * torch.rand(n, 1, 1, 1, generator=g) - 0.05
    x = (x - 0.5) * contrast + 0.5 + shift
    sigma = 0.08 * torch.rand(n, 1, 1, 1, generator=g)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=JUDGE_DIR)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    judge = ShapeJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    start = time.time()
    bar = tqdm(range(args.steps), desc="train judge", mininterval=5)
    for step in bar:
        seed = args.seed * 1_000_003 + step
        images, labels = generate(args.batch, seed=seed)
        x = augment(images, torch.Generator().manual_seed(seed))
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[a], labels[:, i]) for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    wall = time.time() - start
    judge.eval()
    images, labels = generate(4096, seed=HELD_OUT_SEED)
    clean = accuracy(judge.predict(images), labels)
    noisy = accuracy(judge.predict(augment(images, torch.Generator().manual_seed(1))), labels)
    print(f"held-out clean accuracy: {clean}")
    print(f"held-out augmented accuracy: {noisy}")
    meta = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "device": "cpu", "threads": args.threads, "wall_time_s": round(wall, 1),
            "held_out_seed": HELD_OUT_SEED, "held_out_n": 4096,
            "held_out_accuracy": {k: round(v, 5) for k, v in clean.items()},
            "held_out_augmented_accuracy": {k: round(v, 5) for k, v in noisy.items()},
            "torch": torch.__version__}
    save_judge(judge, args.out, meta)
    print(f"saved {args.out} ({wall:.0f}s)")


if __name__ == "__main__":
    main()
