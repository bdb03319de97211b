"""mdx.runtime.schedules: the four beta schedules against diffusers, float64 identities, bad input.

diffusers builds "linear", "scaled_linear" and "sigmoid" betas in float32 torch arithmetic and
"squaredcos_cap_v2" in float64 Python (then casts to float32); it takes cumprod in float32.
Ours are float64 throughout, so against diffusers we compare our values rounded to float32:
- betas: linear within 1 float32 ulp (torch.linspace rounds its own way), quadratic and sigmoid
  within 4 ulp (diffusers squares / applies the sigmoid in float32: several roundings), cosine
  bit-exact (same float64 formula, one rounding);
- alphas_cumprod: relative 2e-6 (float32 cumprod over up to 1000 factors drifts ~1e-6), except
  cosine's last entry, where diffusers' 1 - float32(0.999) = 0.00099998713 is off by 1.3e-5
  relative; there we check the float64 value against diffusers' own float64 formula instead.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mdx.runtime.schedules import SCHEDULES, Schedule, ScheduleError, make_schedule

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_KIND = {"linear": "linear", "quadratic": "scaled_linear", "sigmoid": "sigmoid",
                  "cosine": "squaredcos_cap_v2"}
BETA_ULPS = {"linear": 1, "quadratic": 4, "sigmoid": 4, "cosine": 0}
ABAR_RTOL = 2e-6


def ulps(ours64: np.ndarray, theirs32: np.ndarray) -> np.ndarray:
    return np.abs(ours64.astype(np.float32) - theirs32) / np.spacing(np.abs(theirs32))


def test_every_schedule_name_builds_and_has_a_diffusers_counterpart():
    assert set(SCHEDULES) == set(DIFFUSERS_KIND)  # so the parity tests below cover every schedule offered
    for kind in SCHEDULES:
        schedule = make_schedule(kind, 10)
        assert schedule.kind == kind and schedule.betas.shape == (10,)
        assert Schedule.from_dict(schedule.to_dict()) == schedule
    with pytest.raises(ScheduleError, match="linear"):  # the message lists the names allowed
        make_schedule("exponential", 10)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("T,beta_start,beta_end", [(2, 1e-4, 0.02), (10, 1e-4, 0.02), (500, 1e-4, 0.02),
                                                   (1000, 1e-4, 0.02), (1000, 0.00085, 0.012)])
def test_betas_and_alphas_cumprod_match_diffusers(kind, T, beta_start, beta_end):
    ours = make_schedule(kind, T, beta_start, beta_end)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
                                     beta_schedule=DIFFUSERS_KIND[kind])
    betas32 = theirs.betas.numpy()
    assert ulps(ours.betas, betas32).max() <= BETA_ULPS[kind]
    abar32 = theirs.alphas_cumprod.numpy().astype(np.float64)
    abar = ours.alphas_cumprod
    if kind == "cosine":
        np.testing.assert_allclose(abar[:-1], abar32[:-1], rtol=ABAR_RTOL, atol=0)
        # the last factor is 1 - 0.999 exactly in float64, 1 - float32(0.999) in diffusers
        assert abar[-1] == pytest.approx(abar[-2] * (1.0 - 0.999), rel=1e-14)
        assert abar32[-1] == pytest.approx(abar32[-2] * (1.0 - np.float32(0.999)), rel=1e-6)
    else:
        np.testing.assert_allclose(abar, abar32, rtol=ABAR_RTOL, atol=0)


@pytest.mark.parametrize("T", [2, 500, 1000])
def test_cosine_betas_equal_diffusers_float64_formula(T):
    """diffusers' betas_for_alpha_bar before its float32 cast, re-evaluated in float64 Python."""

    def alpha_bar_fn(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = [min(1 - alpha_bar_fn((i + 1) / T) / alpha_bar_fn(i / T), 0.999) for i in range(T)]
    np.testing.assert_allclose(make_schedule("cosine", T).betas, expected, rtol=1e-14, atol=0)


def test_closed_forms():
    lin = make_schedule("linear", 500, 1e-4, 0.02).betas
    assert lin[0] == 1e-4 and lin[-1] == pytest.approx(0.02, rel=1e-15)
    np.testing.assert_allclose(np.diff(lin), (0.02 - 1e-4) / 499, rtol=1e-9)
    quad = make_schedule("quadratic", 500, 1e-4, 0.02).betas
    np.testing.assert_allclose(np.diff(np.sqrt(quad)), (0.02**0.5 - 1e-4**0.5) / 499, rtol=1e-9)
    sig = make_schedule("sigmoid", 500, 1e-4, 0.02).betas
    x = np.linspace(-6, 6, 500)
    np.testing.assert_allclose(sig, 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-x)), rtol=1e-14)
    cos = make_schedule("cosine", 500)
    # Nichol & Dhariwal Eq. 17: abar_t = f(t + 1) / f(0) with f(u) = cos^2((u/T + s)/(1 + s) pi/2), up to the cap
    f = np.cos((np.arange(501) / 500 + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(cos.alphas_cumprod[:-1], (f[1:] / f[0])[:-1], rtol=1e-12)
    assert cos.betas[-1] == 0.999 and cos.betas.max() == 0.999


@pytest.mark.parametrize("kind", SCHEDULES)
def test_float64_identities(kind):
    s = make_schedule(kind, 500)
    betas = s.betas
    assert betas.dtype == np.float64 and betas.shape == (500,)
    assert np.all(betas > 0) and np.all(betas < 1)
    if kind != "cosine":
        assert np.all(np.diff(betas) > 0)
    np.testing.assert_array_equal(s.alphas, 1.0 - betas)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1.0 - betas), rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.alphas_cumprod[1:] / s.alphas_cumprod[:-1], s.alphas[1:], rtol=1e-12)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert s.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    np.testing.assert_allclose(s.sqrt_alphas_cumprod**2, s.alphas_cumprod, rtol=1e-12)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, 1.0, rtol=1e-12)
    # beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (Ho et al. Eq. 7): 0 at t = 0, below beta_t after
    pv = s.posterior_variance
    assert pv[0] == 0.0
    assert np.all(pv[1:] < betas[1:])
    np.testing.assert_allclose(pv[1:], (1 - s.alphas_cumprod[:-1]) / (1 - s.alphas_cumprod[1:]) * betas[1:],
                               rtol=1e-12)


