"""The sampling loop: conditioning, guidance, the random-number convention, parity with torch."""

from __future__ import annotations

import time

import numpy as np
import pytest

import runtime_helpers as h
from mdx.runtime.pipeline import Generation, PipelineError, build_context, generate, resolve_class
from mdx.runtime.samplers import SamplerError, make_sampler
from mdx.runtime.schedules import Schedule
from mdx.runtime.session import CPU, ModelInfo, OnnxDenoiser

PARITY_ATOL = 1e-3  # ONNX path vs torch reference, same seed; measured about 1e-6 on the tiny model


@pytest.fixture(scope="session")
def tiny():
    return h.cached_tiny()


@pytest.fixture(scope="session")
def denoiser(tiny):
    return OnnxDenoiser.load(tiny[1], provider=CPU, threads=1)  # one thread: a good neighbour on 2 cores


# --- a stand-in model: cheap, deterministic, and it records its calls --------------------


class FakeBinding:
    def __init__(self, batch, shape, K, calls):
        self.sample = np.zeros((batch, *shape), np.float32)
        self.timestep = np.zeros(batch, np.float32)
        self.context = np.zeros((batch, K), np.float32)
        self.out = np.zeros((batch, *shape), np.float32)
        self.calls = calls

    def run(self):
        self.calls.append((len(self.sample), float(self.timestep[0]), self.context.copy()))
        # eps depends on x, t and the context, so guidance changes the result
        np.multiply(self.sample, 0.3 + self.timestep[:, None, None, None] / 100, out=self.out)
        self.out += self.context.sum(1)[:, None, None, None] * 0.2
        return self.out


class FakeDenoiser:
    def __init__(self, K=3, C=3, H=16, T=50):
        self.info = ModelInfo(image_size=H, channels=C, class_names=tuple(f"c{i}" for i in range(K)),
                              schedule=Schedule("linear", T, 1e-4, 0.02), prediction_type="epsilon",
                              precision="fp32", recommended=None, path=None)
        self.calls = []
        self.bindings = {}

    def binding(self, batch):
        if batch not in self.bindings:
            self.bindings[batch] = FakeBinding(batch, self.info.sample_shape, self.info.num_classes, self.calls)
        return self.bindings[batch]

    def eps(self, x, t, c):
        return x * np.float32(0.3 + t / 100) + c.sum(1)[:, None, None, None].astype(np.float32) * np.float32(0.2)


def manual_loop(model: FakeDenoiser, sampler, steps, context, guidance, seed, **options):
    """The loop of docs/contract.md written out plainly, with two separate model calls for guidance."""
    info = model.info
    s = make_sampler(sampler, info.schedule, **options)
    s.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    n = len(context)
    x = rng.standard_normal((n, *info.sample_shape), dtype=np.float32)
    for t in s.timesteps:
        eps = model.eps(x, float(t), context)
        if guidance != 1.0:
            eps_u = model.eps(x, float(t), np.zeros_like(context))
            eps = eps_u + np.float32(guidance) * (eps - eps_u)
        z = rng.standard_normal(x.shape, dtype=np.float32) if s.needs_noise(t) else None
        x = s.step(eps, t, x, noise=z).prev_sample
    return np.clip(x, -1, 1)


# --- conditioning ---------------------------------------------------------------------

NAMES = ("apple", "ball", "cat")


