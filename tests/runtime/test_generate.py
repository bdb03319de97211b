"""mdx-generate without Ray: shards, seeds, the manifest, resuming, refusals and every bad input.
(The Ray runs, checked against these local ones, are in test_ray.py.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import runtime_helpers as h
from mdx.runtime import cli as sample_cli
from mdx.runtime import generate as gen
from mdx.runtime.fileio import sha256_file

FAST = ["--steps", "3", "--threads", "1"]


@pytest.fixture(scope="session")
def model_path():
    return h.cached_tiny()[1]


@pytest.fixture
def run(monkeypatch, tmp_path):
    """Run mdx-generate in an empty working folder; returns the click Result."""
    return h.cli_invoker(gen.main, monkeypatch, tmp_path)


def arrays(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every shard's arrays, by file name."""
    return h.shard_arrays(folder)


def stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.npz")}


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("mdx-generate: error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


# --- seeds and the plan ---------------------------------------------------------------


def test_shard_seed_is_the_kth_child_of_the_run_seed():
    children = np.random.SeedSequence(7).spawn(3)
    for k, child in enumerate(children):
        assert gen.shard_seed(7, k) == int(child.generate_state(1, np.uint64)[0]) >> 1
    seeds = {gen.shard_seed(s, k) for s in (0, 1) for k in range(50)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)


def test_labels_cycle_through_the_chosen_classes():
    names = ("apple", "ball", "cat")
    settings = {"n": 5, "unconditional": False, "classes": ["cat", "apple"]}
    assert gen.run_labels(settings, names).tolist() == [2, 0, 2, 0, 2]
    assert gen.run_labels({**settings, "unconditional": True}, names).tolist() == [-1] * 5
    context = gen.shard_context(np.array([2, -1, 0]), 3)
    assert context.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]


# --- a run ----------------------------------------------------------------------------


def test_shards_manifest_and_npz_keys(run, model_path, tmp_path):
    result = run("--model", model_path, *FAST, "-n", 7, "--shard-size", 3, "--seed", 5, "--out", "gen")
    assert result.exit_code == 0, result.output
    assert "wrote 3 shards (7 images)" in result.stdout and "img/s" in result.stdout
    out = tmp_path / "gen"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.npz", "shard-00001.npz",
                                                     "shard-00002.npz"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == sha256_file(model_path)
    assert manifest["settings"]["n"] == 7 and manifest["settings"]["seed"] == 5
    assert [(s["index"], s["start"], s["count"], s["done"]) for s in manifest["shards"]] == [
        (0, 0, 3, True), (1, 3, 3, True), (2, 6, 1, True)]
    assert [s["seed"] for s in manifest["shards"]] == [gen.shard_seed(5, k) for k in range(3)]
    assert manifest["shards"][1]["classes"] == {"apple": 1, "ball": 1, "cat": 1}
    shards = arrays(out)
    labels = np.concatenate([shards[f"shard-0000{k}.npz"]["labels"] for k in range(3)])
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    first = shards["shard-00000.npz"]
    assert first["images"].dtype == np.uint8 and first["images"].shape == (3, 16, 16, 3)
    assert first["samples"].dtype == np.float32 and first["samples"].shape == (3, 3, 16, 16)
    assert not np.array_equal(first["samples"][0], shards["shard-00001.npz"]["samples"][0])  # other seeds


def test_a_shard_equals_mdx_sample_with_its_seed(run, model_path, tmp_path):
    assert run("--model", model_path, *FAST, "-n", 6, "--shard-size", 3, "--seed", 2, "--out", "gen").exit_code == 0
    # Shard 0 starts at image 0, so its classes cycle like mdx-sample's default.
    seed = gen.shard_seed(2, 0)
    result = run("--model", model_path, *FAST, "-n", 3, "--seed", seed, "--out", "s.npz", main=sample_cli.main)
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s.npz") as sample:
        shard = arrays(tmp_path / "gen")["shard-00000.npz"]
        for key in ("images", "labels", "samples"):
            assert np.array_equal(shard[key], sample[key]), key


def test_classes_per_class_and_unconditional(run, model_path, tmp_path):
    assert run("--model", model_path, *FAST, "--per-class", 2, "--classes", "cat,0", "--out", "a").exit_code == 0
    assert arrays(tmp_path / "a")["shard-00000.npz"]["labels"].tolist() == [2, 0, 2, 0]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["settings"]["classes"] == ["cat", "apple"] and manifest["settings"]["n"] == 4
    assert run("--model", model_path, *FAST, "-n", 2, "--unconditional", "--out", "u").exit_code == 0
    assert arrays(tmp_path / "u")["shard-00000.npz"]["labels"].tolist() == [-1, -1]


