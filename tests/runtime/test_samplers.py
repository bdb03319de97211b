"""mdx.runtime.samplers against diffusers' DDPM, DDIM and DPM-Solver++ schedulers.

Every loop drives mdx and diffusers side by side from the same x_T, with the same stand-in
model (a function of each implementation's own trajectory) and the same noise draws, in the
order docs/contract.md fixes, and compares prev_sample at every step.

Two diffusers references:
- "float64": diffusers' own scheduler code with its tables (betas, alphas_cumprod, sigmas,
  ...) replaced by the schedule's float64 ones and float64 arrays: the same algorithm without
  float32 table rounding. mdx must agree with it to ATOL = 1e-5 at every step.
- "betas" / "kind": stock diffusers, built with trained_betas = our betas or with the matching
  beta_schedule name. These keep float32 tables (e.g. the cosine schedule's capped beta 0.999
  in float32 makes 1 - beta wrong by 1.3e-5 relative), so they drift from the exact result;
  the test checks mdx is within STOCK_ATOL of them and that the drift is diffusers' own (the
  float64 reference shows the same gap).
"""

from __future__ import annotations

import inspect
import timeit
from contextlib import ExitStack
from unittest import mock

import numpy as np
import pytest

from mdx.runtime.schedules import SCHEDULES, make_schedule
from mdx.runtime.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    SamplerError,
    StepOutput,
    add_noise,
    make_sampler,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_ddim as ddim_module  # noqa: E402
import diffusers.schedulers.scheduling_ddpm as ddpm_module  # noqa: E402
import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_module  # noqa: E402

T = 500
SHAPE = (2, 3, 8, 8)
ATOL = 1e-5  # mdx vs diffusers' code on float64 tables, every step
STOCK_ATOL = 5e-3  # mdx vs stock (float32-table) diffusers; worst seen 2.3e-3 (dpmpp, cosine, 1 step)
DIFFUSERS_KIND = {"linear": "linear", "quadratic": "scaled_linear", "sigmoid": "sigmoid",
                  "cosine": "squaredcos_cap_v2"}
DIFFUSERS_CLASS = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler,
                   "dpmpp": diffusers.DPMSolverMultistepScheduler}
# diffusers' DPM-Solver set_timesteps calls np.array on a torch tensor, which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
RANDN_HOME = {"ddpm": ddpm_module, "ddim": ddim_module, "dpmpp": dpm_module}


# --- helpers -------------------------------------------------------------------------


def stand_in_model(schedule, prediction_type, x0_target):
    """A denoiser that believes the clean image is x0_target + 0.1 R_t (R_t drawn per step):
    it returns the eps (or v) that belief implies for the sample it is given, in float32.
    It depends on the trajectory, keeps every trajectory bounded like a trained model does,
    and makes x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) as ill-conditioned as a real one."""
    abar_all = schedule.alphas_cumprod

    def model(x: np.ndarray, t: int, R: np.ndarray) -> np.ndarray:
        abar = abar_all[t]
        x = np.asarray(x, dtype=np.float64)
        x0 = x0_target + 0.1 * R
        eps = (x - np.sqrt(abar) * x0) / np.sqrt(1.0 - abar)
        out = eps if prediction_type == "epsilon" else np.sqrt(abar) * eps - np.sqrt(1.0 - abar) * x0
        return out.astype(np.float32)

    return model


def diffusers_reference(name, schedule, tables, options):
    """A diffusers scheduler on `schedule` with mdx's options; tables: "float64", "betas", "kind"."""
    kwargs = {k: v for k, v in options.items() if k != "eta"}
    cls = DIFFUSERS_CLASS[name]
    if tables == "kind":
        d = cls(num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
                beta_end=schedule.beta_end, beta_schedule=DIFFUSERS_KIND[schedule.kind], **kwargs)
    else:
        d = cls(num_train_timesteps=schedule.num_train_timesteps, trained_betas=schedule.betas, **kwargs)
    if tables == "float64":
        d.betas = torch.from_numpy(schedule.betas)
        d.alphas = 1.0 - d.betas
        d.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)
        if name == "ddpm":
            d.one = torch.tensor(1.0, dtype=torch.float64)
        if name == "ddim":
            d.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if d.config.set_alpha_to_one
                                     else d.alphas_cumprod[0])
    return d


