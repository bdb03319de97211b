"""mdx.runtime.Pipeline and the shipped-file lookup, on the shipped emoji16 model (no torch).

The API must give exactly what mdx-sample gives for the same settings, reject every bad
input with one of the exceptions the commands turn into one line, and write the same files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import mdx.runtime
from mdx.runtime import shipped
from mdx.runtime.api import ERRORS, Output, Pipeline, conditioning
from mdx.runtime.cli import main as sample_main
from mdx.runtime.contract import ModelError
from mdx.runtime.images import OutputError
from mdx.runtime.pipeline import PipelineError
from mdx.runtime.samplers import SamplerError

FOOD = 3  # emoji16's classes: smileys, people, animals, food, ...


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load("emoji16", provider="CPUExecutionProvider", threads=1)


@pytest.fixture
def in_tmp(monkeypatch, tmp_path) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MDX_MODEL", raising=False)
    return tmp_path


def sample_cli(*args) -> None:
    result = CliRunner().invoke(sample_main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


# --- importing -----------------------------------------------------------------------------


def test_import_is_lazy():
    """`import mdx.runtime` (and the schedules, which torch code imports) loads no onnxruntime;
    the first use of Pipeline does."""
    code = ("import sys, mdx.runtime, mdx.runtime.schedules\n"
            "before = 'onnxruntime' in sys.modules\n"
            "from mdx.runtime import Pipeline\n"
            "Pipeline.load('emoji16', provider='CPUExecutionProvider', threads=1)\n"
            "print(before, 'onnxruntime' in sys.modules, 'Pipeline' in dir(mdx.runtime))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True", "True"]


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no attribute 'Pipe'"):
        mdx.runtime.Pipe  # noqa: B018


def test_py_typed_ships():
    assert (Path(mdx.runtime.__file__).parent / "py.typed").is_file()


# --- the shipped files ---------------------------------------------------------------------


def test_shipped_models():
    names = shipped.shipped_models()
    assert {"emoji16", "emoji16-int8"} <= set(names) and shipped.CLASSIFIER not in names
    assert shipped.resolve_model("emoji16") == shipped.models_dir() / "emoji16.onnx"
    assert shipped.resolve_model("emoji16-int8").name == "emoji16-int8.onnx"
    assert shipped.classifier_path().is_file()
    assert shipped.real_data_path().name == "emoji16.npz" and shipped.real_data_path().is_file()


def test_a_file_wins_over_a_name(in_tmp):
    (in_tmp / "emoji16").write_bytes(b"not a model")
    assert shipped.resolve_model("emoji16") == Path("emoji16")


@pytest.mark.parametrize("model, message", [
    ("emoji17", "unknown model 'emoji17': not a file, and not a shipped model (shipped: emoji16"),
    ("gone.onnx", "model file gone.onnx does not exist (shipped models, by name: emoji16"),
    ("sub/emoji16", "model file sub/emoji16 does not exist"),
    (".", "model path . is not a file"),
])
def test_bad_model_names(in_tmp, model, message):
    with pytest.raises(ModelError) as e:
        shipped.resolve_model(model)
    assert str(e.value).startswith(message)
    with pytest.raises(ModelError):
        Pipeline.load(model)


def test_default_model(in_tmp, monkeypatch):
    assert shipped.resolve_model(None) == shipped.models_dir() / "emoji16.onnx"
    monkeypatch.setenv("MDX_MODEL", "emoji16-int8")  # a shipped name
    assert shipped.resolve_model(None).name == "emoji16-int8.onnx"
    monkeypatch.setenv("MDX_MODEL", "gone.onnx")
    with pytest.raises(ModelError, match="MDX_MODEL points to gone.onnx, which does not exist"):
        shipped.resolve_model(None)


def test_local_models_folder_comes_before_the_shipped_model(in_tmp):
    (in_tmp / "models").mkdir()
    (in_tmp / "models" / "emoji16.onnx").write_bytes(b"x")
    assert shipped.resolve_model(None) == in_tmp / "models" / "emoji16.onnx"


def test_no_default_model(in_tmp, monkeypatch):
    empty = in_tmp / "empty"
    empty.mkdir()
    monkeypatch.setattr(shipped, "models_dir", lambda: empty)
    with pytest.raises(ModelError, match="no --model given and no default model found"):
        shipped.resolve_model(None)
    with pytest.raises(ModelError, match=r"not a shipped model \(shipped: none\)"):
        shipped.resolve_model("emoji16")


def test_real_data_is_the_training_set():
    """mdx-eval's real images are mdx.train's package data, found beside the models."""
    with np.load(shipped.real_data_path()) as data:
        assert {"images", "labels", "class_names"} <= set(data.files)
        assert [str(c) for c in data["class_names"]] == list(Pipeline.load("emoji16").class_names)


# --- the API equals mdx-sample -------------------------------------------------------------


def test_same_npz_as_mdx_sample(pipe, in_tmp):
    sample_cli("--model", "emoji16", "--threads", 1, "--provider", "CPUExecutionProvider", "--steps", 3,
               "--guidance", 2, "--class", "food", "-n", 3, "--seed", 7, "--out", "cli.npz")
    out = pipe(classes=["food"], n=3, steps=3, guidance=2.0, seed=7)
    out.save("api.npz")
    cli, api = npz_arrays(in_tmp / "cli.npz"), npz_arrays(in_tmp / "api.npz")
    assert sorted(cli) == sorted(api) == ["images", "labels", "samples"]
    for key in cli:
        assert cli[key].dtype == api[key].dtype and np.array_equal(cli[key], api[key]), key
    assert np.array_equal(api["images"], out.images) and (out.labels == FOOD).all()


def test_same_default_grid_as_mdx_sample(pipe, in_tmp):
    """No classes, no n: the grid of 2 images per class, and the model's recommended settings."""
    sample_cli("--model", shipped.resolve_model("emoji16"), "--threads", 1, "--provider", "CPUExecutionProvider",
               "--steps", 2, "--out", "cli.npz")
    out = pipe(steps=2)
    cli = npz_arrays(in_tmp / "cli.npz")
    assert np.array_equal(cli["samples"], out.samples) and np.array_equal(cli["labels"], out.labels)
    assert out.labels.tolist() == list(range(9)) * 2 and out.columns == 9
    rec = pipe.info.recommended
    s = out.settings
    assert (s.sampler, s.guidance, s.eta, s.n) == (rec["sampler"], rec["guidance"], 0.0, 18)
    assert s.sampler_options == rec["sampler_options"][rec["sampler"]] and s.classes == "all 9 classes"