def test_context_cycles_through_classes():
    context, labels = build_context(NAMES, None, False, 7)
    assert context.dtype == np.float32 and context.shape == (7, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    np.testing.assert_array_equal(context, np.eye(3, dtype=np.float32)[labels])


@pytest.mark.parametrize("given", [["ball"], [1], ["1"], ["ball", "ball"]])
def test_context_one_class(given):
    context, labels = build_context(NAMES, given, False, 4)
    np.testing.assert_array_equal(context, np.tile([0, 1, 0], (4, 1)).astype(np.float32))
    assert labels.tolist() == [1] * 4


def test_context_mix_is_multi_hot():
    context, labels = build_context(NAMES, ["cat", 0], False, 2)
    np.testing.assert_array_equal(context, [[1, 0, 1], [1, 0, 1]])
    assert labels.tolist() == [-1, -1]


def test_context_unconditional():
    context, labels = build_context(NAMES, None, True, 3)
    assert not context.any() and labels.tolist() == [-1, -1, -1]


def test_class_name_that_looks_like_a_number_wins():
    assert resolve_class(("7", "x"), "7") == 0
    assert resolve_class(("7", "x"), "1") == 1


@pytest.mark.parametrize("classes, unconditional, n, match", [
    (["dog"], False, 2, "unknown class 'dog'; the model's classes are apple, ball, cat"),
    ([3], False, 2, "class index 3 is out of range; use 0..2"),
    (["-1"], False, 2, "class index -1 is out of range"),
    ([1.5], False, 2, "a class is a name or an index"),
    (["ball"], True, 2, "not both"),
    (None, False, 0, "positive integer"),
    (None, False, -3, "positive integer"),
])
def test_context_errors(classes, unconditional, n, match):
    with pytest.raises(PipelineError, match=match):
        build_context(NAMES, classes, unconditional, n)


# --- the loop on the stand-in model ------------------------------------------------------


@pytest.mark.parametrize("sampler, steps, options", [
    ("ddim", 10, {}), ("ddim", 10, {"eta": 0.5}), ("ddpm", 50, {}), ("dpmpp", 12, {}),
])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_loop_follows_the_convention(sampler, steps, options, guidance):
    model = FakeDenoiser()
    context, _ = build_context(model.info.class_names, None, False, 5)
    got = generate(model, sampler=sampler, steps=steps, context=context, guidance=guidance, seed=3,
                   eta=options.get("eta", 0.0))
    want = manual_loop(model, sampler, steps, context, guidance, 3, **options)
    np.testing.assert_allclose(got.samples, want, atol=1e-6, rtol=0)
    assert got.samples.dtype == np.float32 and np.abs(got.samples).max() <= 1.0


def test_guidance_one_is_conditional_only():
    model = FakeDenoiser()
    context, _ = build_context(model.info.class_names, None, False, 4)
    generate(model, sampler="ddim", steps=5, context=context, guidance=1.0)
    assert [batch for batch, _, _ in model.calls] == [4] * 5  # one call of n per step, no extra work


def test_guidance_is_one_batched_call_per_step():
    model = FakeDenoiser()
    context, _ = build_context(model.info.class_names, None, False, 4)
    generate(model, sampler="ddim", steps=5, context=context, guidance=2.5)
    assert [batch for batch, _, _ in model.calls] == [8] * 5  # [cond; uncond] together
    for _, _, ctx in model.calls:
        np.testing.assert_array_equal(ctx[:4], context)
        assert not ctx[4:].any()  # the unconditional half is all zeros


def test_timesteps_fed_as_float_in_loop_order():
    model = FakeDenoiser()
    context, _ = build_context(model.info.class_names, None, False, 2)
    result = generate(model, sampler="ddim", steps=5, context=context)
    assert [t for _, t, _ in model.calls] == [float(t) for t in result.timesteps] == [40, 30, 20, 10, 0]


def test_same_seed_same_images_other_seed_other_images(denoiser):
    context, _ = build_context(denoiser.info.class_names, None, False, 3)
    a = generate(denoiser, sampler="ddpm", steps=10, context=context, seed=5).samples
    b = generate(denoiser, sampler="ddpm", steps=10, context=context, seed=5).samples
    c = generate(denoiser, sampler="ddpm", steps=10, context=context, seed=6).samples
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_record_x0_and_progress(denoiser):
    context, _ = build_context(denoiser.info.class_names, None, False, 3)
    seen = []
    result = generate(denoiser, sampler="ddim", steps=8, context=context, record_x0=True,
                      progress=lambda i, total: seen.append((i, total)))
    assert isinstance(result, Generation)
    assert seen == [(i, 8) for i in range(1, 9)]
    assert len(result.x0_frames) == 8
    assert all(f.shape == (3, 3, 16, 16) and f.dtype == np.float32 for f in result.x0_frames)
    assert len({id(f) for f in result.x0_frames}) == 8
    # DDIM's last step goes to abar = 1, where x_{t-1} is the (clipped) x_0 prediction itself.
    np.testing.assert_allclose(result.x0_frames[-1], result.samples, atol=1e-6)
    assert 0 < result.model_seconds <= result.total_seconds
    assert generate(denoiser, sampler="ddim", steps=2, context=context).x0_frames is None


@pytest.mark.parametrize("kwargs, error, match", [
    ({"steps": 0}, SamplerError, "num_inference_steps=0"),
    ({"steps": 51}, SamplerError, "num_inference_steps=51"),
    ({"guidance": -1.0}, PipelineError, "guidance must be a number >= 0"),
    ({"guidance": float("nan")}, PipelineError, "guidance"),
    ({"sampler": "ddpm", "eta": 0.5}, PipelineError, "eta applies to the ddim sampler only"),
    ({"eta": 1.5}, SamplerError, "eta=1.5"),
    ({"sampler": "euler"}, SamplerError, "unknown sampler 'euler'"),
    ({"seed": -1}, PipelineError, "seed"),
    ({"n": 4}, PipelineError, "n=4 but the context has 2 rows"),
    ({"context": np.zeros((2, 4), np.float32)}, PipelineError, r"context must have shape \(n, 3\)"),
])
def test_bad_requests(kwargs, error, match):
    model = FakeDenoiser()
    args = {"sampler": "ddim", "steps": 5, "context": np.eye(3, dtype=np.float32)[:2], **kwargs}
    with pytest.raises(error, match=match):
        generate(model, **args)


def test_loop_overhead_is_small_at_batch_64():
    """The numpy side of a step at batch 64 (sampler step, guidance mix, noise) against a model
    that costs nothing: a few hundred microseconds, next to a model call of ~100 ms on the CPU
    for the default model at that batch."""
    model = FakeDenoiser()
    context, _ = build_context(model.info.class_names, None, False, 64)
    for sampler, guidance in (("ddpm", 1.0), ("ddim", 3.0), ("dpmpp", 1.0)):
        per_step = []
        for _ in range(3):  # the best of three: the machine is shared
            start = time.perf_counter()
            result = generate(model, sampler=sampler, steps=20, context=context, guidance=guidance)
            per_step.append((time.perf_counter() - start) / 20)
        assert min(per_step) < 5e-3, f"{sampler}: {min(per_step) * 1e3:.2f} ms per step of loop overhead"
        assert result.samples.shape == (64, 3, 16, 16)


# --- parity with the torch reference sampler ---------------------------------------------


@pytest.mark.parametrize("sampler, steps, guidance, eta", [
    ("ddim", 25, 1.0, 0.0),
    ("ddpm", 50, 1.0, 0.0),
    ("ddim", 25, 3.0, 0.0),
    ("ddpm", 50, 2.0, 0.0),
    ("ddim", 25, 1.0, 0.5),
])
def test_onnx_path_equals_torch_path(tiny, denoiser, sampler, steps, guidance, eta):
    reference = pytest.importorskip("mdx.train.reference")
    context, _ = build_context(denoiser.info.class_names, None, False, 6)
    context[5] = [1, 0, 1]  # a mix too
    ours = generate(denoiser, sampler=sampler, steps=steps, context=context, guidance=guidance, eta=eta, seed=11)
    with h.torch_one_thread():
        theirs = reference.sample_reference(tiny[0], denoiser.info.schedule, sampler=sampler, steps=steps,
                                            context=context, seed=11, guidance=guidance, eta=eta)
    assert theirs.shape == ours.samples.shape
    assert np.abs(ours.samples - theirs).max() <= PARITY_ATOL


def test_onnx_path_equals_torch_path_v_prediction(tmp_path, tiny):
    reference = pytest.importorskip("mdx.train.reference")
    path = h.edit_metadata(tiny[1], tmp_path / "v.onnx", updates={"mdx.prediction_type": "v_prediction"})
    denoiser = OnnxDenoiser.load(path, provider=CPU, threads=1)
    context, _ = build_context(denoiser.info.class_names, None, False, 3)
    ours = generate(denoiser, sampler="ddim", steps=25, context=context, seed=2)
    with h.torch_one_thread():
        theirs = reference.sample_reference(tiny[0], denoiser.info.schedule, sampler="ddim", steps=25,
                                            context=context, seed=2, prediction_type="v_prediction")
    assert np.abs(ours.samples - theirs).max() <= PARITY_ATOL


def test_recommended_sampler_options_apply_per_sampler():
    """A model's mdx.recommended sampler_options (e.g. lambda_min_clipped for dpmpp on a cosine
    model) are used for that sampler when options are not given; explicit options win."""
    import dataclasses

    cosine = Schedule("cosine", 50)
    rec = {"sampler": "ddim", "steps": 10, "guidance": 1.0,
           "sampler_options": {"dpmpp": {"lambda_min_clipped": -3.0}, "ddim": {"clip_sample": False}}}
    model, plain = FakeDenoiser(T=50), FakeDenoiser(T=50)
    model.info = dataclasses.replace(model.info, schedule=cosine, recommended=rec)
    plain.info = dataclasses.replace(plain.info, schedule=cosine)
    context, _ = build_context(model.info.class_names, None, False, 3)

    expected = make_sampler("dpmpp", cosine, lambda_min_clipped=-3.0)
    expected.set_timesteps(10)
    got = generate(model, sampler="dpmpp", steps=10, context=context, seed=1)
    np.testing.assert_array_equal(got.timesteps, expected.timesteps)
    assert got.timesteps[0] < 49  # the clip moved the first step off T - 1
    explicit = generate(plain, sampler="dpmpp", steps=10, context=context, seed=1,
                        sampler_options={"lambda_min_clipped": -3.0})
    np.testing.assert_array_equal(got.samples, explicit.samples)
    overridden = generate(model, sampler="dpmpp", steps=10, context=context, seed=1, sampler_options={})
    assert overridden.timesteps[0] == 49
    ddim = generate(model, sampler="ddim", steps=10, context=context, seed=1)
    ddim_unclipped = generate(plain, sampler="ddim", steps=10, context=context, seed=1,
                              sampler_options={"clip_sample": False})
    ddim_default = generate(plain, sampler="ddim", steps=10, context=context, seed=1)
    np.testing.assert_array_equal(ddim.samples, ddim_unclipped.samples)
    assert not np.array_equal(ddim.samples, ddim_default.samples)
    # no options recommended for ddpm: its diffusers defaults
    np.testing.assert_array_equal(generate(model, sampler="ddpm", steps=10, context=context, seed=1).samples,
                                  generate(plain, sampler="ddpm", steps=10, context=context, seed=1).samples)