def set_reference_timesteps(d, name, schedule, tables, n):
    d.set_timesteps(n)
    if tables == "float64" and name == "dpmpp":  # set_timesteps rebuilds its sigmas in float32
        abar = schedule.alphas_cumprod[d.timesteps.numpy()]
        d.sigmas = torch.from_numpy(np.append(np.sqrt((1.0 - abar) / abar), 0.0))


def drive(name, kind, n, refs=("float64",), num_train_timesteps=T, seed=0, **options):
    """Run mdx and each diffusers reference in lockstep; return the worst |prev_sample| gap per
    reference and, for stock references, the gap between them and the float64 reference."""
    schedule = make_schedule(kind, num_train_timesteps)
    sampler = make_sampler(name, schedule, **options)
    sampler.set_timesteps(n)
    eta = options.get("eta", 0.0)
    dtype = {"float64": torch.float64, "betas": torch.float32, "kind": torch.float32}
    ds = {}
    for tables in refs:
        ds[tables] = diffusers_reference(name, schedule, tables, options)
        set_reference_timesteps(ds[tables], name, schedule, tables, n)
        np.testing.assert_array_equal(ds[tables].timesteps.numpy(), sampler.timesteps)

    rng = np.random.default_rng(seed)
    x0_target = rng.uniform(-1.0, 1.0, SHAPE)
    model = stand_in_model(schedule, sampler.prediction_type, x0_target)
    x = rng.standard_normal(SHAPE, dtype=np.float32)  # x_T
    xs = {k: torch.from_numpy(x).to(dtype[k]) for k in refs}
    worst = {k: 0.0 for k in refs}
    gap = {k: 0.0 for k in refs}
    current_z = [None]
    randn_calls = [0]

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        randn_calls[0] += 1
        assert current_z[0] is not None, "diffusers drew noise where mdx's needs_noise(t) says none"
        return current_z[0].to(dtype)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(RANDN_HOME[name], "randn_tensor", fake_randn))
        for t in sampler.timesteps:
            R = rng.standard_normal(SHAPE)  # the model's own randomness, shared
            z = rng.standard_normal(SHAPE, dtype=np.float32) if sampler.needs_noise(t) else None
            out = sampler.step(model(x, int(t), R), t, x, noise=z)
            assert out.prev_sample.dtype == np.float32 and out.pred_original_sample.dtype == np.float32
            x = out.prev_sample
            for k, d in ds.items():
                current_z[0] = None if z is None else torch.from_numpy(z)
                mo = torch.from_numpy(model(xs[k].numpy(), int(t), R)).to(dtype[k])
                calls_before = randn_calls[0]
                if name == "ddim":
                    # Through randn_tensor (not variance_noise=) so a draw mdx does not expect is caught.
                    xs[k] = d.step(mo, int(t), xs[k], eta=eta).prev_sample
                else:
                    xs[k] = d.step(mo, int(t), xs[k]).prev_sample
                assert randn_calls[0] - calls_before == (1 if z is not None else 0), (
                    f"needs_noise({int(t)}) disagrees with diffusers")
                worst[k] = max(worst[k], float(np.abs(xs[k].numpy().astype(np.float64) - x).max()))
                if k != "float64" and "float64" in xs:
                    gap[k] = max(gap[k], float((xs[k].double() - xs["float64"]).abs().max()))
    print(f"{name} {kind} n={n} {options}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    return worst, gap


def check(worst, gap):
    assert worst["float64"] <= ATOL, worst
    for k in ("betas", "kind"):
        if k in worst:
            assert worst[k] <= STOCK_ATOL, worst
            # Whatever separates mdx from stock diffusers separates diffusers from itself on float64 tables.
            assert worst[k] <= gap[k] + ATOL, (worst, gap)


def steps_for(name, T=T):
    return (1, 10, 25, 50, T - 1 if name == "dpmpp" else T)


# --- parity loops --------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("name", SAMPLERS)
def test_default_sampler_matches_diffusers(name, kind):
    """Default options, step counts 1, 10, 25, 50 and T (T - 1 for dpmpp), three references."""
    refs = ("float64", "betas") if (kind == "sigmoid" and name != "ddpm") else ("float64", "betas", "kind")
    for n in steps_for(name):
        check(*drive(name, kind, n, refs=refs if n <= 50 else ("float64", "betas")))


OPTION_CASES = [
    ("ddpm", dict(clip_sample=False)),
    ("ddpm", dict(prediction_type="v_prediction")),
    ("ddpm", dict(prediction_type="v_prediction", clip_sample=False)),
    ("ddpm", dict(variance_type="fixed_large")),
    ("ddpm", dict(variance_type="fixed_large", clip_sample=False, clip_sample_range=2.0)),
    ("ddpm", dict(timestep_spacing="trailing")),
    ("ddpm", dict(timestep_spacing="linspace")),
    ("ddpm", dict(steps_offset=1)),
    ("ddim", dict(eta=0.5)),
    ("ddim", dict(eta=1.0)),
    ("ddim", dict(clip_sample=False)),
    ("ddim", dict(prediction_type="v_prediction")),
    ("ddim", dict(prediction_type="v_prediction", eta=0.5, clip_sample=False)),
    ("ddim", dict(set_alpha_to_one=False)),
    ("ddim", dict(timestep_spacing="trailing")),
    ("ddim", dict(timestep_spacing="linspace", eta=1.0)),
    ("ddim", dict(steps_offset=1, clip_sample_range=1.5)),
    ("dpmpp", dict(prediction_type="v_prediction")),
    ("dpmpp", dict(timestep_spacing="trailing")),
    ("dpmpp", dict(timestep_spacing="leading")),
    ("dpmpp", dict(timestep_spacing="leading", steps_offset=1)),
    ("dpmpp", dict(solver_order=1)),
    # diffusers' remedy for the cosine schedule's abar_t ~ 1e-8 end (what the shipped model uses).
    ("dpmpp", dict(lambda_min_clipped=-3.0)),
    ("dpmpp", dict(lambda_min_clipped=-5.1, timestep_spacing="leading")),
]


@pytest.mark.parametrize("name,options", OPTION_CASES, ids=[f"{n}-{o}" for n, o in OPTION_CASES])
def test_options_match_diffusers(name, options):
    """Each non-default option on all four schedules, 7 steps (spacing not dividing T) and 50."""
    for kind in SCHEDULES:
        for n in (7, 50):
            check(*drive(name, kind, n, refs=("float64", "betas"), seed=n, **options))


@pytest.mark.parametrize("name", SAMPLERS)
def test_diffusers_default_T_and_tiny_T(name):
    """T = 1000 (diffusers' default) at 50 steps; T = 10 at every valid step count."""
    check(*drive(name, "linear", 50, refs=("float64", "kind"), num_train_timesteps=1000))
    for n in range(1, 10 if name == "dpmpp" else 11):
        check(*drive(name, "quadratic", n, refs=("float64", "betas"), num_train_timesteps=10))


def test_the_largest_known_gap_to_stock_diffusers():
    """DPM-Solver++ on the cosine schedule in one step is where stock diffusers (float32 tables)
    strays furthest from mdx (2.3e-3): within STOCK_ATOL, while the float64 reference stays within
    ATOL, so the gap is diffusers' float32 tables and not the algorithm."""
    worst, _ = drive("dpmpp", "cosine", 1, refs=("float64", "betas", "kind"))
    assert worst["float64"] <= ATOL
    assert ATOL < max(worst["betas"], worst["kind"]) <= STOCK_ATOL, worst


# --- timesteps -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,options,n,expected",
    [
        ("ddim", {}, 10, [450, 400, 350, 300, 250, 200, 150, 100, 50, 0]),
        ("ddim", {"steps_offset": 1}, 10, [451, 401, 351, 301, 251, 201, 151, 101, 51, 1]),
        ("ddpm", {}, 7, [426, 355, 284, 213, 142, 71, 0]),
        ("ddpm", {"timestep_spacing": "trailing"}, 10, [499, 449, 399, 349, 299, 249, 199, 149, 99, 49]),
        ("ddpm", {"timestep_spacing": "linspace"}, 10, [499, 444, 388, 333, 277, 222, 166, 111, 55, 0]),
        ("dpmpp", {}, 10, [499, 449, 399, 349, 299, 250, 200, 150, 100, 50]),
        ("dpmpp", {"timestep_spacing": "leading"}, 10, [450, 405, 360, 315, 270, 225, 180, 135, 90, 45]),
        ("dpmpp", {"timestep_spacing": "trailing"}, 7, [499, 428, 356, 285, 213, 142, 70]),
        ("ddpm", {}, 1, [0]),
        ("dpmpp", {}, 1, [499]),
    ],
)
def test_exact_timesteps(name, options, n, expected):
    sampler = make_sampler(name, make_schedule("linear", 500), **options)
    sampler.set_timesteps(n)
    assert sampler.timesteps.dtype == np.int64
    assert sampler.timesteps.tolist() == expected
    assert sampler.num_inference_steps == n


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("spacing", ("leading", "trailing", "linspace"))
def test_timesteps_equal_diffusers_for_every_step_count(name, spacing):
    """Every n for T = 100: mdx's timesteps equal diffusers' wherever diffusers' are valid.

    Where diffusers' float `np.arange` for "trailing" comes out one too long (it then ends in
    -1, e.g. T = 100, n = 29), mdx keeps its first n, all valid."""
    T_small = 100
    schedule = make_schedule("linear", T_small)
    sampler = make_sampler(name, schedule, timestep_spacing=spacing)
    d = DIFFUSERS_CLASS[name](num_train_timesteps=T_small, timestep_spacing=spacing)
    too_long = 0
    for n in range(1, T_small if name == "dpmpp" else T_small + 1):
        sampler.set_timesteps(n)
        ts = sampler.timesteps
        assert len(ts) == n and len(np.unique(ts)) == n
        assert np.all(np.diff(ts) < 0) and ts.min() >= 0 and ts.max() <= T_small - 1
        d.set_timesteps(n)
        theirs = d.timesteps.numpy()
        if len(theirs) == n:
            np.testing.assert_array_equal(ts, theirs)
        else:
            too_long += 1
            assert spacing == "trailing" and len(theirs) == n + 1 and theirs[-1] == -1
            np.testing.assert_array_equal(ts, theirs[:n])
    if spacing == "trailing":
        assert too_long > 0  # the case the truncation exists for does occur