# --- resuming -------------------------------------------------------------------------


def test_rerun_skips_complete_shards(run, model_path, tmp_path):
    args = ("--model", model_path, *FAST, "-n", 6, "--shard-size", 2, "--out", "gen")
    assert run(*args).exit_code == 0
    before = stamps(tmp_path / "gen")
    result = run(*args)
    assert result.exit_code == 0 and "nothing to do: all 3 shards" in result.stdout
    assert stamps(tmp_path / "gen") == before


def test_resume_after_a_stop_gives_the_same_images(run, model_path, tmp_path):
    common = ("--model", model_path, *FAST, "-n", 8, "--shard-size", 2, "--seed", 3)
    assert run(*common, "--out", "whole").exit_code == 0
    stopped = run(*common, "--out", "parts", "--max-shards", 1)
    assert stopped.exit_code == 0 and "3 shards left" in stopped.stdout
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert [s["done"] for s in manifest["shards"]] == [True, False, False, False]
    first = stamps(tmp_path / "parts")
    resumed = run(*common, "--out", "parts")
    assert resumed.exit_code == 0 and "wrote 3 shards" in resumed.stdout and "1 already complete" in resumed.stdout
    assert stamps(tmp_path / "parts")["shard-00000.npz"] == first["shard-00000.npz"]
    whole, parts = arrays(tmp_path / "whole"), arrays(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    for name in whole:
        for key in ("images", "labels", "samples"):
            assert whole[name][key].tobytes() == parts[name][key].tobytes()


def test_deleted_damaged_and_unrecorded_shards(run, model_path, tmp_path):
    args = ("--model", model_path, *FAST, "-n", 8, "--shard-size", 2, "--out", "gen")
    assert run(*args).exit_code == 0
    out = tmp_path / "gen"
    reference = arrays(out)
    (out / "shard-00001.npz").unlink()
    (out / "shard-00002.npz").write_bytes((out / "shard-00002.npz").read_bytes()[:100])  # a torn write
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][3]["done"] = False  # written, then killed before the manifest said so
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = stamps(out)
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "wrote 2 shards" in result.stdout and "2 already complete" in result.stdout
    assert "shard-00002.npz is damaged" in result.stderr
    after = stamps(out)
    assert [after[f"shard-0000{k}.npz"] for k in (0, 3)] == [before[f"shard-0000{k}.npz"] for k in (0, 3)]
    again = arrays(out)
    for name in reference:
        assert reference[name]["samples"].tobytes() == again[name]["samples"].tobytes()
    assert all(s["done"] for s in json.loads((out / "manifest.json").read_text())["shards"])


# --- refusals -------------------------------------------------------------------------


def test_other_settings_or_model_are_refused_unless_forced(run, model_path, tmp_path):
    args = ("--model", model_path, "--threads", "1", "-n", 4, "--shard-size", 2, "--out", "gen")
    assert run(*args, "--steps", 3).exit_code == 0
    before = stamps(tmp_path / "gen")
    manifest_before = (tmp_path / "gen" / "manifest.json").read_text()
    assert_one_line_error(run(*args, "--steps", 4), "other settings", "steps 3 there, 4 now", "--force")
    other_model = h.edit_metadata(model_path, tmp_path / "other.onnx", updates={"mdx.checkpoint_sha256": "1" * 64})
    other = ("--model", other_model, *args[2:])
    assert_one_line_error(run(*other, "--steps", 3), "another model", "sha256")
    assert stamps(tmp_path / "gen") == before
    assert (tmp_path / "gen" / "manifest.json").read_text() == manifest_before
    forced = run(*args, "--steps", 4, "--force")
    assert forced.exit_code == 0 and "wrote 2 shards" in forced.stdout
    assert json.loads((tmp_path / "gen" / "manifest.json").read_text())["settings"]["steps"] == 4