def test_output_fields(pipe):
    out = pipe(classes="food", n=2, steps=2, seed=1)
    assert out.images.shape == (2, 16, 16, 3) and out.images.dtype == np.uint8
    assert out.samples.shape == (2, 3, 16, 16) and out.samples.dtype == np.float32
    assert out.samples.min() >= -1 and out.samples.max() <= 1
    assert out.provider == "CPUExecutionProvider" and out.model.name == "emoji16.onnx"
    assert out.timings.total_seconds >= out.timings.model_seconds > 0
    assert out.settings.steps == 2 and out.settings.seed == 1 and out.settings.classes == "class food"
    assert json.loads(json.dumps(out.settings.as_dict()))["steps"] == 2


# --- classes ---------------------------------------------------------------------------------


def test_names_indices_and_weights_agree(pipe):
    by_name = pipe(classes="food", n=2, steps=2)
    by_index = pipe(classes=[FOOD], n=2, steps=2)
    by_weights = pipe(classes=np.eye(9)[[FOOD, FOOD]], steps=2)
    by_row = pipe(classes=np.eye(9)[FOOD], n=2, steps=2)
    for other in (by_index, by_weights, by_row):
        assert np.array_equal(by_name.samples, other.samples)
        assert other.labels.tolist() == [FOOD, FOOD]


def test_mix_and_unconditional(pipe):
    mix = pipe(classes=["food", "animals"], n=2, steps=2)
    assert mix.labels.tolist() == [-1, -1] and mix.settings.classes == "class animals+food"
    assert mix.context[:, [2, FOOD]].tolist() == [[1, 1], [1, 1]] and mix.context.sum() == 4
    uncond = pipe(unconditional=True, n=2, steps=2)
    assert uncond.labels.tolist() == [-1, -1] and not uncond.context.any()
    zeros = pipe(classes=np.zeros(9), n=2, steps=2)
    assert np.array_equal(zeros.samples, uncond.samples)


def test_weight_rows_label_only_one_hot_rows():
    weights = np.array([[0, 1, 0], [0, 0.5, 0.5], [0, 2, 0], [0, 0, 0]])
    context, labels, what = conditioning(("a", "b", "c"), weights)
    assert labels.tolist() == [1, -1, -1, -1] and context.dtype == np.float32 and what == "class weights"