def test_dpmpp_refuses_T_steps_where_diffusers_gives_nan():
    schedule = make_schedule("linear", 100)
    d = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=100)
    d.set_timesteps(100)  # linspace repeats a timestep: h = 0, then r = 0
    x = torch.ones(1, 1, 2, 2)
    for t in d.timesteps:
        x = d.step(0.5 * x, t, x).prev_sample
    assert not torch.isfinite(x).all()
    sampler = make_sampler("dpmpp", schedule)
    with pytest.raises(SamplerError, match="between 1 and 99"):
        sampler.set_timesteps(100)
    sampler.set_timesteps(99)


# --- golden values -------------------------------------------------------------------


def golden_run(name, n, **options):
    schedule = make_schedule("linear", 500)
    sampler = make_sampler(name, schedule, **options)
    sampler.set_timesteps(n)
    rng = np.random.default_rng(1234)
    x0_target = rng.uniform(-1.0, 1.0, SHAPE)
    model = stand_in_model(schedule, "epsilon", x0_target)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    trajectory = []
    for t in sampler.timesteps:
        R = rng.standard_normal(SHAPE)
        z = rng.standard_normal(SHAPE, dtype=np.float32) if sampler.needs_noise(t) else None
        x = sampler.step(model(x, int(t), R), t, x, noise=z).prev_sample
        trajectory.append(x)
    return np.stack(trajectory).astype(np.float64)  # (n, B, C, H, W)


