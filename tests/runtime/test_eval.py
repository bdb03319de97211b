"""mdx-eval (mdx.runtime.evaluate): the Fréchet distance against closed forms, the shipped
classifier's held-out accuracy recomputed through ONNX Runtime, FD / floor / conditional
accuracy on real and noise images, sampling a model, no torch, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mdx.runtime import evaluate as ev
from mdx.runtime.evaluate import EvalError, frechet_distance

EMOJI16_CLASSES = ["smileys", "people", "animals", "food", "travel", "activities", "objects", "symbols", "flags"]
HOLDOUT_FRACTION, SPLIT_SEED = 0.2, 0  # the classifier's documented split


def random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# --- the Fréchet distance ------------------------------------------------------------------


def test_fd_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), random_spd(rng, 32)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_fd_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(1)
    sigma = random_spd(rng, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9, abs=1e-9)


def test_fd_of_diagonal_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3.0, 10), rng.uniform(0.1, 3.0, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # The same Gaussians in a rotated basis (full, non-diagonal matrices): the distance is unchanged.
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-9)


def test_fd_of_non_commuting_covariances_matches_the_trace_formula():
    rng = np.random.default_rng(3)
    s1, s2 = random_spd(rng, 8), random_spd(rng, 8, scale=2.0)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    # tr sqrt(S1 S2) = sum of sqrt of the (real, positive) eigenvalues of S1 S2
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    want = np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(np.zeros(8), s1, np.zeros(8), s2) == pytest.approx(want, rel=1e-9)


def test_fd_is_symmetric_and_clips_round_off_for_singular_covariances():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    x = rng.standard_normal((5, 20))  # rank-5 covariances: eigenvalues ~ -1e-16 must be clipped
    s1, s2 = np.cov(x, rowvar=False), random_spd(rng, 20)
    forward, backward = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert np.isfinite(forward) and forward == pytest.approx(backward, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7)


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(EvalError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(EvalError, match=r"\(D, D\)"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(EvalError, match="not finite"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_class_mixture_with_the_data_shares_is_the_plain_covariance_and_reweights_otherwise():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 300)
    x = rng.standard_normal((300, 4)) + labels[:, None] * 2.0
    natural = np.bincount(labels) / len(labels)
    g = ev.class_mixture(x, labels, natural)
    np.testing.assert_allclose(g.mu, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(g.sigma, np.cov(x, rowvar=False, ddof=0), atol=1e-12)
    # Equal shares: the mean is the mean of the class means.
    g = ev.class_mixture(x, labels, np.ones(3) / 3)
    np.testing.assert_allclose(g.mu, np.mean([x[labels == k].mean(0) for k in range(3)], axis=0), atol=1e-12)
    # Moments of a part = moments of the whole minus those of the rest.
    part = ev.ClassMoments.of(x, labels, 3) - ev.ClassMoments.of(x[:100], labels[:100], 3)
    np.testing.assert_allclose(part.mixture(natural).sigma,
                               ev.class_mixture(x[100:], labels[100:], natural).sigma, atol=1e-10)
    # Unlabelled samples count with the data's shares.
    shares = ev.class_shares(np.array([0, 0, -1, -1]), labels, 3)
    np.testing.assert_allclose(shares, (np.array([2, 0, 0]) + 2 * natural) / 4)


# --- the shipped classifier ----------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    if not ev.DEFAULT_CLASSIFIER.is_file():
        pytest.fail(f"{ev.DEFAULT_CLASSIFIER} is not shipped; train it with python -m mdx.export.classifier")
    return ev.Classifier(threads=1)


@pytest.fixture(scope="module")
def real(classifier):
    return ev.real_reference(classifier)


@pytest.fixture(scope="module")
def emoji16():
    with np.load(ev.DEFAULT_REAL) as npz:
        return npz["images"], npz["labels"]


def holdout_indices(n: int) -> np.ndarray:
    # split_indices(n, 0.2, seed=0) of mdx.train.data, restated here (the runtime must not import
    # mdx.train); test_holdout_split_is_mdx_train_split checks that they agree.
    n_holdout = min(max(int(round(n * HOLDOUT_FRACTION)), 1), n - 1)
    return np.sort(np.random.default_rng(SPLIT_SEED).permutation(n)[:n_holdout])


def test_holdout_split_is_mdx_train_split(emoji16):
    from mdx.train.data import split_indices

    _, holdout = split_indices(len(emoji16[1]), HOLDOUT_FRACTION, SPLIT_SEED)
    np.testing.assert_array_equal(holdout, holdout_indices(len(emoji16[1])))


def test_shipped_classifier_file(classifier):
    import onnx

    path = ev.DEFAULT_CLASSIFIER
    assert path.stat().st_size < 2_000_000
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits", "features"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["mdx.classes"]) == EMOJI16_CLASSES
    assert json.loads(meta["mdx.classifier.split"])["holdout_fraction"] == HOLDOUT_FRACTION
    assert json.loads(meta["mdx.classifier.split"])["seed"] == SPLIT_SEED
    assert meta["mdx.classifier.train_command"].startswith("python -m mdx.train.classifier")
    assert classifier.class_names == tuple(EMOJI16_CLASSES)


def test_shipped_classifier_reaches_85_percent_on_the_holdout(classifier, emoji16):
    images, labels = emoji16
    holdout = holdout_indices(len(labels))
    features, logits = classifier.features_and_logits(images[holdout])
    assert logits.shape == (len(holdout), 9) and features.shape[0] == len(holdout) and 64 <= features.shape[1] <= 128
    accuracy = float((logits.argmax(1) == labels[holdout]).mean())
    assert accuracy >= 0.85
    # ... and it is the accuracy the model card and the metadata state.
    assert accuracy == pytest.approx(classifier.holdout_accuracy, abs=5e-4)
    # Every class is learned, the rare ones too: well above chance (1/9) each, and the mean
    # per-class accuracy (what an even class mix of perfect samples would score) as stated.
    recall = [float((logits.argmax(1)[labels[holdout] == k] == k).mean()) for k in range(9)]
    assert min(recall) >= 0.2, dict(zip(EMOJI16_CLASSES, recall))
    assert np.mean(recall) >= 0.65
    assert np.mean(recall) == pytest.approx(classifier.holdout_report["balanced_accuracy"], abs=5e-4)


def test_uint8_and_float_inputs_give_the_same_features(classifier, emoji16):
    images = emoji16[0][:7]
    as_float = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    f1, l1 = classifier.features_and_logits(images)
    f2, l2 = classifier.features_and_logits(as_float)
    np.testing.assert_allclose(f1, f2, atol=1e-5)
    np.testing.assert_allclose(l1, l2, atol=1e-5)
    with pytest.raises(EvalError, match="shape"):
        classifier.features_and_logits(np.zeros((2, 8, 8, 3), np.uint8))


def test_conditional_accuracy_on_real_images_is_the_classifier_accuracy(classifier, real, emoji16):
    images, labels = emoji16
    holdout = holdout_indices(len(labels))
    result = ev.score(images[holdout], labels[holdout], classifier, real)
    _, logits = classifier.features_and_logits(images[holdout])
    assert result["conditional_accuracy"] == pytest.approx(float((logits.argmax(1) == labels[holdout]).mean()), abs=1e-12)
    assert result["conditioned_n"] == len(holdout)
    # Unlabelled samples are scored for FD only.
    unlabelled = ev.score(images[holdout[:50]], np.full(50, -1), classifier, real)
    assert unlabelled["conditional_accuracy"] is None and unlabelled["per_class_accuracy"] == {}


# --- the command line -------------------------------------------------------------------------


def balanced_real(emoji16, per_class=100, seed=1):
    images, labels = emoji16
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == k), per_class, replace=False) for k in range(9)])
    return images[idx], labels[idx]


def write_npz(path, images, labels):
    np.savez(path, images=images, labels=np.asarray(labels, np.int64),
             samples=images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    return path


def run_eval(*args):
    return CliRunner().invoke(ev.main, [str(a) for a in args], catch_exceptions=False)


def test_real_images_score_near_the_floor_and_noise_far_above(tmp_path, emoji16, real):
    images, labels = balanced_real(emoji16)
    result = run_eval(write_npz(tmp_path / "real.npz", images, labels), "--json", tmp_path / "real.json")
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "real.json").read_text())
    assert scored["n"] == 900 and scored["floor"]["n"] == 885  # activities: 170 images, half of them
    floor = scored["floor"]["fd"]
    assert floor > 0 and scored["fd"] < 2 * floor
    assert scored["class_shares"]["people"] == pytest.approx(1 / 9)
    for row in ("FD", "floor", "cond. accuracy", "n", "wall time"):
        assert any(line.startswith(row) for line in result.output.splitlines()), row

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
    result = run_eval(write_npz(tmp_path / "noise.npz", noise, labels), "--json", tmp_path / "noise.json")
    assert result.exit_code == 0, result.output
    noisy = json.loads((tmp_path / "noise.json").read_text())
    assert noisy["fd"] > 20 * floor
    assert noisy["conditional_accuracy"] < 0.5
    # The same class mix, the same floor: it does not depend on the images.
    assert noisy["floor"] == scored["floor"]


def test_floor_shrinks_with_n(real):
    shares = np.ones(9) / 9
    small = ev.fd_floor(real.features, real.labels, shares, 90, draws=2, moments=real.moments)
    large = ev.fd_floor(real.features, real.labels, shares, 900, draws=2, moments=real.moments)
    assert small["n"] == 90 and large["fd"] < small["fd"]


# --- sampling a model (a stand-in contract model built with onnx.helper, no torch) ----------


def contract_model(path: Path) -> Path:
    """model_output = 0.5 * sample: a valid mdx model with emoji16's classes, instant to build."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 3, 16, 16]),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
              helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", 9])]
    output = helper.make_tensor_value_info("model_output", TensorProto.FLOAT, ["batch", 3, 16, 16])
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    graph = helper.make_graph([helper.make_node("Mul", ["sample", "half"], ["model_output"])],
                              "half", inputs, [output], initializer=[half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    meta = {"mdx.format": "1", "mdx.image_size": "16", "mdx.channels": "3",
            "mdx.classes": json.dumps(EMOJI16_CLASSES),
            "mdx.schedule": json.dumps({"kind": "linear", "num_train_timesteps": 50,
                                        "beta_start": 1e-4, "beta_end": 0.02}),
            "mdx.prediction_type": "epsilon", "mdx.precision": "fp32"}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_model_is_sampled_per_class_and_scored_like_its_mdx_sample_file(tmp_path, real):
    from mdx.runtime.cli import main as sample_main

    model = contract_model(tmp_path / "half.onnx")
    result = run_eval("--model", model, "--sampler", "ddim", "--steps", 3, "--guidance", 2, "-n", 27,
                      "--provider", "CPUExecutionProvider", "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    direct = json.loads((tmp_path / "m.json").read_text())
    assert direct["n"] == 27 and direct["conditioned_n"] == 27
    assert direct["sampling"]["sampler"] == "ddim" and direct["sampling"]["steps"] == 3
    assert direct["sampling"]["guidance"] == 2 and "sampling" in direct["seconds"]
    assert direct["class_shares"] == pytest.approx({name: 1 / 9 for name in EMOJI16_CLASSES})
    assert "ddim, 3 steps, guidance 2" in result.output
    # The library call with a path gives the same images as the command line.
    images, labels, settings = ev.sample_with_model(str(model), sampler="ddim", steps=3, guidance=2.0, eta=0.0,
                                                    seed=0, n=27, provider="CPUExecutionProvider",
                                                    class_names=tuple(EMOJI16_CLASSES))
    assert images.shape == (27, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(27) % 9)
    assert ev.score(images, labels, ev.Classifier(threads=1), real)["fd"] == pytest.approx(direct["fd"], rel=1e-9)

    sampled = CliRunner().invoke(sample_main, ["--model", str(model), "--sampler", "ddim", "--steps", "3",
                                               "--guidance", "2", "-n", "27", "--out", str(tmp_path / "s.npz")])
    assert sampled.exit_code == 0, sampled.output
    result = run_eval(tmp_path / "s.npz", "--json", tmp_path / "f.json")
    assert result.exit_code == 0, result.output
    from_file = json.loads((tmp_path / "f.json").read_text())
    assert from_file["fd"] == pytest.approx(direct["fd"], rel=1e-9)
    assert from_file["conditional_accuracy"] == direct["conditional_accuracy"]


def test_a_model_with_other_classes_is_refused(tmp_path):
    import onnx

    path = contract_model(tmp_path / "half.onnx")
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == "mdx.classes":
            p.value = json.dumps([f"c{i}" for i in range(9)])
    onnx.save(proto, str(path))
    result = CliRunner().invoke(ev.main, ["--model", str(path), "-n", "9", "--steps", "2"])
    assert result.exit_code == 2 and "mdx-eval: error:" in result.stderr and "classes" in result.stderr


# --- no torch ---------------------------------------------------------------------------------


NO_TORCH = r"""
import importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch" or name.startswith(("mdx.train", "mdx.export")):
            raise ImportError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, Blocker())
from mdx.runtime import evaluate
code = evaluate.main([sys.argv[1], "--json", sys.argv[2]], standalone_mode=False)
assert not any(m.split(".")[0] == "torch" for m in sys.modules)
print("exit", code)
"""


def test_scores_without_torch(tmp_path, emoji16):
    images, labels = balanced_real(emoji16, per_class=10)
    npz = write_npz(tmp_path / "few.npz", images, labels)
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(npz), str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "exit 0" in proc.stdout, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out.json").read_text())["n"] == 90
    # The blocker really blocks.
    proc = subprocess.run([sys.executable, "-c", NO_TORCH.replace("from mdx.runtime import evaluate",
                                                                  "import torch")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


# --- bad inputs -------------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, tuple[list, str]]:
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    np.savez(tmp_path / "no_images.npz", labels=np.zeros(4, np.int64))
    np.save(tmp_path / "array.npy", np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 16, 16, 3), np.float32))
    np.savez(tmp_path / "small.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "one.npz", images=np.zeros((1, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 16, 16, 3), np.uint8), labels=np.zeros(0, np.int64))
    np.savez(tmp_path / "labels.npz", images=np.zeros((4, 16, 16, 3), np.uint8), labels=np.array([0, 1, 2, 9]))
    np.savez(tmp_path / "short.npz", images=np.zeros((4, 16, 16, 3), np.uint8), labels=np.array([0, 1]))
    np.savez(tmp_path / "ok.npz", images=np.zeros((4, 16, 16, 3), np.uint8), labels=np.array([0, 1, 2, 3]))
    np.savez(tmp_path / "bad_real.npz", images=np.zeros((4, 16, 16, 3), np.uint8))
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not a model")
    t = str(tmp_path)
    return {
        "missing samples": ([f"{t}/nope.npz"], "does not exist"),
        "samples is a folder": ([t], "is not a file"),
        "corrupt npz": ([str(corrupt)], "cannot read"),
        "text npz": ([str(text)], "cannot read"),
        "npz without images": ([f"{t}/no_images.npz"], "no 'images' array"),
        "npy not npz": ([f"{t}/array.npy"], "not an .npz"),
        "float images": ([f"{t}/float.npz"], "uint8"),
        "wrong size": ([f"{t}/small.npz"], "uint8 (N, 16, 16, 3)"),
        "one image": ([f"{t}/one.npz"], "at least 2"),
        "no images": ([f"{t}/empty.npz"], "no images"),
        "label out of range": ([f"{t}/labels.npz"], "-1..8"),
        "labels length": ([f"{t}/short.npz"], "labels"),
        "n zero": (["--model", str(model), "-n", "0"], "-n 0"),
        "n negative": (["--model", str(model), "-n", "-5"], "-n -5"),
        "classifier missing": ([f"{t}/ok.npz", "--classifier", f"{t}/none.onnx"], "not found"),
        "classifier corrupt": ([f"{t}/ok.npz", "--classifier", str(model)], "cannot load classifier"),
        "real missing": ([f"{t}/ok.npz", "--real", f"{t}/none.npz"], "does not exist"),
        "real without labels": ([f"{t}/ok.npz", "--real", f"{t}/bad_real.npz"], "lacks"),
        "model missing": (["--model", f"{t}/none.onnx", "-n", "9"], "does not exist"),
        "model corrupt": (["--model", str(model), "-n", "9"], "not an ONNX model"),
        "nothing to score": ([], "either SAMPLES.npz or --model"),
        "both": ([f"{t}/ok.npz", "--model", str(model)], "not both"),
        "sampling options with a file": ([f"{t}/ok.npz", "--steps", "5"], "--steps"),
        "unknown sampler": (["--model", str(model), "--sampler", "euler"], "euler"),
        "json folder missing": ([f"{t}/ok.npz", "--json", f"{t}/no/dir/x.json"], "does not exist"),
    }


def test_bad_inputs_are_one_line_errors_with_exit_code_2(tmp_path):
    failures = []
    for name, (args, expected) in _bad_files(tmp_path).items():
        result = CliRunner().invoke(ev.main, args)
        lines = result.stderr.strip().splitlines()
        ok = (result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("mdx-eval: error: ")
              and expected in lines[0] and "Traceback" not in result.output)
        if not ok:
            failures.append(f"{name}: exit {result.exit_code}, stderr {result.stderr!r}, exception {result.exception!r}")
    assert not failures, "\n".join(failures)


def test_console_script_fails_in_one_line(tmp_path):
    script = Path(sys.executable).with_name("mdx-eval")
    proc = subprocess.run([str(script), str(tmp_path / "missing.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mdx-eval: error: samples file {tmp_path / 'missing.npz'} does not exist"


def test_help_names_both_modes():
    result = CliRunner().invoke(ev.main, ["--help"])
    assert result.exit_code == 0
    for text in ("SAMPLES.npz", "--model", "--sampler", "--steps", "--guidance", "-n", "--json", "--real",
                 "--classifier"):
        assert text in result.output
