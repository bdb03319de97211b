"""Reverse-process samplers in numpy: DDPM, DDIM and DPM-Solver++ (2M).

Each sampler reimplements one diffusers scheduler, with diffusers' defaults, so that a
default mdx sampler equals the default diffusers scheduler built on the same betas, step
for step (docs/contract.md, "Numerical conventions"):

    ddpm   DDPMScheduler                 Ho et al. 2020 (arXiv:2006.11239)
    ddim   DDIMScheduler                 Song et al. 2020 (arXiv:2010.02502)
    dpmpp  DPMSolverMultistepScheduler   Lu et al. 2022 (arXiv:2211.01095), DPM-Solver++(2M)

Usage follows diffusers' scheduler discipline, with the random numbers drawn by the caller:

    sampler = make_sampler("ddim", schedule, eta=0.5)
    sampler.set_timesteps(50)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, C, H, W), dtype=np.float32)          # x_T (init sigma is 1)
    for t in sampler.timesteps:
        model_output = model(x, t)
        z = rng.standard_normal(x.shape, dtype=np.float32) if sampler.needs_noise(t) else None
        x = sampler.step(model_output, t, x, noise=z).prev_sample

Precision: every coefficient is computed once per `set_timesteps` in float64 from the
schedule's float64 alphas_cumprod. Arrays come in and go out as float32, but each step is
evaluated in float64 work buffers and rounded to float32 once at the end. That costs about
0.1 ms more per step at batch 64 (against ~100 ms for a model call) and removes the float32
cancellation in x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) where sqrt(abar) is tiny (the
cosine schedule's last timesteps, ~1e-4). diffusers keeps its tables in float32 and computes
in float32, so stock diffusers and mdx agree to diffusers' own float32 error (up to ~1e-4 over
500 steps, ~1e-3 on a cosine first step); diffusers' code run on float64 tables agrees with
mdx to ~1e-6 (tests/test_samplers.py).

Memory: each `step` returns two freshly allocated float32 arrays (`prev_sample`,
`pred_original_sample`) that the sampler never touches again, so a caller may keep every
`pred_original_sample` for an animation, or modify them, freely. The inputs are never
written. The reused memory is private: three float64 work buffers (and, for DPM-Solver++, a
float64 copy of the previous x_0 prediction), so a sampler instance is not thread-safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np

from mdx.runtime.contract import PREDICTION_TYPES, SAMPLERS
from mdx.runtime.schedules import Schedule
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


class SamplerError(ValueError):
    """A sampler was asked for, or driven, with a bad value; the message names it and what is allowed."""


@dataclass(frozen=True)
class StepOutput:
    """The result of one reverse step; both arrays are float32 and owned by the caller."""

    prev_sample: np.ndarray  # (B, C, H, W) x_{t-1}, the input of the next step
    pred_original_sample: np.ndarray  # (B, C, H, W) the x_0 the model implies at this step


# --- option checks -----------------------------------------------------------------


def _check_choice(option: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise SamplerError(f"{option}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    return value


def _check_bool(option: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise SamplerError(f"{option}={value!r} must be True or False")
    return bool(value)


def _check_int(option: str, value: object, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or value < lo or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise SamplerError(f"{option}={value!r} must be an integer {rng}")
    return int(value)


def _check_float(option: str, value: object, lo: float, hi: float, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise SamplerError(f"{option}={value!r} must be a number in {bracket}{lo}, {hi}]")
    return float(value)


def _as_timestep(timestep: object) -> int:
    """Accept a Python or numpy integer (or a 0-d integer array, as `for t in timesteps` gives)."""
    if isinstance(timestep, np.ndarray) and timestep.ndim == 0:
        timestep = timestep[()]
    if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, (bool, np.bool_)):
        return int(timestep)
    raise SamplerError(f"timestep must be an integer, got {timestep!r}")


# --- timestep spacings (Lin et al. 2023, arXiv:2305.08891, Table 2) -----------------


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
    """The descending int64 timesteps DDPMScheduler / DDIMScheduler visit.

    leading:  0, k, 2k, ... (k = T // n), plus `steps_offset`;
    trailing: T - 1, T - 1 - T/n, ... rounded (always ends at T/n - 1, never at 0);
    linspace: n points spread evenly over [0, T - 1], rounded.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "leading":
        ts = (np.arange(n) * (T // n))[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        # np.arange with a float step exactly as diffusers writes it, so that values that land
        # on .5 round the same way; its float length can come out as n + 1 with a last value
        # rounding to -1, which diffusers would index with; keep the first n.
        ts = (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)[:n]
    else:  # linspace
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    return np.ascontiguousarray(ts)


def dpm_solver_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                         steps_offset: int = 0, last_timestep: int | None = None) -> np.ndarray:
    """The timesteps DPMSolverMultistepScheduler visits: n + 1 points with the last (t = 0) dropped,
    since the solver's final step goes to sigma = 0 instead.

    `last_timestep` (default T) is where `lambda_min_clipped` cuts the noisiest end off, as
    diffusers does: the spacings then cover 0..last_timestep - 1 only.
    """
    T, n = num_train_timesteps, num_inference_steps
    last = T if last_timestep is None else last_timestep
    if spacing == "leading":
        ts = (np.arange(n + 1) * (last // (n + 1)))[::-1][:-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = (np.round(np.arange(last, 0, -T / n)).astype(np.int64) - 1)[:n]
    else:  # linspace
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    return np.ascontiguousarray(ts)


# --- the forward process -----------------------------------------------------------


def add_noise(schedule: Schedule, x0: np.ndarray, noise: np.ndarray,
              t: Union[int, np.ndarray]) -> np.ndarray:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4), float32 out.

    `t` is one timestep for the whole batch or an int array of shape (B,), one per sample.
    Computed in float64 from the schedule's float64 coefficients and rounded to float32 once.
    """
    x0 = np.asarray(x0, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    if x0.ndim < 1 or x0.shape != noise.shape:
        raise SamplerError(f"x0 and noise must have the same shape, got {x0.shape} and {noise.shape}")
    T = schedule.num_train_timesteps
    t_arr = np.asarray(t)
    if t_arr.dtype.kind not in "iu" or t_arr.ndim > 1:
        raise SamplerError(f"t must be an integer or a 1-D integer array, got {t!r}")
    if t_arr.ndim == 1 and t_arr.shape[0] != x0.shape[0]:
        raise SamplerError(f"t has {t_arr.shape[0]} timesteps for a batch of {x0.shape[0]}")
    if t_arr.size and (t_arr.min() < 0 or t_arr.max() > T - 1):
        raise SamplerError(f"t must lie in 0..{T - 1}, got {t!r}")
    alphas_cumprod = schedule.alphas_cumprod  # (T,) float64
    bshape = (-1,) + (1,) * (x0.ndim - 1) if t_arr.ndim == 1 else ()
    sqrt_abar = np.sqrt(alphas_cumprod[t_arr]).reshape(bshape)  # float64, (B, 1, 1, 1) or ()
    sqrt_one_minus_abar = np.sqrt(1.0 - alphas_cumprod[t_arr]).reshape(bshape)
    x_t = np.multiply(x0, sqrt_abar, dtype=np.float64)
    x_t += np.multiply(noise, sqrt_one_minus_abar, dtype=np.float64)
    return x_t.astype(np.float32)


# --- the shared machinery ----------------------------------------------------------


class _Sampler:
    """What the three samplers share: options, the timestep table, array checks, work buffers."""

    name: str = ""
    OPTIONS: tuple[str, ...] = ()
    init_noise_sigma: float = 1.0  # x_T ~ N(0, I) for all three: no input scaling

    def __init__(self, schedule: Schedule, prediction_type: str, timestep_spacing: str,
                 steps_offset: int) -> None:
        if not isinstance(schedule, Schedule):
            raise SamplerError(f"schedule must be an mdx Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.prediction_type = _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.timestep_spacing = _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.steps_offset = _check_int("steps_offset", steps_offset, 0)
        self.num_train_timesteps = int(schedule.num_train_timesteps)
        self.alphas_cumprod = schedule.alphas_cumprod  # (T,) float64, abar_t
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.int64)
        self._index_of: dict[int, int] = {}
        # float64 work buffers, (B, C, H, W), allocated on the first step and on a batch change.
        self._x0_64: np.ndarray | None = None
        self._prev_64: np.ndarray | None = None
        self._tmp_64: np.ndarray | None = None

    @property
    def options(self) -> dict:
        """The options this sampler was built with (JSON-able), e.g. for logs and metadata."""
        return {k: getattr(self, k) for k in self.OPTIONS}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts}, num_inference_steps={self.num_inference_steps})"

    # set_timesteps: the subclass supplies the spacing and the per-step coefficients.
    def _max_steps(self) -> int:
        return self.num_train_timesteps

    def _make_timesteps(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def _precompute(self) -> None:
        raise NotImplementedError

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps to visit and precompute every per-step coefficient (float64)."""
        hi = self._max_steps()
        n = _check_int("num_inference_steps", num_inference_steps, 1, hi)
        ts = self._make_timesteps(n)
        T = self.num_train_timesteps
        if ts.min() < 0 or ts.max() > T - 1:
            raise SamplerError(
                f"steps_offset={self.steps_offset} with {n} steps gives timestep {int(ts.max())}, "
                f"beyond the schedule's 0..{T - 1}; lower steps_offset"
            )
        if len(np.unique(ts)) != n:  # cannot happen for the spacings above within the bounds checked
            raise SamplerError(f"{n} steps with {self.timestep_spacing} spacing repeat a timestep")
        ts.flags.writeable = False
        self.timesteps = ts
        self.num_inference_steps = n
        self._index_of = {int(t): i for i, t in enumerate(ts)}
        self._precompute()

    def _index(self, t: int) -> int:
        if self.num_inference_steps is None:
            raise SamplerError("call set_timesteps(num_inference_steps) before step")
        i = self._index_of.get(t)
        if i is None:
            raise SamplerError(f"timestep {t} is not one of this sampler's timesteps {self.timesteps.tolist()}")
        return i

    def needs_noise(self, timestep: int) -> bool:
        """True exactly when the diffusers scheduler would draw noise at this step."""
        raise NotImplementedError

    def _check_arrays(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
                      noise: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """float32 views of the inputs (no copy when already float32), shapes and noise checked."""
        sample = np.asarray(sample, dtype=np.float32)
        model_output = np.asarray(model_output, dtype=np.float32)
        if sample.ndim != 4:
            raise SamplerError(f"sample must be (B, C, H, W), got shape {sample.shape}")
        if model_output.shape != sample.shape:
            raise SamplerError(f"model_output shape {model_output.shape} differs from sample shape {sample.shape}")
        wanted = self.needs_noise(timestep)
        if wanted and noise is None:
            raise SamplerError(f"{self.name} needs noise at timestep {timestep}; pass noise= of shape {sample.shape}")
        if not wanted and noise is not None:
            raise SamplerError(
                f"{self.name} draws no noise at timestep {timestep}; pass noise=None "
                "(draw z only when needs_noise(t) is True, to keep the random stream aligned)"
            )
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != sample.shape:
                raise SamplerError(f"noise shape {noise.shape} differs from sample shape {sample.shape}")
        if self._x0_64 is None or self._x0_64.shape != sample.shape:
            self._x0_64 = np.empty(sample.shape, dtype=np.float64)
            self._prev_64 = np.empty(sample.shape, dtype=np.float64)
            self._tmp_64 = np.empty(sample.shape, dtype=np.float64)
        return model_output, sample, noise

    def _combine(self, out: np.ndarray, *terms: tuple[float, np.ndarray | None]) -> np.ndarray:
        """out = sum(c * x for c, x in terms), computed in float64 in preallocated buffers.

        Inputs are float32 or float64; each is widened to float64 as it is read, so the sum is
        as exact as the float64 coefficients (the cancellation in x_0 = (x_t - sigma eps) / alpha
        costs nothing when alpha is tiny, as at the cosine schedule's last timesteps).
        """
        first = True
        for c, x in terms:
            if x is None or c == 0.0:
                continue
            if first:
                np.multiply(x, c, out=out, dtype=np.float64)
                first = False
            else:
                np.multiply(x, c, out=self._tmp_64, dtype=np.float64)
                out += self._tmp_64
        if first:
            out.fill(0.0)
        return out

    def _x0_coefficients(self, sqrt_abar: np.ndarray, sqrt_one_minus_abar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(c_x, c_out) with x_0 = c_x x_t - c_out model_output.

        epsilon: x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)   (Ho et al. Eq. 15; Song et al. Eq. 12)
        v:       x_0 = sqrt(abar) x_t - sqrt(1 - abar) v           (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1 - abar) x_0)
        """
        if self.prediction_type == "epsilon":
            return 1.0 / sqrt_abar, sqrt_one_minus_abar / sqrt_abar
        return sqrt_abar.copy(), sqrt_one_minus_abar.copy()

    def _predict_x0(self, i: int, model_output: np.ndarray, sample: np.ndarray, clip: float | None) -> np.ndarray:
        """x^_0 into the float64 buffer `_x0_64`, clipped to [-clip, clip] when clip is given."""
        x0 = self._combine(self._x0_64, (float(self._c_x[i]), sample), (-float(self._c_out[i]), model_output))
        if clip is not None:
            np.clip(x0, -clip, clip, out=x0)
        return x0

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> StepOutput:
        raise NotImplementedError


# --- DDPM --------------------------------------------------------------------------


class DDPMSampler(_Sampler):
    """Ancestral sampling from p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2), as DDPMScheduler.

    With fewer steps than T the chain jumps from t to the previous visited timestep t' and uses
    the "effective" beta_t = 1 - abar_t / abar_t', exactly as diffusers does.

    variance_type: "fixed_small" sigma_t^2 = beta~_t, the posterior variance (Eq. 7; diffusers'
    default) or "fixed_large" sigma_t^2 = beta_t (Sec. 3.2; the course seed's choice).
    """

    name = "ddpm"
    OPTIONS = ("prediction_type", "variance_type", "clip_sample", "clip_sample_range",
               "timestep_spacing", "steps_offset")

    def __init__(self, schedule: Schedule, *, prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small", clip_sample: bool = True,
                 clip_sample_range: float = 1.0, timestep_spacing: str = "leading",
                 steps_offset: int = 0) -> None:
        super().__init__(schedule, prediction_type, timestep_spacing, steps_offset)
        self.variance_type = _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self.clip_sample = _check_bool("clip_sample", clip_sample)
        self.clip_sample_range = _check_float("clip_sample_range", clip_sample_range, 0.0, math.inf, lo_open=True)

    def _make_timesteps(self, n: int) -> np.ndarray:
        return spaced_timesteps(self.num_train_timesteps, n, self.timestep_spacing, self.steps_offset)

    def _precompute(self) -> None:
        ts = self.timesteps
        abar_t = self.alphas_cumprod[ts]  # (n,) float64
        # abar of the next visited timestep; 1 after the last (diffusers' `one`).
        abar_prev = np.append(self.alphas_cumprod[ts[1:]], 1.0)
        alpha_t = abar_t / abar_prev  # effective alpha_t over the jump
        beta_t = 1.0 - alpha_t
        self._c_x, self._c_out = self._x0_coefficients(np.sqrt(abar_t), np.sqrt(1.0 - abar_t))
        # Posterior mean mu~_t(x_t, x_0) = c_0 x_0 + c_t x_t (Eq. 7). With x^_0 from Eq. 15 and no
        # clipping this is Eq. 11's mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).
        self._c_0 = np.sqrt(abar_prev) * beta_t / (1.0 - abar_t)
        self._c_t = np.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar_t)
        if self.variance_type == "fixed_small":
            # beta~_t (Eq. 7), floored at 1e-20 as diffusers does (it is 0 on a final step from t > 0).
            variance = np.maximum((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)
        else:
            variance = beta_t
        self._sigma = np.sqrt(variance)

    def needs_noise(self, timestep: int) -> bool:
        """Algorithm 2 adds sigma_t z at every step except from t = 0."""
        return _as_timestep(timestep) > 0

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> StepOutput:
        """x_{t-1} = mu~_t(x_t, x^_0) + sigma_t z (Eq. 6/7 with x^_0 from Eq. 15), x^_0 clipped first."""
        t = _as_timestep(timestep)
        i = self._index(t)
        model_output, sample, noise = self._check_arrays(model_output, t, sample, noise)
        clip = self.clip_sample_range if self.clip_sample else None
        x0 = self._predict_x0(i, model_output, sample, clip)  # (B, C, H, W) float64
        prev = self._combine(self._prev_64, (float(self._c_0[i]), x0), (float(self._c_t[i]), sample),
                             (float(self._sigma[i]), noise))  # mu~_t + sigma_t z
        return StepOutput(prev_sample=prev.astype(np.float32), pred_original_sample=x0.astype(np.float32))


# --- DDIM --------------------------------------------------------------------------


class DDIMSampler(_Sampler):
    """Song et al. 2020 generalised (non-Markovian) sampling, Eq. 12 with sigma_t(eta) of Eq. 16.

    eta = 0 is deterministic DDIM; eta = 1 has DDPM's posterior variance.

    As diffusers does, the step from t goes to t - T // n whatever the spacing: with "leading"
    spacing that is the next visited timestep; with "trailing" or "linspace" spacing it can differ
    from it by a few timesteps (kept for step-for-step parity with DDIMScheduler).
    `set_alpha_to_one` picks abar for the step past t = 0: 1 (True) or abar_0 (False).
    """

    name = "ddim"
    OPTIONS = ("prediction_type", "eta", "clip_sample", "clip_sample_range", "set_alpha_to_one",
               "timestep_spacing", "steps_offset")

    def __init__(self, schedule: Schedule, *, prediction_type: str = "epsilon", eta: float = 0.0,
                 clip_sample: bool = True, clip_sample_range: float = 1.0,
                 set_alpha_to_one: bool = True, timestep_spacing: str = "leading",
                 steps_offset: int = 0) -> None:
        super().__init__(schedule, prediction_type, timestep_spacing, steps_offset)
        self.eta = _check_float("eta", eta, 0.0, 1.0)
        self.clip_sample = _check_bool("clip_sample", clip_sample)
        self.clip_sample_range = _check_float("clip_sample_range", clip_sample_range, 0.0, math.inf, lo_open=True)
        self.set_alpha_to_one = _check_bool("set_alpha_to_one", set_alpha_to_one)

    def _make_timesteps(self, n: int) -> np.ndarray:
        return spaced_timesteps(self.num_train_timesteps, n, self.timestep_spacing, self.steps_offset)

    def _precompute(self) -> None:
        ts = self.timesteps
        prev_ts = ts - self.num_train_timesteps // self.num_inference_steps
        final_abar = 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])
        abar_t = self.alphas_cumprod[ts]  # alpha_t in Song et al.'s notation
        abar_prev = np.where(prev_ts >= 0, self.alphas_cumprod[np.maximum(prev_ts, 0)], final_abar)
        sqrt_abar, sqrt_one_minus_abar = np.sqrt(abar_t), np.sqrt(1.0 - abar_t)
        self._c_x, self._c_out = self._x0_coefficients(sqrt_abar, sqrt_one_minus_abar)
        # sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)   (Eq. 16)
        sigma = self.eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
        # x_{t-1} = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z   (Eq. 12)
        c_dir = np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0))  # "direction pointing to x_t"
        self._c_0 = np.sqrt(abar_prev)
        if self.prediction_type == "epsilon":  # eps = model_output
            self._c_eps_out, self._c_eps_x = c_dir, np.zeros_like(c_dir)
        else:  # eps = sqrt(abar) v + sqrt(1 - abar) x_t, folded into the coefficients
            self._c_eps_out, self._c_eps_x = c_dir * sqrt_abar, c_dir * sqrt_one_minus_abar
        self._sigma = sigma

    def needs_noise(self, timestep: int) -> bool:
        """DDIMScheduler draws z at every step when eta > 0, none when eta = 0."""
        _as_timestep(timestep)
        return self.eta > 0.0

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> StepOutput:
        """Eq. 12: x_{t-1} = sqrt(abar_prev) x^_0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z.

        x^_0 is clipped when clip_sample is set; eps is the model's, unclipped (diffusers'
        use_clipped_model_output=False).
        """
        t = _as_timestep(timestep)
        i = self._index(t)
        model_output, sample, noise = self._check_arrays(model_output, t, sample, noise)
        clip = self.clip_sample_range if self.clip_sample else None
        x0 = self._predict_x0(i, model_output, sample, clip)  # (B, C, H, W) float64
        prev = self._combine(self._prev_64, (float(self._c_0[i]), x0), (float(self._c_eps_out[i]), model_output),
                             (float(self._c_eps_x[i]), sample), (float(self._sigma[i]), noise))
        return StepOutput(prev_sample=prev.astype(np.float32), pred_original_sample=x0.astype(np.float32))


# --- DPM-Solver++ (2M) -------------------------------------------------------------


class DPMSolverSampler(_Sampler):
    """DPM-Solver++ multistep (Lu et al. 2022, Algorithm 2), as DPMSolverMultistepScheduler's defaults:
    algorithm "dpmsolver++", solver_type "midpoint", final_sigmas_type "zero", no thresholding.

    In the paper's notation (step i goes from t_{i-1} to t_i; in the code, step i goes from
    timesteps[i] to timesteps[i + 1]), with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t),
    lambda_t = log(alpha_t / sigma_t) and h_i = lambda_{t_i} - lambda_{t_{i-1}}, each step
    integrates the data prediction x_theta = (x_t - sigma_t eps) / alpha_t:
      first order  x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) x_theta(t_{i-1})
      second order the same with D_i = (1 + 1/(2 r_i)) x_theta(t_{i-1}) - 1/(2 r_i) x_theta(t_{i-2}),
                   r_i = h_{i-1} / h_i.
    The first step (no history) and the last (to sigma = 0, where it returns x_theta itself) are
    first order; diffusers' lower_order_final only affects orders >= 3, not offered here.
    solver_order=1 is DPM-Solver++(1), i.e. DDIM in the data-prediction form. The sampler is
    stateful: steps must follow `timesteps` in order after `set_timesteps`, which resets the
    history; the first step may start anywhere in the list (first order there, as diffusers).

    At most T - 1 steps: with T, diffusers' spacings repeat a timestep (h = 0) and it returns NaN.
    """

    name = "dpmpp"
    OPTIONS = ("prediction_type", "solver_order", "timestep_spacing", "steps_offset", "lambda_min_clipped")

    def __init__(self, schedule: Schedule, *, prediction_type: str = "epsilon", solver_order: int = 2,
                 timestep_spacing: str = "linspace", steps_offset: int = 0,
                 lambda_min_clipped: float = -np.inf) -> None:
        super().__init__(schedule, prediction_type, timestep_spacing, steps_offset)
        self.solver_order = _check_int("solver_order", solver_order, 1, 2)
        if isinstance(lambda_min_clipped, bool) or not isinstance(lambda_min_clipped, (int, float)) \
                or np.isnan(lambda_min_clipped) or lambda_min_clipped == np.inf:
            raise SamplerError(f"lambda_min_clipped must be a number or -inf, got {lambda_min_clipped!r}")
        self.lambda_min_clipped = float(lambda_min_clipped)
        self._reset_history()

    def _reset_history(self) -> None:
        self._next_index: int | None = None  # the index the next step must have; None: any
        self._x0_prev: np.ndarray | None = None  # private float64 copy of x_theta(t_{i-1})

    def _max_steps(self) -> int:
        return self.num_train_timesteps - 1

    def _last_timestep(self) -> int:
        """T minus the number of timesteps whose half log-SNR lies below lambda_min_clipped.

        With the cosine schedule the last abar_t are ~1e-8, so x_theta = (x - sigma eps) / alpha
        multiplies any error in eps by ~1e4 on the first step; diffusers calls this clipping
        'critical for the cosine schedule'."""
        T = self.num_train_timesteps
        if self.lambda_min_clipped == -np.inf:
            return T
        abar = self.alphas_cumprod
        lam = 0.5 * np.log(abar) - 0.5 * np.log1p(-abar)  # (T,) lambda_t, decreasing in t
        clipped = int(np.searchsorted(lam[::-1], self.lambda_min_clipped, side="left"))
        if T - clipped < 2:
            raise SamplerError(f"lambda_min_clipped={self.lambda_min_clipped} leaves fewer than 2 timesteps")
        return T - clipped

    def _make_timesteps(self, n: int) -> np.ndarray:
        last = self._last_timestep()
        if last < self.num_train_timesteps and self.timestep_spacing == "trailing":
            # diffusers then yields fewer than n timesteps; refuse rather than silently differ.
            raise SamplerError("lambda_min_clipped works with linspace or leading timestep spacing, not trailing")
        return dpm_solver_timesteps(self.num_train_timesteps, n, self.timestep_spacing, self.steps_offset, last)

    def _precompute(self) -> None:
        ts = self.timesteps
        n = len(ts)
        abar = self.alphas_cumprod[ts]  # (n,) float64
        alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
        lam = np.log(alpha) - np.log(sigma)  # lambda_{t_i}, the half log-SNR
        self._c_x, self._c_out = self._x0_coefficients(alpha, sigma)
        # Step i goes from t_i to t_{i+1}; the point after the last is sigma = 0, alpha = 1.
        alpha_next = np.append(alpha[1:], 1.0)
        sigma_next = np.append(sigma[1:], 0.0)
        h = np.append(lam[1:] - lam[:-1], np.inf)  # h of step i (lambda at sigma = 0 is +inf)
        phi = np.expm1(-h)  # e^{-h} - 1, accurate for small h; -1 on the last step
        self._a = sigma_next / sigma  # coefficient of x_{t_i}
        self._b1 = -alpha_next * phi  # first order: coefficient of x_theta(t_i)
        # Second order (midpoint): r_i = h_{i-1} / h_i, defined for 1 <= i <= n - 2.
        self._b2 = np.zeros(n)
        self._c2 = np.zeros(n)
        if n >= 3:
            idx = np.arange(1, n - 1)
            half_inv_r = 0.5 * h[idx] / h[idx - 1]  # 1 / (2 r_i)
            self._b2[idx] = self._b1[idx] * (1.0 + half_inv_r)
            self._c2[idx] = -self._b1[idx] * half_inv_r
        self._reset_history()

    def needs_noise(self, timestep: int) -> bool:
        """DPM-Solver++ (2M) is an ODE solver: it never draws noise."""
        _as_timestep(timestep)
        return False

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> StepOutput:
        """One step of Algorithm 2 from t_i to t_{i+1}; pred_original_sample is x_theta(x_{t_i}, t_i)."""
        t = _as_timestep(timestep)
        i = self._index(t)
        if self._next_index is not None and i != self._next_index:
            expected = int(self.timesteps[self._next_index]) if self._next_index < len(self.timesteps) else None
            raise SamplerError(
                f"dpmpp is multistep and must follow its timesteps in order: expected "
                f"{expected if expected is not None else 'no further step'}, got {t}; "
                "call set_timesteps to start again"
            )
        model_output, sample, noise = self._check_arrays(model_output, t, sample, noise)
        if self._x0_prev is not None and self._x0_prev.shape != sample.shape:
            raise SamplerError(f"sample shape {sample.shape} changed mid-run from {self._x0_prev.shape}")
        # x_theta from the model output (data prediction; no clipping in DPM-Solver++'s defaults).
        x0 = self._predict_x0(i, model_output, sample, None)  # (B, C, H, W) float64
        # Second order needs the previous x_theta; the last step (to sigma = 0) is always first order.
        if self.solver_order == 2 and self._x0_prev is not None and 0 < i < len(self.timesteps) - 1:
            prev = self._combine(self._prev_64, (float(self._a[i]), sample), (float(self._b2[i]), x0),
                                 (float(self._c2[i]), self._x0_prev))
        else:
            prev = self._combine(self._prev_64, (float(self._a[i]), sample), (float(self._b1[i]), x0))
        # The history is a private float64 copy, independent of the arrays handed to the caller.
        if self._x0_prev is None:
            self._x0_prev = np.empty_like(x0)
        np.copyto(self._x0_prev, x0)
        self._next_index = i + 1
        return StepOutput(prev_sample=prev.astype(np.float32), pred_original_sample=x0.astype(np.float32))


# --- the factory -------------------------------------------------------------------

_CLASSES: dict[str, type[_Sampler]] = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmpp": DPMSolverSampler}
AnySampler = Union[DDPMSampler, DDIMSampler, DPMSolverSampler]


def make_sampler(name: str, schedule: Schedule, **options) -> AnySampler:
    """Build a sampler by name ("ddpm", "ddim", "dpmpp") with diffusers' defaults for any option not given."""
    if not isinstance(name, str) or name not in _CLASSES:
        raise SamplerError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls = _CLASSES[name]
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
        raise SamplerError(
            f"unknown option(s) {', '.join(unknown)} for sampler {name!r}; allowed: {', '.join(cls.OPTIONS)}"
        )
    return cls(schedule, **options)