@pytest.mark.parametrize(
    "name,options,expected",
    [
        ("ddpm", {}, (-53.31081342929974, 2507.441614387557, -1.0348196029663086)),
        ("ddim", {}, (-56.518604978045914, 2432.0210737989983, 0.6293134689331055)),
        ("ddim", {"eta": 1.0}, (-52.22203037934378, 2505.0958844535053, -1.0348196029663086)),
        ("dpmpp", {}, (-53.211596016655676, 2554.8581153255654, 0.7826818227767944)),
    ],
)
def test_golden_checksums(name, options, expected):
    """A 10-step loop (seed 1234) gives the same trajectory checksums as when this file was written."""
    x = golden_run(name, 10, **options)
    got = (x.sum(), np.abs(x).sum(), x[4].flat[7])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


# --- behaviour -----------------------------------------------------------------------


def test_ddim_eta_one_unclipped_is_ddpm():
    """Song et al.: eta = 1 gives DDPM's posterior variance, and without clipping the same mean
    (Eq. 12 vs Ho et al. Eq. 7, two different formulas), so the same noise gives the same chain."""
    a = golden_run("ddim", 25, eta=1.0, clip_sample=False)
    b = golden_run("ddpm", 25, clip_sample=False)
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_needs_noise_follows_diffusers_rules():
    schedule = make_schedule("linear", 500)
    ddpm = make_sampler("ddpm", schedule)
    assert ddpm.needs_noise(1) and ddpm.needs_noise(499) and not ddpm.needs_noise(0)
    assert not make_sampler("ddim", schedule).needs_noise(450)
    assert make_sampler("ddim", schedule, eta=0.5).needs_noise(0)
    assert not make_sampler("dpmpp", schedule).needs_noise(499)
    assert ddpm.needs_noise(np.int64(3)) and not ddpm.needs_noise(np.array(0))


