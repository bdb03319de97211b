"""Noise schedules, defined once for the whole project (numpy, float64).

Each schedule returns the betas of the forward process q(x_t | x_{t-1}) for
t = 0..T-1, with diffusers' conventions (docs/contract.md):

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   abar_t = prod_{s<=t} (1 - beta_s)

`linear`, `quadratic`, `sigmoid` and `cosine` equal diffusers' `linear`,
`scaled_linear`, `sigmoid` and `squaredcos_cap_v2` beta schedules. diffusers
stores its betas in float32; here they stay in float64 so every coefficient
the samplers derive from them is as exact as the format allows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

SCHEDULES = ("linear", "quadratic", "sigmoid", "cosine")


class ScheduleError(ValueError):
    """A schedule was asked for with a bad name or bad parameters."""


# --- beta schedules: pure functions -------------------------------------------------


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Ho et al. 2020 (DDPM, arXiv:2006.11239), Sec. 4: betas linear in t."""
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)


def quadratic_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """sqrt(beta) linear in t (the latent-diffusion 'scaled_linear' schedule)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2


def sigmoid_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Betas following a sigmoid over [-6, 6] (Jabri et al. 2022, GeoDiff's schedule)."""
    x = np.linspace(-6.0, 6.0, num_train_timesteps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021 (arXiv:2102.09672), Eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

    beta_t = 1 - abar((t+1)/T) / abar(t/T), capped at `max_beta` to avoid the
    singularity at t = T.
    """

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return np.asarray(betas, dtype=np.float64)


# --- the schedule and its precomputed coefficients ---------------------------------


@dataclass(frozen=True)
class Schedule:
    """A named beta schedule with every coefficient derived from it, in float64.

    `beta_start` and `beta_end` are ignored by `cosine` (kept for the metadata).
    """

    kind: str = "linear"
    num_train_timesteps: int = 500
    beta_start: float = 1e-4
    beta_end: float = 0.02
    betas: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ScheduleError(f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if not isinstance(self.num_train_timesteps, (int, np.integer)) or self.num_train_timesteps < 2:
            raise ScheduleError(f"timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if self.kind != "cosine":
            if not (0.0 < self.beta_start < self.beta_end < 1.0):
                raise ScheduleError(
                    f"need 0 < beta_start < beta_end < 1, got beta_start={self.beta_start} beta_end={self.beta_end}"
                )
        object.__setattr__(self, "betas", self._make_betas())

    def _make_betas(self) -> np.ndarray:
        T = int(self.num_train_timesteps)
        if self.kind == "linear":
            return linear_betas(T, self.beta_start, self.beta_end)
        if self.kind == "quadratic":
            return quadratic_betas(T, self.beta_start, self.beta_end)
        if self.kind == "sigmoid":
            return sigmoid_betas(T, self.beta_start, self.beta_end)
        return cosine_betas(T)

    # Derived arrays, each of length T. Properties rather than fields so that the
    # dataclass stays a plain, comparable description of the schedule.
    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(self.alphas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def sqrt_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod)

    @property
    def posterior_variance(self) -> np.ndarray:
        """beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (DDPM Eq. 7)."""
        return (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod) * self.betas

    def to_dict(self) -> dict:
        """The JSON-able description written into checkpoints and ONNX metadata."""
        return {
            "kind": self.kind,
            "num_train_timesteps": int(self.num_train_timesteps),
            "beta_start": float(self.beta_start),
            "beta_end": float(self.beta_end),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        """Rebuild from `to_dict()` output; raises ScheduleError on missing or bad keys."""
        missing = [k for k in ("kind", "num_train_timesteps", "beta_start", "beta_end") if k not in d]
        if missing:
            raise ScheduleError(f"schedule description lacks {', '.join(missing)}")
        try:
            return cls(
                kind=str(d["kind"]),
                num_train_timesteps=int(d["num_train_timesteps"]),
                beta_start=float(d["beta_start"]),
                beta_end=float(d["beta_end"]),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ScheduleError):
                raise
            raise ScheduleError(f"bad schedule description {d!r}: {e}") from None


def make_schedule(kind: str = "linear", num_train_timesteps: int = 500,
                  beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Build a Schedule; the one place other modules should call."""
    return Schedule(kind, num_train_timesteps, beta_start, beta_end)