def test_defaults_round_trip_and_equality():
    s = make_schedule()
    assert (s.kind, s.num_train_timesteps, s.beta_start, s.beta_end) == ("linear", 500, 1e-4, 0.02)
    d = s.to_dict()
    assert d == {"kind": "linear", "num_train_timesteps": 500, "beta_start": 1e-4, "beta_end": 0.02}
    assert Schedule.from_dict(d) == s
    assert Schedule.from_dict({"kind": "cosine", "num_train_timesteps": "1000", "beta_start": "0.0001",
                               "beta_end": 0.02}) == make_schedule("cosine", 1000)
    assert '"kind": "linear"' in s.to_json()
    np.testing.assert_array_equal(Schedule.from_dict(d).betas, s.betas)
    with pytest.raises(AttributeError):
        s.kind = "cosine"  # frozen


@pytest.mark.parametrize(
    "args,match",
    [
        (("exponential", 500, 1e-4, 0.02), "unknown schedule 'exponential'; choose one of linear, quadratic, sigmoid, cosine"),
        (("linear", 500, 0.02, 0.02), "beta_start=0.02 beta_end=0.02"),
        (("quadratic", 500, 0.02, 1e-4), "beta_start=0.02 beta_end=0.0001"),
        (("sigmoid", 500, 0.0, 0.02), "0 < beta_start < beta_end < 1"),
        (("linear", 500, 1e-4, 1.0), "0 < beta_start < beta_end < 1"),
        (("linear", 1, 1e-4, 0.02), "timesteps must be an integer >= 2, got 1"),
        (("cosine", 0, 1e-4, 0.02), "got 0"),
        (("linear", 500.0, 1e-4, 0.02), "got 500.0"),
    ],
)
def test_bad_schedules(args, match):
    with pytest.raises(ScheduleError, match=match):
        make_schedule(*args)
    assert issubclass(ScheduleError, ValueError)


@pytest.mark.parametrize(
    "d,match",
    [
        ({"kind": "linear", "num_train_timesteps": 500}, "lacks beta_start, beta_end"),
        ({"kind": "linear", "num_train_timesteps": "many", "beta_start": 1e-4, "beta_end": 0.02}, "bad schedule"),
        ({"kind": "nope", "num_train_timesteps": 500, "beta_start": 1e-4, "beta_end": 0.02}, "unknown schedule"),
    ],
)
def test_bad_schedule_descriptions(d, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule.from_dict(d)


def test_cosine_ignores_beta_range():
    """beta_start / beta_end play no part in the cosine schedule (kept only for the metadata)."""
    a = make_schedule("cosine", 500, 1e-4, 0.02)
    b = make_schedule("cosine", 500, 0.5, 0.1)
    np.testing.assert_array_equal(a.betas, b.betas)