def test_returned_arrays_are_fresh_and_inputs_untouched():
    """Kept pred_original_sample arrays survive later steps; editing them changes nothing."""
    schedule = make_schedule("cosine", 500)
    for name in SAMPLERS:
        runs = []
        for vandal in (False, True):
            sampler = make_sampler(name, schedule)
            sampler.set_timesteps(6)
            rng = np.random.default_rng(5)
            x = rng.standard_normal(SHAPE, dtype=np.float32)
            kept, prevs = [], []
            for t in sampler.timesteps:
                eps = rng.standard_normal(SHAPE, dtype=np.float32)
                z = rng.standard_normal(SHAPE, dtype=np.float32) if sampler.needs_noise(t) else None
                x_in, eps_in = x.copy(), eps.copy()
                out = sampler.step(eps, t, x, noise=z)
                np.testing.assert_array_equal(x, x_in)  # inputs never written
                np.testing.assert_array_equal(eps, eps_in)
                kept.append((out.pred_original_sample, out.pred_original_sample.copy()))
                assert not np.shares_memory(out.prev_sample, out.pred_original_sample)
                x = out.prev_sample
                prevs.append(x.copy())
                if vandal:  # a caller editing what it was given must not change later steps
                    out.pred_original_sample[...] = 123.0
            if not vandal:
                for arr, snapshot in kept:
                    np.testing.assert_array_equal(arr, snapshot)
            runs.append(prevs)
        for a, b in zip(*runs):
            np.testing.assert_array_equal(a, b)