BAD_CALLS = {
    "unknown class": (dict(classes="pizza"), PipelineError, "unknown class 'pizza'; the model's classes are smileys"),
    "index out of range": (dict(classes=9), PipelineError, "class index 9 is out of range; use 0..8"),
    "negative index": (dict(classes=[-1]), PipelineError, "class index -1 is out of range"),
    "bool class": (dict(classes=[True]), PipelineError, "a class is a name or an index, got True"),
    "float in a list": (dict(classes=[0.5, 0.5]), PipelineError, "give class weights as a numpy array"),
    "nested list": (dict(classes=[[1, 0]]), PipelineError, "a class is a name or an index"),
    "a dict": (dict(classes={"food": 1}), PipelineError, "classes must be a name, an index, a list"),
    "weights wrong K": (dict(classes=np.ones(10)), PipelineError, "must have shape (9,) or (n, 9)"),
    "weights wrong K 2-D": (dict(classes=np.ones((2, 8))), PipelineError, "got (2, 8)"),
    "weights 3-D": (dict(classes=np.ones((1, 2, 9))), PipelineError, "must have shape (9,) or (n, 9)"),
    "weights no rows": (dict(classes=np.ones((0, 9))), PipelineError, "got (0, 9)"),
    "weights negative": (dict(classes=-np.eye(9)[0]), PipelineError, "finite and >= 0"),
    "weights nan": (dict(classes=np.full(9, np.nan)), PipelineError, "finite and >= 0"),
    "weights strings": (dict(classes=np.array(["food"] * 9)), PipelineError, "must be numbers"),
    "weights rows vs n": (dict(classes=np.eye(9)[:2], n=3), PipelineError, "n=3 but the class weights have 2 rows"),
    "classes and unconditional": (dict(classes="food", unconditional=True), PipelineError, "not both"),
    "weights and unconditional": (dict(classes=np.eye(9)[0], unconditional=True), PipelineError, "not both"),
    "n zero": (dict(n=0), PipelineError, "n must be an integer >= 1"),
    "n negative": (dict(n=-2), PipelineError, "got -2"),
    "n float": (dict(n=2.5), PipelineError, "got 2.5"),
    "n bool": (dict(n=True), PipelineError, "got True"),
    "steps zero": (dict(steps=0), PipelineError, "steps must be an integer >= 1"),
    "steps float": (dict(steps=2.0), PipelineError, "got 2.0"),
    "steps over T": (dict(steps=10_000), SamplerError, "10000"),
    "guidance negative": (dict(guidance=-1), PipelineError, "guidance must be a number >= 0"),
    "guidance nan": (dict(guidance=float("nan")), PipelineError, "got nan"),
    "guidance string": (dict(guidance="5"), PipelineError, "got '5'"),
    "seed negative": (dict(seed=-1), PipelineError, "seed must be an integer >= 0"),
    "seed float": (dict(seed=1.5), PipelineError, "got 1.5"),
    "unknown sampler": (dict(sampler="euler"), SamplerError, "unknown sampler 'euler'"),
    "eta with dpmpp": (dict(sampler="dpmpp", eta=0.5), PipelineError, "eta applies to the ddim sampler only"),
    "eta out of range": (dict(sampler="ddim", eta=2.0), SamplerError, "eta"),
    "eta string": (dict(eta="0.5"), PipelineError, "eta must be a number"),
    "unknown option": (dict(sampler_options={"bogus": 1}), SamplerError, "unknown option(s) bogus"),
    "options not a dict": (dict(sampler_options="bogus"), PipelineError, "sampler_options must be a dict"),
    "callback not callable": (dict(callback=3), PipelineError, "callback must be callable"),
}


