"""The sampling loop: noise -> model -> sampler step, with classifier-free guidance.

Random numbers follow docs/contract.md's convention, so that the torch reference sampler
(mdx.train.reference) and this loop give the same images for the same seed:

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, C, H, W), dtype=np.float32)              # x_T
    for t in sampler.timesteps:
        eps = model(x, t, context)                                       # one session call
        z = rng.standard_normal(x.shape, dtype=np.float32) if sampler.needs_noise(t) else None
        x = sampler.step(eps, t, x, noise=z).prev_sample
    samples = clip(x, -1, 1)

Classifier-free guidance with s != 1 runs the conditional and the unconditional (all-zero
context) halves as one batch of 2n and mixes eps = eps_u + s (eps_c - eps_u)
(Ho & Salimans 2022, Eq. 6); s = 1 is the conditional model alone, at no extra cost.

Every large array the loop itself needs (the model's input and output, the guided eps, the
noise) is allocated once before the first step; the sampler returns fresh `prev_sample` /
`pred_original_sample` arrays by its own contract.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from mdx.runtime.contract import recommended_sampler_options
from mdx.runtime.samplers import make_sampler


class PipelineError(ValueError):
    """A bad sampling request (classes, counts, guidance ...); the message names the value."""


@dataclass(frozen=True)
class Generation:
    """The result of `generate`."""

    samples: np.ndarray  # (n, C, H, W) float32 in [-1, 1]
    x0_frames: list[np.ndarray] | None  # per step, the predicted x_0 (n, C, H, W), when recorded
    model_seconds: float  # time inside the model calls (including host <-> device copies)
    total_seconds: float  # the whole loop, model included
    timesteps: np.ndarray  # the timesteps visited, in order


# --- conditioning ---------------------------------------------------------------------


def resolve_class(class_names: Sequence[str], value: str | int) -> int:
    """A class given by name or by index (an int or a string of digits) -> its index."""
    K = len(class_names)
    if isinstance(value, str):
        if value in class_names:
            return list(class_names).index(value)
        stripped = value.strip()
        if stripped.lstrip("-").isdigit():
            value = int(stripped)
        else:
            raise PipelineError(f"unknown class {value!r}; the model's classes are "
                                f"{', '.join(class_names)} (or an index 0..{K - 1})")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if 0 <= value < K:
            return int(value)
        raise PipelineError(f"class index {value} is out of range; use 0..{K - 1} "
                            f"({', '.join(class_names)})")
    raise PipelineError(f"a class is a name or an index, got {value!r}")


def build_context(class_names: Sequence[str], classes: Sequence[str | int] | None, unconditional: bool,
                  n: int) -> tuple[np.ndarray, np.ndarray]:
    """Context rows (n, K) float32 and labels (n,) int64 for n images.

    classes: one class for all images (one-hot), or several mixed (multi-hot, each 1);
    unconditional: all-zero rows; neither: image i gets class i mod K, so a grid K wide has
    one class per column. Labels are the class index, or -1 for a mix or unconditional.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise PipelineError(f"the number of images must be a positive integer, got {n!r}")
    K = len(class_names)
    context = np.zeros((n, K), dtype=np.float32)  # (n, K)
    if classes and unconditional:
        raise PipelineError("give classes or unconditional, not both")
    if unconditional:
        return context, np.full(n, -1, dtype=np.int64)
    if classes:
        chosen = sorted({resolve_class(class_names, c) for c in classes})
        context[:, chosen] = 1.0
        label = chosen[0] if len(chosen) == 1 else -1
        return context, np.full(n, label, dtype=np.int64)
    labels = np.arange(n, dtype=np.int64) % K
    context[np.arange(n), labels] = 1.0
    return context, labels


# --- the loop -------------------------------------------------------------------------


def prepare_sampler(info, sampler: str, steps: int, eta: float = 0.0, options: dict | None = None):
    """The sampler for a model, with its timesteps set; raises SamplerError / PipelineError for
    a bad name, step count (1..T) or option, so a caller can check a request before sampling."""
    kwargs = {"prediction_type": info.prediction_type}
    if sampler == "ddim":
        kwargs["eta"] = eta
    elif eta != 0.0:
        raise PipelineError(f"eta applies to the ddim sampler only, not {sampler} (got eta={eta})")
    scheduler = make_sampler(sampler, info.schedule, **{**kwargs, **(options or {})})
    scheduler.set_timesteps(steps)  # SamplerError for steps < 1 or > T
    return scheduler