def test_set_timesteps_resets_dpmpp_history():
    schedule = make_schedule("linear", 500)
    sampler = make_sampler("dpmpp", schedule)
    results = []
    for _ in range(2):
        sampler.set_timesteps(8)
        rng = np.random.default_rng(3)
        x = rng.standard_normal(SHAPE, dtype=np.float32)
        for t in sampler.timesteps:
            x = sampler.step(0.5 * x + 0.1, t, x).prev_sample
        results.append(x)
    np.testing.assert_array_equal(*results)


def test_dpmpp_may_start_mid_schedule_with_a_first_order_step():
    """As diffusers: the first step taken is first order wherever it starts (e.g. img2img)."""
    schedule = make_schedule("linear", 500)
    sampler = make_sampler("dpmpp", schedule)
    sampler.set_timesteps(10)
    d = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=500, trained_betas=schedule.betas)
    d.set_timesteps(10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    xd = torch.from_numpy(x)
    for t in sampler.timesteps[4:]:
        x = sampler.step(0.3 * x, t, x).prev_sample
        xd = d.step(0.3 * xd, t, xd).prev_sample
    np.testing.assert_allclose(x, xd.numpy(), atol=1e-5)


def test_float64_inputs_give_float32_outputs_and_options_are_reported():
    schedule = make_schedule("linear", 500)
    sampler = DDIMSampler(schedule, eta=0.25)
    assert sampler.options == {"prediction_type": "epsilon", "eta": 0.25, "clip_sample": True,
                               "clip_sample_range": 1.0, "set_alpha_to_one": True,
                               "timestep_spacing": "leading", "steps_offset": 0}
    assert sampler.init_noise_sigma == 1.0
    sampler.set_timesteps(5)
    x = np.zeros(SHAPE)
    out = sampler.step(np.ones(SHAPE), sampler.timesteps[0], x, noise=np.zeros(SHAPE))
    assert isinstance(out, StepOutput)
    assert out.prev_sample.dtype == np.float32 and out.prev_sample.shape == SHAPE
    with pytest.raises(AttributeError):
        out.prev_sample = x  # frozen
    assert "DDIMSampler(" in repr(sampler)


def test_defaults_equal_diffusers_defaults():
    """The option defaults are diffusers' defaults for each scheduler."""
    schedule = make_schedule("linear", 500)
    cases = [(DDPMSampler, diffusers.DDPMScheduler), (DDIMSampler, diffusers.DDIMScheduler),
             (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler)]
    for ours, theirs in cases:
        config = theirs().config
        for option, value in ours(schedule).options.items():
            default = (inspect.signature(theirs.step).parameters[option].default if option == "eta"
                       else config[option])  # diffusers takes eta per step
            assert default == value, (ours.__name__, option)
    dpm = diffusers.DPMSolverMultistepScheduler().config
    assert (dpm.algorithm_type, dpm.solver_type, dpm.lower_order_final, dpm.final_sigmas_type,
            dpm.use_karras_sigmas, dpm.thresholding) == ("dpmsolver++", "midpoint", True, "zero", False, False)
    assert diffusers.DDIMScheduler().config.thresholding is False


def test_step_is_cheap_at_batch_64():
    """A step at batch 64 of 3x16x16 must be tiny next to a model call (~100 ms); ~0.2 ms here."""
    schedule = make_schedule("linear", 500)
    rng = np.random.default_rng(0)
    shape = (64, 3, 16, 16)
    x = rng.standard_normal(shape, dtype=np.float32)
    eps = rng.standard_normal(shape, dtype=np.float32)
    for name in SAMPLERS:
        sampler = make_sampler(name, schedule)
        sampler.set_timesteps(50)
        t = int(sampler.timesteps[0])
        noise = eps if sampler.needs_noise(t) else None

        def one_step():
            sampler.set_timesteps(50) if name == "dpmpp" else None
            sampler.step(eps, t, x, noise=noise)

        seconds = min(timeit.repeat(one_step, number=5, repeat=3)) / 5
        assert seconds < 0.01, f"{name}: {seconds * 1e3:.2f} ms per step"


# --- add_noise -----------------------------------------------------------------------


def test_add_noise_matches_forward_process_and_diffusers():
    schedule = make_schedule("cosine", 500)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE, dtype=np.float32)
    t = np.array([0, 499])
    x_t = add_noise(schedule, x0, eps, t)
    assert x_t.dtype == np.float32
    abar = schedule.alphas_cumprod[t][:, None, None, None]
    exact = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps  # Eq. 4 in float64
    np.testing.assert_allclose(x_t, exact, atol=1e-6)
    d = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")
    theirs = d.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(x_t, theirs, atol=1e-5)
    np.testing.assert_allclose(add_noise(schedule, x0, eps, 250), add_noise(schedule, x0, eps, np.array([250, 250])))