@pytest.mark.parametrize("kwargs, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_calls(pipe, kwargs, error, message):
    with pytest.raises(error) as e:
        pipe(**{"steps": 2, "n": 2, **kwargs})
    assert isinstance(e.value, ERRORS) and message in str(e.value)


@pytest.mark.parametrize("options, message", [
    (dict(provider="NoSuchExecutionProvider"), "unknown provider 'NoSuchExecutionProvider'"),
    (dict(threads=0), "threads must be a positive integer"),
    (dict(overrides={"colour": 1}), "unknown override(s) colour"),
])
def test_bad_load_options(options, message):
    with pytest.raises(ModelError) as e:
        Pipeline.load("emoji16", **options)
    assert message in str(e.value)


# --- saving ----------------------------------------------------------------------------------


def test_save_formats(pipe, in_tmp):
    out = pipe(classes=["food", "animals"], n=4, steps=2)
    assert out.save("grid.png") == Path("grid.png")
    with Image.open("grid.png") as im:  # 2 x 2 tiles of 16 px with 1 px gaps, x4
        assert im.size == ((2 * 17 + 1) * 4, (2 * 17 + 1) * 4)
    out.save("small.png", scale=1)
    with Image.open("small.png") as im:
        assert im.size == (2 * 17 + 1, 2 * 17 + 1)
    out.save("folder")
    assert sorted(p.name for p in (in_tmp / "folder").iterdir()) == [f"000{i}_mix.png" for i in range(4)]
    with Image.open(in_tmp / "folder" / "0002_mix.png") as im:  # native size
        assert np.array_equal(np.asarray(im), out.images[2])
    pipe(unconditional=True, n=1, steps=2).save("u/")
    pipe(classes="food", n=1, steps=2).save("f/")
    assert [p.name for p in (in_tmp / "u").iterdir()] == ["0000_uncond.png"]
    assert [p.name for p in (in_tmp / "f").iterdir()] == ["0000_food.png"]


@pytest.mark.parametrize("path, error, message", [
    ("out.jpg", OutputError, "cannot tell what to write to out.jpg"),
    ("nowhere/s.png", OutputError, "folder nowhere does not exist"),
    ("afolder", OutputError, "it exists and is not a folder"),
])
def test_bad_save_paths(pipe, in_tmp, path, error, message):
    (in_tmp / "afolder").write_text("a file")
    out = pipe(n=1, steps=2)
    before = sorted(p.name for p in in_tmp.iterdir())
    with pytest.raises(error, match=message):
        out.save(path)
    with pytest.raises(OutputError, match="scale must be an integer >= 1"):
        out.save("ok.png", scale=0)
    assert sorted(p.name for p in in_tmp.iterdir()) == before


def test_gif(pipe, in_tmp):
    with pytest.raises(PipelineError, match="record_x0=True"):
        pipe(n=1, steps=2).save_gif("a.gif")
    out = pipe(n=2, steps=3, record_x0=True)
    assert len(out.x0_frames) == 3
    with pytest.raises(OutputError, match="must end in .gif"):
        out.save_gif("a.png")
    out.save_gif("a.gif", scale=1)
    with Image.open("a.gif") as im:
        # 3 steps, then the final samples held (Pillow merges the last step into it when they are equal)
        assert im.n_frames in (3, 4) and im.size == (2 * 17 + 1, 17 + 1)


# --- the callback ----------------------------------------------------------------------------


def test_callback_sees_every_step(pipe):
    seen = []
    out = pipe(classes="food", n=2, steps=4, record_x0=True,
               callback=lambda step, total, x0: seen.append((step, total, x0.copy())))
    assert [(s, t) for s, t, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for (_, _, x0), frame in zip(seen, out.x0_frames):
        assert x0.shape == (2, 3, 16, 16) and np.array_equal(x0, frame)


def test_callback_can_stop_sampling(pipe):
    class Stop(Exception):
        pass

    def stop(step, total, x0):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        pipe(n=1, steps=4, callback=stop)


def test_request_checks_before_sampling_and_run_samples_it(pipe):
    calls = []
    request = pipe.request(classes="food", n=2, steps=3, seed=4)
    assert request.settings.n == 2 and request.labels.tolist() == [FOOD, FOOD]
    out = pipe.run(request, callback=lambda *a: calls.append(a[0]))
    assert calls == [1, 2, 3] and np.array_equal(out.samples, pipe(classes="food", n=2, steps=3, seed=4).samples)
    with pytest.raises(SamplerError):
        pipe.request(sampler="ddim", steps=2, sampler_options={"bogus": 1})


def test_output_is_a_dataclass_of_arrays(pipe):
    out = pipe(n=1, steps=2)
    assert isinstance(out, Output) and out.images is out.images  # converted once


# --- mdx-eval on the same lookup and the same sampling -------------------------------------


def test_eval_uses_the_shipped_files_and_the_pipeline(pipe):
    from mdx.runtime import evaluate

    assert evaluate.DEFAULT_CLASSIFIER == shipped.classifier_path()
    assert evaluate.DEFAULT_REAL == shipped.real_data_path()
    images, labels, settings = evaluate.sample_with_model("emoji16", sampler=None, steps=2, guidance=None, eta=0.0,
                                                          seed=3, n=9, provider="CPUExecutionProvider", threads=1)
    out = pipe(n=9, steps=2, seed=3)
    assert np.array_equal(images, out.images) and np.array_equal(labels, out.labels)
    assert settings["sampler"] == out.settings.sampler and settings["model"].endswith("emoji16.onnx")
