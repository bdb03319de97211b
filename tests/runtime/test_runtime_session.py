"""OnnxDenoiser: loading, metadata, overrides, providers, input checks, reused buffers."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import runtime_helpers as h
from mdx.runtime.schedules import Schedule
from mdx.runtime import providers
from mdx.runtime.session import CPU, CUDA, OPENVINO, ModelError, ModelInfo, OnnxDenoiser, usable_providers


@pytest.fixture(scope="session")
def tiny():
    return h.cached_tiny()  # (torch model, path)


@pytest.fixture(scope="session")
def denoiser(tiny):
    return OnnxDenoiser.load(tiny[1], provider=CPU, threads=1)


def _cuda_works(path) -> bool:
    return CUDA in usable_providers(path)


def _inputs(n=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 16, 16), dtype=np.float32)
    t = np.arange(n, dtype=np.float32) * 9  # 0, 9, 18 ... < T = 50
    c = np.eye(3, dtype=np.float32)[np.arange(n) % 3]
    return x, t, c


# --- metadata -------------------------------------------------------------------------


def test_info_from_metadata(denoiser, tiny):
    info = denoiser.info
    assert isinstance(info, ModelInfo)
    assert info.image_size == 16 and info.channels == 3
    assert info.class_names == tuple(h.TINY_CLASSES) and info.num_classes == 3
    assert info.schedule == Schedule.from_dict(h.TINY_SCHEDULE)
    assert info.prediction_type == "epsilon" and info.precision == "fp32"
    assert info.recommended is None
    assert info.path == tiny[1] and info.sample_shape == (3, 16, 16)
    with pytest.raises(AttributeError):
        info.image_size = 8  # frozen


def test_recommended_metadata(tmp_path, tiny):
    rec = {"sampler": "dpmpp", "steps": 20, "guidance": 2.0}
    path = h.edit_metadata(tiny[1], tmp_path / "rec.onnx", updates={"mdx.recommended": json.dumps(rec)})
    assert OnnxDenoiser.load(path, provider=CPU).info.recommended == rec


def test_missing_metadata_names_keys_and_options(tmp_path, tiny):
    bare = h.edit_metadata(tiny[1], tmp_path / "bare.onnx")
    with pytest.raises(ModelError) as e:
        OnnxDenoiser.load(bare, provider=CPU)
    msg = str(e.value)
    for needed in ("mdx.schedule", "mdx.classes", "--timesteps", "--schedule", "--beta-start", "--beta-end",
                   "--classes"):
        assert needed in msg
    # Image size and channels come from the graph's fixed input shape, so they are not missing.
    assert "mdx.image_size" not in msg and "mdx.channels" not in msg


def test_overrides_supply_missing_metadata(tmp_path, tiny):
    bare = h.edit_metadata(tiny[1], tmp_path / "bare.onnx")
    d = OnnxDenoiser.load(bare, provider=CPU, overrides={"timesteps": 50, "classes": 3})
    assert d.info.schedule == Schedule("linear", 50, 1e-4, 0.02)
    assert d.info.class_names == ("0", "1", "2")
    assert d.info.image_size == 16 and d.info.channels == 3
    assert d.info.prediction_type == "epsilon" and d.info.precision == "fp32"
    d = OnnxDenoiser.load(bare, provider=CPU, overrides={
        "timesteps": 50, "schedule": "cosine", "classes": ["a", "b", "c"], "prediction_type": "v_prediction"})
    assert d.info.schedule.kind == "cosine" and d.info.class_names == ("a", "b", "c")
    assert d.info.prediction_type == "v_prediction"


@pytest.mark.parametrize("overrides, match", [
    ({"timesteps": 50, "classes": 4}, "number of classes is 4"),
    ({"timesteps": 50, "classes": 3, "image_size": 8}, "image size is 8"),
    ({"timesteps": 1, "classes": 3}, "timesteps must be an integer >= 2"),
    ({"timesteps": 50, "classes": ["a", "a", "b"]}, "repeats a class name"),
    ({"timesteps": 50, "classes": 3, "prediction_type": "x0"}, "prediction type 'x0'"),
    ({"steps": 3}, "unknown override"),
])
def test_bad_overrides(tmp_path, tiny, overrides, match):
    bare = h.edit_metadata(tiny[1], tmp_path / "bare.onnx")
    with pytest.raises(ModelError, match=match):
        OnnxDenoiser.load(bare, provider=CPU, overrides=overrides)


@pytest.mark.parametrize("updates, match", [
    ({"mdx.schedule": "{not json"}, "mdx.schedule is not valid JSON"),
    ({"mdx.schedule": json.dumps({"kind": "zigzag", "num_train_timesteps": 50,
                                  "beta_start": 1e-4, "beta_end": 0.02})}, "unknown schedule 'zigzag'"),
    ({"mdx.classes": "[]"}, "mdx.classes must be a non-empty list"),
    ({"mdx.image_size": "32"}, "image size is 32"),
    ({"mdx.format": "2"}, "format"),
    ({"mdx.precision": "fp8"}, "mdx.precision"),
])
def test_bad_metadata(tmp_path, tiny, updates, match):
    path = h.edit_metadata(tiny[1], tmp_path / "bad.onnx", updates=updates)
    with pytest.raises(ModelError, match=match):
        OnnxDenoiser.load(path, provider=CPU)


# --- files ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        OnnxDenoiser.load(tmp_path / "nope.onnx")


def test_not_onnx(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a model\n")
    with pytest.raises(ModelError, match="not an ONNX model"):
        OnnxDenoiser.load(junk, provider=CPU)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="not a file"):
        OnnxDenoiser.load(tmp_path)


def test_wrong_signature(tmp_path):
    path = h.write_wrong_signature_model(tmp_path / "identity.onnx")
    with pytest.raises(ModelError, match="does not follow the mdx model contract"):
        OnnxDenoiser.load(path, provider=CPU)


# --- providers ------------------------------------------------------------------------


def test_auto_says_which_provider_runs(tiny):
    d = OnnxDenoiser.load(tiny[1], provider="auto")
    assert d.provider == d.session.get_providers()[0]
    prefer_openvino, _ = providers.auto_prefers_openvino(providers.cpu_isa())
    assert d.provider in (CPU, CUDA, OPENVINO)
    if d.provider == OPENVINO:  # only where the rule says so: an Intel CPU with AVX-512
        assert prefer_openvino
    if d.provider == CPU and CUDA in ort.get_available_providers():
        assert any("CUDA did not start" in note for note in d.notes)


def test_unknown_provider_lists_usable(tiny):
    with pytest.raises(ModelError, match=r"unknown provider 'NoSuchExecutionProvider'; usable here: auto, .*CPUExecutionProvider"):
        OnnxDenoiser.load(tiny[1], provider="NoSuchExecutionProvider")


def test_provider_not_in_build(tiny):
    missing = [p for p in ort.get_all_providers() if p not in ort.get_available_providers()]
    if not missing:
        pytest.skip("this onnxruntime build has every provider")
    with pytest.raises(ModelError, match=f"provider {missing[0]} is not in this onnxruntime build; usable here"):
        OnnxDenoiser.load(tiny[1], provider=missing[0])


def test_named_provider_that_falls_back_is_an_error(tiny):
    if CUDA not in ort.get_available_providers() or _cuda_works(tiny[1]):
        pytest.skip("needs onnxruntime-gpu on a machine where CUDA cannot start")
    with pytest.raises(ModelError, match="did not start .*fell back to CPUExecutionProvider.*usable here: auto, CPUExecutionProvider"):
        OnnxDenoiser.load(tiny[1], provider=CUDA)


def test_cuda_graph_needs_cuda(tiny):
    with pytest.raises(ModelError, match="--cuda-graph needs the CUDA provider"):
        OnnxDenoiser.load(tiny[1], provider=CPU, cuda_graph=True)


@pytest.mark.parametrize("threads", [0, -1, 1.5])
def test_bad_threads(tiny, threads):
    with pytest.raises(ModelError, match="threads"):
        OnnxDenoiser.load(tiny[1], provider=CPU, threads=threads)


def test_threads(tiny):
    d = OnnxDenoiser.load(tiny[1], provider=CPU, threads=1)
    assert d.session.get_session_options().intra_op_num_threads == 1


# --- calls ----------------------------------------------------------------------------


def test_call_matches_torch(denoiser, tiny):
    x, t, c = _inputs()
    out = denoiser(x, t, c)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, h.torch_forward(tiny[0], x, t, c), atol=1e-5, rtol=0)


def test_scalar_timestep_broadcasts(denoiser):
    x, _, c = _inputs(3)
    np.testing.assert_array_equal(denoiser(x, 7, c), denoiser(x, np.full(3, 7, np.float32), c))


def test_feeds_buffers_follow_in_place_updates(tiny):
    """The "feeds" mode (providers other than CPU and CUDA, e.g. OpenVINO) reads the host
    buffers at every run, so a reused binding sees each new batch and matches the bound mode."""
    fed = OnnxDenoiser.load(tiny[1], provider=CPU, threads=1)
    fed._device = "feeds"  # what OnnxDenoiser picks for a provider that is neither CPU nor CUDA
    bound = OnnxDenoiser.load(tiny[1], provider=CPU, threads=1)
    for seed in (0, 1, 2):  # one binding per denoiser, refilled in place three times
        x, t, c = _inputs(4, seed)
        got = fed(x, t, c)
        np.testing.assert_allclose(got, bound(x, t, c), atol=1e-6, rtol=0)
        np.testing.assert_allclose(got, h.torch_forward(tiny[0], x, t, c), atol=1e-5, rtol=0)
    assert fed.binding(4) is fed.binding(4)


def test_call_returns_fresh_arrays(denoiser):
    x, t, c = _inputs(2)
    a = denoiser(x, t, c)
    b = denoiser(-x, t, c)
    assert not np.shares_memory(a, b) and not np.array_equal(a, b)


@pytest.mark.parametrize("what, args, match", [
    ("sample shape", ((2, 3, 8, 8), (2,), (2, 3)), "sample must have shape"),
    ("context rows", ((2, 3, 16, 16), (2,), (3, 3)), "context must have shape"),
    ("context width", ((2, 3, 16, 16), (2,), (2, 4)), "context must have shape"),
    ("timestep shape", ((2, 3, 16, 16), (3,), (2, 3)), "timestep must be a scalar"),
])
def test_call_checks_inputs(denoiser, what, args, match):
    shapes = args
    with pytest.raises(ModelError, match=match):
        denoiser(np.zeros(shapes[0], np.float32), np.zeros(shapes[1], np.float32), np.zeros(shapes[2], np.float32))


def test_call_checks_timestep_range(denoiser):
    x, _, c = _inputs(2)
    with pytest.raises(ModelError, match=r"timestep must lie in 0..49"):
        denoiser(x, 50, c)


def test_binding_reuses_its_buffers(denoiser, tiny):
    x, t, c = _inputs(4)
    bound = denoiser.binding(4)
    assert denoiser.binding(4) is bound  # cached per batch size
    bound.sample[...] = x
    bound.timestep[...] = t
    bound.context[...] = c
    first = bound.run()
    np.testing.assert_allclose(first, h.torch_forward(tiny[0], x, t, c), atol=1e-5, rtol=0)
    bound.sample[...] = -x
    second = bound.run()
    assert second is first  # the same output buffer, overwritten in place
    np.testing.assert_allclose(second, h.torch_forward(tiny[0], -x, t, c), atol=1e-5, rtol=0)


def test_bad_batch(denoiser):
    with pytest.raises(ModelError, match="batch must be a positive integer"):
        denoiser.binding(0)