def test_stray_shards_or_a_broken_manifest_are_refused(run, model_path, tmp_path):
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "shard-00000.npz").write_bytes(b"x")
    args = ("--model", model_path, *FAST, "-n", 2, "--out", "gen")
    assert_one_line_error(run(*args), "shard files but no manifest.json")
    (tmp_path / "gen" / "manifest.json").write_text("{not json")
    assert_one_line_error(run(*args), "is not an mdx-generate manifest")
    assert (tmp_path / "gen" / "shard-00000.npz").read_bytes() == b"x"


@pytest.mark.parametrize("args, fragment", [
    (["-n", 0], "-n 0: must be at least 1"),
    (["-n", 2, "--per-class", 1], "one of the two"),
    ([], "one of the two"),
    (["-n", 2, "--shard-size", 0], "--shard-size 0"),
    (["-n", 2, "--steps", 0], "--steps 0"),
    (["-n", 2, "--steps", 51], "more than the model's 50 training timesteps"),
    (["-n", 2, "--guidance", -1], "--guidance -1"),
    (["-n", 2, "--seed", -1], "--seed -1"),
    (["-n", 2, "--max-shards", 0], "--max-shards 0"),
    (["-n", 2, "--workers", 2], "apply to --ray runs only"),
    (["-n", 2, "--address", "auto"], "apply to --ray runs only"),
    (["-n", 2, "--ray", "--threads", 1], "--threads applies to the local run"),
    (["-n", 2, "--ray", "--workers", 0], "--workers 0"),
    (["-n", 2, "--classes", "dog"], "unknown class 'dog'"),
    (["-n", 2, "--classes", "cat,2"], "names a class twice"),
    (["-n", 2, "--classes", "cat,"], "without empty entries"),
    (["-n", 2, "--classes", "7"], "class index 7 is out of range"),
    (["-n", 2, "--unconditional", "--classes", "cat"], "--unconditional excludes"),
    (["-n", 2, "--sampler", "ddpm", "--eta", "0.5"], "eta applies to the ddim sampler only"),
    (["-n", 2, "--sampler", "euler"], "--sampler"),
    (["-n", 2, "--provider", "NoSuchProvider"], "unknown provider"),
    (["-n", "many"], "-n"),
])
def test_bad_inputs_are_one_line_and_write_nothing(run, model_path, tmp_path, args, fragment):
    result = run("--model", model_path, "--out", "gen", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "gen").exists()


def test_bad_paths(run, model_path, tmp_path):
    assert_one_line_error(run("--model", tmp_path / "none.onnx", "-n", 2, "--out", "gen"), "does not exist")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run("--model", model_path, "-n", 2, "--out", "file"), "exists and is not a folder")
    missing_parent = run("--model", model_path, *FAST, "-n", 2, "--out", "no/such/dir")
    assert_one_line_error(missing_parent, "cannot create no/such/dir")
    assert_one_line_error(run("--model", model_path, "-n", 2), "--out")
    assert not (tmp_path / "gen").exists()


def test_a_write_fault_names_the_path(run, model_path, tmp_path):
    # A folder where shard 1 should go: renaming the written shard onto it fails (even as root).
    (tmp_path / "gen").mkdir()
    args = ("--model", model_path, *FAST, "-n", 4, "--shard-size", 2, "--out", "gen")
    assert run(*args, "--max-shards", 1).exit_code == 0
    (tmp_path / "gen" / "shard-00001.npz").mkdir()
    result = run(*args)
    assert_one_line_error(result, "cannot write gen/shard-00001.npz")
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["manifest.json", "shard-00000.npz",
                                                                     "shard-00001.npz"]  # no temporary files


def test_progress_shows_images_per_second():
    stream = io.StringIO()
    progress = gen.RateProgress(10, stream=stream, enabled=True)
    progress.update(4)
    progress.update(6)
    text = stream.getvalue()
    assert "4/10 images" in text and "10/10 images" in text and "img/s" in text and text.endswith("\n")
    silent = io.StringIO()
    gen.RateProgress(10, stream=silent).update(10)  # not a terminal: nothing
    assert silent.getvalue() == ""


def test_help_lists_the_options():
    result = CliRunner().invoke(gen.main, ["--help"])
    assert result.exit_code == 0
    for option in ("--model", "-n", "--per-class", "--classes", "--unconditional", "--sampler", "--steps",
                   "--guidance", "--eta", "--seed", "--shard-size", "--out", "--force", "--max-shards",
                   "--provider", "--compute-precision", "--threads", "--ray", "--address", "--workers",
                   "--worker-cpus"):
        assert option in result.output
