"""Deterministic classifier-free-guided sampling for the shapes DiT, and recording of the
transformer's real inputs as calibration data.

The sampler only *calls* the transformer with the stock diffusers signature, so any callable
with that signature (the fp model, a bf16 copy, a ``clq.QuantizedModel``) drops in. Cond and
uncond branches go through the transformer as one batch of 2N, which is also the shape the
recorded calibration calls have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from clq_compile.eval.shapes_data import IMAGE_SIZE
from clq_compile.eval.shapes_model import NOISE_SCHEDULE, CaptionEncoder

log = logging.getLogger(__name__)

Transformer = Callable[..., Any]
Recorder = Callable[[int, dict[str, Any]], None]

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0


def make_scheduler(steps: int) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M) on the training noise schedule: deterministic, good at ~20 steps."""
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=NOISE_SCHEDULE["num_train_timesteps"],
        beta_schedule=NOISE_SCHEDULE["beta_schedule"],
        beta_start=NOISE_SCHEDULE["beta_start"],
        beta_end=NOISE_SCHEDULE["beta_end"],
        prediction_type=NOISE_SCHEDULE["prediction_type"],
        algorithm_type="dpmsolver++",
        solver_order=2,
        # x0 = (x - sigma * eps) / alpha amplifies eps errors at high noise: clip x0 to the
        # data range [-1, 1] (thresholding with max 1), the usual remedy in pixel space.
        thresholding=True,
        sample_max_value=1.0,
    )
    sched.set_timesteps(steps)
    return sched


def initial_noise(seeds: Sequence[int], channels: int = 3) -> torch.Tensor:
    """One generator per sample, so a sample depends on its seed alone, not on batching."""
    return torch.stack([
        torch.randn(channels, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(s))
        for s in seeds
    ])


@torch.no_grad()
def _sample_batch(transformer: Transformer, encoder: CaptionEncoder, captions: Sequence[str],
                  seeds: Sequence[int], steps: int, guidance_scale: float,
                  recorder: Recorder | None) -> torch.Tensor:
    n = len(captions)
    device = encoder.token.weight.device
    x = initial_noise(seeds).to(device)
    context = torch.cat([encoder.encode(list(captions)), encoder.encode([None] * n)]).float()
    sched = make_scheduler(steps)
    for i, t in enumerate(sched.timesteps):
        kwargs: dict[str, Any] = {
            "hidden_states": torch.cat([x, x]),
            "encoder_hidden_states": context,
            "timestep": t.to(device=device, dtype=torch.long).expand(2 * n).contiguous(),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            "return_dict": False,
        }
        if recorder is not None:
            recorder(i, kwargs)
        out = transformer(**kwargs)[0].float()
        eps_cond, eps_uncond = out[:, :3].chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = sched.step(eps, t, x).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2).cpu()


def sample(transformer: Transformer, encoder: CaptionEncoder, captions: Sequence[str],
           seeds: Sequence[int], *, steps: int = DEFAULT_STEPS,
           guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 32,
           recorder: Recorder | None = None, progress: bool = False) -> torch.Tensor:
    """Generate one image per (caption, seed): float32 ``(N, 3, 32, 32)`` in [0, 1].

    ``recorder(step_index, kwargs)`` (optional) sees every transformer call before it runs.
    """
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    chunks = range(0, len(captions), batch_size)
    images = []
    for start in tqdm(chunks, desc="sampling", disable=not progress):
        stop = start + batch_size
        images.append(_sample_batch(transformer, encoder, captions[start:stop],
                                    seeds[start:stop], steps, guidance_scale, recorder))
    return torch.cat(images)


def record_calibration(transformer: Transformer, encoder: CaptionEncoder,
                       captions: Sequence[str], seeds: Sequence[int], *,
                       at_steps: Sequence[int] | None = None, steps: int = DEFAULT_STEPS,
                       guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 32,
                       ) -> list[dict[str, Any]]:
    """Sample with ``transformer`` and return the transformer calls it made at ``at_steps``
    (default: every step), as detached clones usable as ``model(**calib[i])``.

    Each call holds one batch of 2 x batch_size rows (cond + uncond), exactly what the
    transformer sees during real sampling.
    """
    wanted = set(range(steps)) if at_steps is None else {int(s) for s in at_steps}
    bad = sorted(s for s in wanted if not 0 <= s < steps)
    if bad:
        raise ValueError(f"at_steps {bad} outside [0, {steps})")
    calls: list[dict[str, Any]] = []

    def recorder(step: int, kwargs: dict[str, Any]) -> None:
        if step in wanted:
            calls.append(clone_call(kwargs))

    sample(transformer, encoder, captions, seeds, steps=steps, guidance_scale=guidance_scale,
           batch_size=batch_size, recorder=recorder)
    log.info("recorded %d calibration calls at steps %s", len(calls), sorted(wanted))
    return calls


def clone_call(value: Any) -> Any:
    """Detached deep copy of a call's tensors, so later in-place updates cannot alter it."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_call(v) for k, v in value.items()}
    return value