@pytest.mark.parametrize(
    "x0_shape,noise_shape,t,match",
    [
        ((2, 3), (2, 4), 0, "same shape"),
        ((2, 3), (2, 3), 500, r"0\.\.499"),
        ((2, 3), (2, 3), -1, r"0\.\.499"),
        ((2, 3), (2, 3), np.array([1, 2, 3]), "3 timesteps for a batch of 2"),
        ((2, 3), (2, 3), 1.5, "integer"),
    ],
)
def test_add_noise_rejects_bad_input(x0_shape, noise_shape, t, match):
    with pytest.raises(SamplerError, match=match):
        add_noise(make_schedule("linear", 500), np.zeros(x0_shape), np.zeros(noise_shape), t)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("ddim", {"eta": -0.1}, r"eta=-0\.1 must be a number in \[0\.0, 1\.0\]"),
        ("ddim", {"eta": 1.5}, "eta=1.5"),
        ("ddim", {"eta": float("nan")}, "eta=nan"),
        ("ddim", {"eta": "0.5"}, "eta='0.5'"),
        ("ddpm", {"variance_type": "learned"}, "variance_type='learned'.*fixed_small, fixed_large"),
        ("ddpm", {"prediction_type": "sample"}, "prediction_type='sample'.*epsilon, v_prediction"),
        ("dpmpp", {"timestep_spacing": "karras"}, "timestep_spacing='karras'.*leading, trailing, linspace"),
        ("ddpm", {"clip_sample": "yes"}, "clip_sample='yes' must be True or False"),
        ("ddpm", {"clip_sample_range": 0.0}, "clip_sample_range=0.0"),
        ("ddim", {"steps_offset": -1}, "steps_offset=-1"),
        ("ddim", {"set_alpha_to_one": 1}, "set_alpha_to_one=1"),
        ("dpmpp", {"solver_order": 3}, "solver_order=3 must be an integer between 1 and 2"),
        ("ddpm", {"eta": 0.5}, "unknown option.*eta.*'ddpm'.*allowed: prediction_type"),
        ("dpmpp", {"use_karras_sigmas": True}, "use_karras_sigmas"),
        ("euler", {}, "unknown sampler 'euler'; choose one of ddpm, ddim, dpmpp"),
    ],
)
def test_bad_options(name, options, match):
    with pytest.raises(SamplerError, match=match):
        make_sampler(name, make_schedule("linear", 500), **options)


def test_bad_schedule_argument():
    with pytest.raises(SamplerError, match="Schedule"):
        make_sampler("ddpm", {"kind": "linear"})


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("n", [0, -3, 501, 2.5, True, "10"])
def test_bad_step_counts(name, n):
    sampler = make_sampler(name, make_schedule("linear", 500))
    with pytest.raises(SamplerError, match="num_inference_steps"):
        sampler.set_timesteps(n)