def check_request(info, context, n: int | None, guidance: float, seed) -> tuple[np.ndarray, int]:
    """The context as float32 (n, K) and n; PipelineError for a bad shape, guidance or seed
    (shared by `generate` and the batching engine, so both refuse the same requests)."""
    context = np.asarray(context, dtype=np.float32)
    if context.ndim != 2 or context.shape[1] != info.num_classes or context.shape[0] < 1:
        raise PipelineError(f"context must have shape (n, {info.num_classes}), got {context.shape}")
    if n is None:
        n = context.shape[0]
    if n != context.shape[0]:
        raise PipelineError(f"n={n} but the context has {context.shape[0]} rows")
    if (isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating, np.integer))
            or not np.isfinite(guidance) or guidance < 0):
        raise PipelineError(f"guidance must be a number >= 0, got {guidance!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise PipelineError(f"seed must be an integer >= 0, got {seed!r}")
    return context, n


def guide(out: np.ndarray, n: int, guidance: float, eps: np.ndarray) -> np.ndarray:
    """eps = eps_u + s (eps_c - eps_u), in place in `eps`, from the [cond; uncond] output (2n, ...).
    The batching engine calls it too: the same operations in the same order give the same bits."""
    np.subtract(out[:n], out[n:], out=eps)
    eps *= np.float32(guidance)
    eps += out[n:]
    return eps


def generate(denoiser, *, sampler: str = "ddim", steps: int = 25, n: int | None = None,
             context: np.ndarray, guidance: float = 1.0, eta: float = 0.0, seed: int = 0,
             record_x0: bool = False, progress: Callable[[int, int], None] | None = None,
             sampler_options: dict | None = None,
             callback: Callable[[int, int, np.ndarray], None] | None = None) -> Generation:
    """Sample len(context) images with `denoiser` (an OnnxDenoiser or anything with `.info`
    and `.binding(batch)`); see the module docstring for the loop.

    `progress(i, total)` and `callback(i, total, x0)` (x0: the step's predicted clean images
    (n, C, H, W), a fresh array) are called after each step; `sampler_options` go to `make_sampler`
    (timestep_spacing, clip_sample, variance_type, lambda_min_clipped ...). Left at None, they
    are the model's recommended options for this sampler (`mdx.recommended`'s sampler_options),
    else the sampler's diffusers defaults.
    """
    info = denoiser.info
    context, n = check_request(info, context, n, guidance, seed)
    if sampler_options is None:
        sampler_options = recommended_sampler_options(info, sampler)
    schedule_sampler = prepare_sampler(info, sampler, steps, eta, sampler_options)
    timesteps = schedule_sampler.timesteps

    start = time.perf_counter()
    shape = (n, *info.sample_shape)  # (n, C, H, W)
    guided = guidance != 1.0
    bound = denoiser.binding(2 * n if guided else n)
    bound.context[:n] = context  # (B, K): [cond; uncond = 0] with guidance, set once
    bound.context[n:] = 0.0
    eps = np.empty(shape, dtype=np.float32) if guided else None
    noise = np.empty(shape, dtype=np.float32)

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)  # x_T ~ N(0, I)
    frames: list[np.ndarray] | None = [] if record_x0 else None
    model_seconds = 0.0
    for i, t in enumerate(timesteps):
        bound.sample[:n] = x
        if guided:
            bound.sample[n:] = x
        bound.timestep.fill(t)
        tick = time.perf_counter()
        out = bound.run()  # (B, C, H, W), overwritten by the next run
        model_seconds += time.perf_counter() - tick
        model_output = guide(out, n, guidance, eps) if guided else out
        z = None
        if schedule_sampler.needs_noise(t):
            z = rng.standard_normal(shape, dtype=np.float32, out=noise)
        result = schedule_sampler.step(model_output, t, x, noise=z)
        x = result.prev_sample
        if frames is not None:
            frames.append(result.pred_original_sample)  # fresh per step: the sampler's contract
        if progress is not None:
            progress(i + 1, len(timesteps))
        if callback is not None:
            callback(i + 1, len(timesteps), result.pred_original_sample)
    samples = np.clip(x, -1.0, 1.0, out=x)
    total = time.perf_counter() - start
    return Generation(samples=samples, x0_frames=frames, model_seconds=model_seconds, total_seconds=total,
                      timesteps=np.array(timesteps))
