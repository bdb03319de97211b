"""The torch reference sampler: DDIM and DDPM in torch, on the torch model.

It exists to check the deployed path: the runtime (numpy + ONNX Runtime) must
reproduce these samples (issue: ONNX path = torch path). It follows docs/contract.md's
random-number convention -- numpy draws x_T and then one draw per step that adds
noise -- and diffusers' default scheduler semantics (leading timestep spacing,
clip_sample on, DDIM set_alpha_to_one, DDPM fixed_small variance). The trainer
also uses it for the sample grids it writes during training.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mdx.runtime.schedules import Schedule

REFERENCE_SAMPLERS = ("ddim", "ddpm")


def leading_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """diffusers' 'leading' spacing: 0, r, 2r, ... reversed, r = T // steps."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps // steps
    return (np.arange(steps) * ratio)[::-1].astype(np.int64)


def _x0_and_eps(out: torch.Tensor, x: torch.Tensor, abar_t: float, prediction_type: str):
    """Predicted x_0 and epsilon from the network output (DDIM Eq. 12's first term)."""
    a, b = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)
    if prediction_type == "epsilon":
        return (x - b * out) / a, out
    if prediction_type == "v_prediction":  # Salimans & Ho 2022: v = a eps - b x0
        return a * x - b * out, a * out + b * x
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


@torch.no_grad()
def sample_reference(model: torch.nn.Module, schedule: Schedule, *, sampler: str = "ddim", steps: int = 25,
                     context: np.ndarray, seed: int = 0, guidance: float = 1.0, eta: float = 0.0,
                     prediction_type: str = "epsilon", device: str | torch.device = "cpu",
                     image_shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Sample n = len(context) images; returns float32 (n, C, H, W) clipped to [-1, 1].

    `context` is (n, K) class weights (one-hot, multi-hot or zeros). With
    guidance s != 1 the conditional and unconditional halves run as one batch and
    eps = eps_u + s (eps_c - eps_u).
    """
    if sampler not in REFERENCE_SAMPLERS:
        raise ValueError(f"reference sampler must be one of {REFERENCE_SAMPLERS}, got {sampler!r}")
    cfg = getattr(model, "config", None)
    if image_shape is None:
        image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    n = len(context)
    T = schedule.num_train_timesteps
    abar = schedule.alphas_cumprod  # float64
    timesteps = leading_timesteps(T, steps)
    ratio = T // steps

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, *image_shape), dtype=np.float32)).to(device)
    ctx = torch.from_numpy(np.asarray(context, dtype=np.float32)).to(device)
    if guidance != 1.0:
        ctx = torch.cat([ctx, torch.zeros_like(ctx)])  # (2n, K): [cond; uncond]
    model.eval()
    for t in timesteps:
        t = int(t)
        xin = torch.cat([x, x]) if guidance != 1.0 else x
        tin = torch.full((len(xin),), float(t), device=device)
        out = model(xin, tin, ctx).float()
        if guidance != 1.0:
            out_c, out_u = out[:n], out[n:]
            out = out_u + guidance * (out_c - out_u)
        prev_t = t - ratio
        abar_t = float(abar[t])
        abar_prev = float(abar[prev_t]) if prev_t >= 0 else 1.0
        x0, eps = _x0_and_eps(out, x, abar_t, prediction_type)
        x0 = x0.clamp(-1.0, 1.0)  # clip_sample, diffusers' default
        if sampler == "ddim":
            # DDIM Eq. 16: sigma_t(eta); Eq. 12: x_{t-1} = sqrt(abar_prev) x0 + dir + sigma z
            var = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
            std = eta * math.sqrt(var)
            x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - std**2) * eps
            if eta > 0:
                z = torch.from_numpy(rng.standard_normal((n, *image_shape), dtype=np.float32)).to(device)
                x = x + std * z
        else:
            # DDPM Eq. 7: posterior mean and the fixed_small variance beta~
            alpha_t = abar_t / abar_prev
            beta_t = 1 - alpha_t
            mean = (math.sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 + (
                math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)) * x
            x = mean
            if t > 0:
                var = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
                z = torch.from_numpy(rng.standard_normal((n, *image_shape), dtype=np.float32)).to(device)
                x = x + math.sqrt(var) * z
    return x.clamp(-1.0, 1.0).cpu().numpy().astype(np.float32)
