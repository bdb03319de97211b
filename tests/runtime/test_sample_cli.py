"""mdx-sample end to end on a tiny exported model: outputs, defaults, and every bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

import runtime_helpers as h
from mdx.runtime import api, cli, images
from mdx.runtime.cli import main

FAST = ["--threads", "1", "--steps", "4"]


@pytest.fixture(scope="session")
def model_path():
    return h.cached_tiny()[1]


@pytest.fixture
def run(monkeypatch, tmp_path):
    """Run mdx-sample in an empty working folder; returns the click Result."""
    return h.cli_invoker(main, monkeypatch, tmp_path)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


SUMMARY = re.compile(r"^(\d+) images in [\d.]+ s \([\d.]+ img/s\), \d+% in the model, provider \w+ExecutionProvider$")


# --- outputs --------------------------------------------------------------------------


def test_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--model", "--sampler", "--steps", "--eta", "--guidance", "--class", "--unconditional", "--seed",
                   "-n", "--provider", "--threads", "--cuda-graph", "--out", "--gif", "--scale", "--telemetry",
                   "--timesteps", "--schedule", "--beta-start", "--beta-end", "--classes"):
        assert option in result.output


def test_default_png_grid(run, model_path, tmp_path):
    result = run("--model", model_path, *FAST)
    assert result.exit_code == 0, result.output
    # Default n = 2 per class = 6, one class per column: 3 columns x 2 rows of 16 px + 1 px gaps, x4.
    with Image.open(tmp_path / "samples.png") as im:
        assert im.size == ((3 * 17 + 1) * 4, (2 * 17 + 1) * 4) and im.mode == "RGB"
    last = result.stdout.strip().splitlines()[-1]
    ran = h.auto_provider(model_path)  # --provider auto: the CPU provider, or OpenVINO on Intel AVX-512
    assert SUMMARY.match(last) and last.startswith("6 images") and last.endswith(f"provider {ran}")
    assert "all 3 classes" in result.stderr and f"on {ran}" in result.stderr


def test_png_scale(run, model_path, tmp_path):
    assert run("--model", model_path, *FAST, "-n", 2, "--scale", 1, "--out", "g.png").exit_code == 0
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (2 * 17 + 1, 17 + 1)


def test_npz(run, model_path, tmp_path):
    result = run("--model", model_path, *FAST, "-n", 4, "--class", "ball", "--out", "s.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s.npz") as data:
        assert sorted(data.files) == ["images", "labels", "samples"]
        imgs, labels, samples = data["images"], data["labels"], data["samples"]
    assert imgs.dtype == np.uint8 and imgs.shape == (4, 16, 16, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 1, 1, 1]
    assert samples.dtype == np.float32 and samples.shape == (4, 3, 16, 16)
    assert samples.min() >= -1 and samples.max() <= 1
    np.testing.assert_array_equal(imgs, images.to_uint8(samples))


def test_npz_labels_for_mix_and_cycle(run, model_path, tmp_path):
    assert run("--model", model_path, *FAST, "-n", 2, "--class", "apple", "--class", "2", "--out", "m.npz").exit_code == 0
    assert np.load(tmp_path / "m.npz")["labels"].tolist() == [-1, -1]
    assert run("--model", model_path, *FAST, "-n", 4, "--out", "c.npz").exit_code == 0
    assert np.load(tmp_path / "c.npz")["labels"].tolist() == [0, 1, 2, 0]
    assert run("--model", model_path, *FAST, "-n", 2, "--unconditional", "--out", "u.npz").exit_code == 0
    assert np.load(tmp_path / "u.npz")["labels"].tolist() == [-1, -1]


def test_same_seed_same_npz(run, model_path, tmp_path):
    for name in ("a.npz", "b.npz"):
        assert run("--model", model_path, *FAST, "-n", 2, "--seed", 9, "--out", name).exit_code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["samples"], np.load(tmp_path / "b.npz")["samples"])


@pytest.mark.parametrize("out", ["pngs", "pngs/", "existing"])
def test_folder(run, model_path, tmp_path, out):
    (tmp_path / "existing").mkdir()
    result = run("--model", model_path, *FAST, "-n", 3, "--out", out)
    assert result.exit_code == 0, result.output
    folder = tmp_path / out.rstrip("/")
    assert files_under(folder) == ["0000_apple.png", "0001_ball.png", "0002_cat.png"]
    with Image.open(folder / "0001_ball.png") as im:
        assert im.size == (16, 16)
    assert files_under(tmp_path) == sorted(["existing", *[f"{out.rstrip('/')}/{n}" for n in files_under(folder)],
                                            *([out.rstrip("/")] if out != "existing" else [])])


def test_gif(run, model_path, tmp_path):
    result = run("--model", model_path, "--threads", 1, "--steps", 6, "-n", 3, "--out", "s.png", "--gif", "d.gif")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "d.gif") as im:
        # One x_0 prediction per step, then the final samples held; DDIM's last x_0 is the final
        # image, and Pillow merges identical consecutive frames.
        assert im.n_frames in (6, 7)
        assert im.size == ((3 * 17 + 1) * 4, 18 * 4)


def test_guidance_and_samplers(run, model_path, tmp_path):
    for sampler in ("ddpm", "ddim", "dpmpp"):
        result = run("--model", model_path, *FAST, "-n", 2, "--sampler", sampler, "--guidance", 3, "--out", f"{sampler}.npz")
        assert result.exit_code == 0, result.output
        assert f"{sampler} 4 steps, guidance 3" in result.stderr


def test_recommended_metadata_sets_defaults(run, model_path, tmp_path):
    rec = {"sampler": "dpmpp", "steps": 7, "guidance": 2.0}
    path = h.edit_metadata(model_path, tmp_path / "rec.onnx", updates={"mdx.recommended": json.dumps(rec)})
    result = run("--model", path, "--threads", 1, "-n", 1, "--out", "r.npz")
    assert result.exit_code == 0, result.output
    assert "dpmpp 7 steps, guidance 2" in result.stderr
    result = run("--model", path, "--threads", 1, "-n", 1, "--sampler", "ddim", "--steps", 3, "--guidance", 1,
                 "--out", "r.npz")
    assert "ddim 3 steps, guidance 1" in result.stderr  # the command line wins


def test_fallback_defaults(run, model_path):
    result = run("--model", model_path, "--threads", 1, "-n", 1, "--out", "f.npz")
    assert result.exit_code == 0 and "ddim 25 steps, guidance 1" in result.stderr


def test_foreign_model_with_options(run, model_path, tmp_path):
    bare = h.edit_metadata(model_path, tmp_path / "bare.onnx")
    result = run("--model", bare, *FAST, "--timesteps", 50, "--classes", "x,y,z", "--class", "y", "-n", 2, "--out", "f.npz")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "f.npz")["labels"].tolist() == [1, 1]


def test_model_from_environment(run, model_path, monkeypatch, tmp_path):
    monkeypatch.setenv("MDX_MODEL", str(model_path))
    result = run(*FAST, "-n", 1)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "samples.png").exists()


def test_default_model_in_working_folder(run, model_path, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "emoji16.onnx").write_bytes(Path(model_path).read_bytes())
    assert run(*FAST, "-n", 1).exit_code == 0


def test_telemetry(run, model_path, tmp_path):
    result = run("--model", model_path, *FAST, "-n", 1, "--telemetry", "t.csv")
    assert result.exit_code == 0, result.output
    if "telemetry off" in result.stderr:
        assert not (tmp_path / "t.csv").exists()
        assert re.search(r"telemetry off: (nvidia-ml-py is not installed|no NVIDIA GPU or driver|NVML failed)", result.stderr)
    else:
        header = (tmp_path / "t.csv").read_text().splitlines()[0]
        assert header.startswith("time_s,gpu_util_pct")


def test_progress_bar():
    import io

    stream = io.StringIO()
    progress = cli.Progress("sampling", stream=stream, enabled=True, width=10)
    for i in range(1, 5):
        progress(i, 4)
    text = stream.getvalue()
    assert "\rsampling [#####.....] 2/4" in text and "[##########] 4/4" in text and text.endswith("\n")
    quiet = io.StringIO()
    cli.Progress("sampling", stream=quiet)(1, 4)  # not a terminal: silent
    assert quiet.getvalue() == ""


# --- bad input: one line, exit code 2, no traceback, nothing written ------------------------

BAD = {
    "steps zero": (["--steps", "0"], "--steps 0: need at least 1 step"),
    "steps above T": (["--steps", "51"], "--steps 51 is more than the model's 50 training timesteps"),
    "steps not a number": (["--steps", "many"], "Invalid value for '--steps'"),
    "unknown class name": (["--class", "dog"], "unknown class 'dog'; the model's classes are apple, ball, cat"),
    "unknown class index": (["--class", "3"], "class index 3 is out of range"),
    "n zero": (["-n", "0"], "-n 0: the number of images must be at least 1"),
    "n negative": (["-n", "-4"], "-n -4"),
    "negative guidance": (["--guidance", "-1"], "--guidance -1.0: the guidance scale must be >= 0"),
    "unknown provider": (["--provider", "FooExecutionProvider"], "unknown provider 'FooExecutionProvider'; usable here: auto"),
    "unknown sampler": (["--sampler", "euler"], "Invalid value for '--sampler'"),
    "eta for ddpm": (["--sampler", "ddpm", "--eta", "0.5"], "eta applies to the ddim sampler only"),
    "eta too large": (["--eta", "2"], "eta=2.0"),
    "class and unconditional": (["--class", "ball", "--unconditional"], "exclude each other"),
    "bad seed": (["--seed", "-1"], "--seed -1"),
    "bad scale": (["--scale", "0"], "--scale 0"),
    "bad threads": (["--threads", "0"], "--threads 0"),
    "unknown option": (["--colour"], "No such option"),
    "output folder missing": (["--out", "nowhere/s.png"], "cannot write nowhere/s.png: folder nowhere does not exist"),
    "output under a file": (["--out", "afile/s.png"], "cannot write afile/s.png: folder afile does not exist"),
    "output kind unknown": (["--out", "s.jpg"], "cannot tell what to write to s.jpg"),
    "output folder is a file": (["--out", "afile"], "cannot write images into afile: it exists and is not a folder"),
    "gif extension": (["--gif", "anim.mp4"], "--gif anim.mp4: the animation file must end in .gif"),
    "gif folder missing": (["--gif", "nowhere/a.gif"], "folder nowhere does not exist"),
    "cuda graph on cpu": (["--provider", "CPUExecutionProvider", "--cuda-graph"], "--cuda-graph needs the CUDA provider"),
    "bad classes option": (["--classes", "a,,b"], "--classes"),
}


def assert_clean_failure(result, tmp_path, before, expected, one_line=True):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()[-1:] if not one_line else result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mdx-sample: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert files_under(tmp_path) == before  # nothing written


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(run, model_path, tmp_path, name):
    args, expected = BAD[name]
    (tmp_path / "afile").write_text("x")
    before = files_under(tmp_path)
    extra = [] if "--threads" in args else ["--threads", "1"]
    result = run("--model", model_path, *extra, *args)
    assert_clean_failure(result, tmp_path, before, expected)


def test_provider_not_in_build(run, model_path, tmp_path):
    missing = [p for p in ort.get_all_providers() if p not in ort.get_available_providers()]
    if not missing:
        pytest.skip("this onnxruntime build has every provider")
    result = run("--model", model_path, "--provider", missing[0])
    assert_clean_failure(result, tmp_path, [], f"provider {missing[0]} is not in this onnxruntime build")


def test_provider_that_cannot_start(run, model_path, tmp_path):
    from mdx.runtime.session import CUDA, usable_providers

    if CUDA not in ort.get_available_providers() or CUDA in usable_providers(model_path):
        pytest.skip("needs onnxruntime-gpu on a machine where CUDA cannot start")
    result = run("--model", model_path, "--provider", CUDA)
    assert_clean_failure(result, tmp_path, [], "did not start")


def test_missing_model(run, tmp_path):
    assert_clean_failure(run("--model", "gone.onnx"), tmp_path, [], "model file gone.onnx does not exist")


def test_not_onnx(run, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    assert_clean_failure(run("--model", "junk.onnx"), tmp_path, ["junk.onnx"], "junk.onnx: it is not an ONNX model")


def test_model_without_metadata(run, model_path, tmp_path):
    h.edit_metadata(model_path, tmp_path / "bare.onnx")
    result = run("--model", "bare.onnx")
    assert_clean_failure(result, tmp_path, ["bare.onnx"], "lacks the metadata mdx.schedule, mdx.classes")
    for option in ("--timesteps", "--schedule", "--beta-start", "--beta-end", "--classes"):
        assert option in result.stderr


def test_wrong_signature_model(run, tmp_path):
    h.write_wrong_signature_model(tmp_path / "id.onnx")
    assert_clean_failure(run("--model", "id.onnx"), tmp_path, ["id.onnx"], "does not follow the mdx model contract")


def test_missing_environment_model(run, monkeypatch, tmp_path):
    monkeypatch.setenv("MDX_MODEL", str(tmp_path / "gone.onnx"))
    assert_clean_failure(run(), tmp_path, [], "MDX_MODEL points to")


def test_no_default_model_says_how_to_get_one(run, tmp_path, monkeypatch):
    from mdx.runtime import shipped

    # An install whose shipped models folder has no emoji16 (and no ./models here).
    monkeypatch.setattr(shipped, "models_dir", lambda: tmp_path / "no-shipped-models")
    result = run()
    assert_clean_failure(result, tmp_path, [], "no --model given and no default model found")
    assert "mdx-train" in result.stderr and "mdx-export" in result.stderr


@pytest.mark.parametrize("out", ["s.png", "s.npz", "pngs"])
def test_failed_write_leaves_nothing(run, model_path, tmp_path, monkeypatch, out):
    """A write that fails half-way (disk full) leaves no file, no temporary, no folder."""
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.Image.Image, "save", disk_full)
    monkeypatch.setattr(images.np, "savez", disk_full)
    result = run("--model", model_path, *FAST, "-n", 2, "--out", out)
    # The run had started (its header line is on stderr); the error is the last line.
    assert_clean_failure(result, tmp_path, [], "No space left on device", one_line=False)


def test_failed_gif_write_leaves_nothing(run, model_path, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise images.OutputError("cannot write d.gif: No space left on device")

    monkeypatch.setattr(api, "save_gif", broken)  # mdx-sample writes through Output.save_gif
    result = run("--model", model_path, *FAST, "-n", 2, "--out", "s.npz", "--gif", "d.gif")
    assert result.exit_code == 2
    # The samples had been written before the animation failed; a failed run removes what it created.
    assert files_under(tmp_path) == []
    assert result.stderr.strip().splitlines()[-1] == "mdx-sample: error: cannot write d.gif: No space left on device"
