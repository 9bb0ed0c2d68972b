"""Train the shapes text-to-image DiT (pixel-space PixArt) that the quality harness measures
quantization against, and write it to clq_compile/eval/assets/shapes_dit/.

Objective: the standard diffusers DDPMScheduler MSE on the schedule's prediction target
(v-prediction, see shapes_model.NOISE_SCHEDULE; min-SNR-5 weighted by default; with
``--snr-gamma 0`` every timestep weighs the same in v, which stresses the low-noise steps
that draw edges and corners, and the high-noise steps that fix the layout),
AdamW, an EMA of the weights (the EMA is what gets saved), 10% caption dropout to the null
caption for classifier-free guidance. Data is generated on the fly from a fixed seed per
step, so a run is reproducible for a given device and thread count.

    python examples/train_shapes_dit.py              # CPU default: ~20 min on 2 cores
    python examples/train_shapes_dit.py --steps 200  # quick smoke run (writes to --out)
    python examples/train_shapes_dit.py --init clq_compile/eval/assets/shapes_dit --steps 2500
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from clq_compile.eval.shapes_data import generate, labels_to_tokens
from clq_compile.eval.shapes_model import (
    DIT_DIR,
    NOISE_SCHEDULE,
    CaptionEncoder,
    build_transformer,
    load_config,
    load_shapes_dit,
    save_shapes_dit,
)

COND = {"resolution": None, "aspect_ratio": None}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay ceiling")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4, help="attention heads of 64 dims each")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR weighting; 0 = off")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU with avx512_bf16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DIT_DIR)
    p.add_argument("--save-every", type=int, default=0,
                   help="also write the EMA checkpoint every N steps (0 = only at the end)")
    p.add_argument("--init", type=Path, default=None,
                   help="continue from this checkpoint (its saved EMA weights and config)")
    return p.parse_args()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    resumed_from = None
    if args.init is not None:
        transformer, encoder = load_shapes_dit(args.init, device=device)
        transformer.train().requires_grad_(True)
        encoder.train().requires_grad_(True)
        resumed_from = load_config(args.init)["training"]
    else:
        hidden = args.heads * 64
        transformer = build_transformer(num_attention_heads=args.heads, num_layers=args.layers,
                                        cross_attention_dim=hidden, patch_size=args.patch)
        encoder = CaptionEncoder(caption_channels=transformer.config.caption_channels)
    transformer, encoder = transformer.to(device), encoder.to(device)
    hidden = transformer.inner_dim
    params = list(transformer.parameters()) + list(encoder.parameters())
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"device={device} transformer params={n_params / 1e6:.2f}M hidden={hidden}")
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema_t, ema_e = copy.deepcopy(transformer).requires_grad_(False), copy.deepcopy(encoder)
    ema_e.requires_grad_(False)
    scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    alphas = scheduler.alphas_cumprod.to(device)
    # Min-SNR-gamma weighting (as diffusers' --snr_gamma): low-noise steps, where the target
    # is easy and says little about the image, stop dominating the gradient.
    snr = alphas / (1 - alphas)
    v_pred = NOISE_SCHEDULE["prediction_type"] == "v_prediction"
    base = snr + 1 if v_pred else snr
    snr_weight = snr.clamp(max=args.snr_gamma) / base if args.snr_gamma > 0 else snr * 0 + 1

    start = time.time()
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc="train shapes DiT", mininterval=5)
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        images, labels = generate(args.batch, seed=args.seed * 1_000_003 + step + 17)
        x0 = (images * 2 - 1).to(device)
        tokens = labels_to_tokens(labels)
        drop = torch.rand(args.batch, generator=g) < args.caption_dropout
        tokens[drop] = 0
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (args.batch,), generator=g)
        t = t.to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            cond = encoder(tokens.to(device))
            pred = transformer(hidden_states=xt, encoder_hidden_states=cond, timestep=t,
                               added_cond_kwargs=COND, return_dict=False)[0]
        target = scheduler.get_velocity(x0, noise, t) if v_pred else noise
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * snr_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((transformer, ema_t), (encoder, ema_e)):
                for p, q in zip(src.parameters(), dst.parameters(), strict=True):
                    q.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr_at(step, args):.1e}")
        if step % 250 == 0:
            print(f"step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                  f"t={time.time() - start:.0f}s", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_shapes_dit(args.out, ema_t.float(), ema_e.float(),
                            record(args, step + 1, start, losses, n_params, resumed_from))
    training = record(args, args.steps, start, losses, n_params, resumed_from)
    save_shapes_dit(args.out, ema_t.float(), ema_e.float(), training)
    print(f"saved {args.out} after {args.steps} steps, {training['wall_time_s'] / 60:.1f} min, "
          f"loss {training['final_loss']:.4f}")


def record(args: argparse.Namespace, steps: int, start: float, losses: list[float],
           n_params: int, resumed_from: dict | None) -> dict:
    """The ``training`` entry of config.json: enough to reproduce and to cite the run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "ema_decay": args.ema,
        "caption_dropout": args.caption_dropout,
        "snr_gamma": args.snr_gamma,
        "objective": f"{NOISE_SCHEDULE['prediction_type']} MSE (DDPMScheduler)"
                     + (f", min-SNR-{args.snr_gamma:g} weighted" if args.snr_gamma > 0 else ""),
        "bf16_autocast": args.bf16,
        "seed": args.seed,
        "wall_time_s": round(time.time() - start, 1),
        "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5),
        "torch": torch.__version__,
        "transformer_params": n_params,
        "saved_weights": "ema",
        "resumed_from": resumed_from,
    }


if __name__ == "__main__":
    main()