def test_steps_offset_beyond_schedule():
    sampler = make_sampler("ddpm", make_schedule("linear", 500), steps_offset=1)
    with pytest.raises(SamplerError, match="timestep 500.*0..499.*steps_offset"):
        sampler.set_timesteps(500)


def test_step_misuse():
    schedule = make_schedule("linear", 500)
    x = np.zeros(SHAPE, dtype=np.float32)
    ddpm = make_sampler("ddpm", schedule)
    with pytest.raises(SamplerError, match="call set_timesteps"):
        ddpm.step(x, 499, x, noise=x)
    ddpm.set_timesteps(10)
    t = int(ddpm.timesteps[0])
    with pytest.raises(SamplerError, match="needs noise at timestep 450"):
        ddpm.step(x, t, x)
    with pytest.raises(SamplerError, match="draws no noise at timestep 0"):
        ddpm.step(x, 0, x, noise=x)
    with pytest.raises(SamplerError, match="timestep 449 is not one of"):
        ddpm.step(x, 449, x, noise=x)
    with pytest.raises(SamplerError, match="timestep must be an integer"):
        ddpm.step(x, 450.0, x, noise=x)
    with pytest.raises(SamplerError, match=r"model_output shape \(2, 3, 8, 4\) differs"):
        ddpm.step(x[..., :4], t, x, noise=x)
    with pytest.raises(SamplerError, match=r"sample must be \(B, C, H, W\)"):
        ddpm.step(x[0], t, x[0], noise=x[0])
    with pytest.raises(SamplerError, match=r"noise shape \(1, 3, 8, 8\) differs"):
        ddpm.step(x, t, x, noise=x[:1])
    ddim = make_sampler("ddim", schedule)
    ddim.set_timesteps(10)
    with pytest.raises(SamplerError, match="draws no noise"):
        ddim.step(x, 450, x, noise=x)
    ddim_eta = make_sampler("ddim", schedule, eta=1.0)
    ddim_eta.set_timesteps(10)
    with pytest.raises(SamplerError, match="needs noise"):
        ddim_eta.step(x, 0, x)
    dpm = make_sampler("dpmpp", schedule)
    dpm.set_timesteps(10)
    dpm.step(x, 499, x)
    with pytest.raises(SamplerError, match="expected 449, got 399"):
        dpm.step(x, 399, x)
    with pytest.raises(SamplerError, match="draws no noise"):
        dpm.step(x, 449, x, noise=x)
    dpm.step(x, 449, x)
    with pytest.raises(SamplerError, match="shape"):
        dpm.step(x[:1], 399, x[:1])


def test_lambda_min_clipped_cuts_the_noisiest_timesteps():
    """On the cosine schedule the clip moves the first timestep down to where lambda >= the clip."""
    schedule = make_schedule("cosine", T)
    plain, clipped = make_sampler("dpmpp", schedule), make_sampler("dpmpp", schedule, lambda_min_clipped=-3.0)
    plain.set_timesteps(20)
    clipped.set_timesteps(20)
    assert plain.timesteps[0] == T - 1
    abar = schedule.alphas_cumprod
    lam = 0.5 * np.log(abar / (1 - abar))
    first = int(clipped.timesteps[0])
    assert first < T - 1 and lam[first] >= -3.0
    assert (lam[first + 1:] < -3.0).any()
    with pytest.raises(SamplerError, match="lambda_min_clipped"):
        make_sampler("dpmpp", schedule, lambda_min_clipped=float("nan"))
    with pytest.raises(SamplerError, match="fewer than 2"):
        make_sampler("dpmpp", schedule, lambda_min_clipped=50.0).set_timesteps(5)
    with pytest.raises(SamplerError, match="trailing"):
        make_sampler("dpmpp", schedule, lambda_min_clipped=-3.0, timestep_spacing="trailing").set_timesteps(5)
