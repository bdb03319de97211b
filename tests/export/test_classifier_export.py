"""mdx.export.classifier: the evaluator's classifier exported with the exporter's pieces (opset 17,
dynamic batch, its metadata, ONNX Runtime parity on real images), atomically: a write that fails
leaves nothing new behind. An untrained tiny network stands in for the trained one."""

from __future__ import annotations

import errno
import json
import os

import onnx
import pytest
import torch

from mdx.export import classifier as export_clf
from mdx.runtime.fileio import WriteError
from mdx.train.classifier import ClassifierConfig, EmojiClassifier

CLASSES = ["a", "b", "c", "d", "e", "f", "g", "h", "i"]


def fake_report() -> dict:
    per_class = {name: 0.5 for name in CLASSES}
    return {"class_names": CLASSES, "accuracy": 0.5, "balanced_accuracy": 0.5, "per_class": per_class,
            "counts": {name: 1 for name in CLASSES}, "split": {"holdout": 9}, "train_seconds": 0.1}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = EmojiClassifier(len(CLASSES), width=4).eval()
    cfg = ClassifierConfig(width=4)
    out = tmp_path_factory.mktemp("clf") / "models" / "clf.onnx"
    parity = export_clf.export_classifier(model, cfg, fake_report(), out, "python -m mdx.export.classifier --width 4")
    return model, cfg, out, parity


def test_export_writes_a_self_describing_file(exported):
    model, cfg, out, parity = exported
    proto = onnx.load(str(out))
    assert {i.domain: i.version for i in proto.opset_import}[""] == export_clf.OPSET
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits", "features"]
    assert isinstance(proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param, str)  # dynamic batch
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["mdx.classes"]) == CLASSES and meta["mdx.classifier.feature_dim"] == "16"
    assert meta["mdx.classifier.train_command"] == "python -m mdx.export.classifier --width 4"
    assert json.loads(meta["mdx.classifier.train_config"])["width"] == 4
    assert max(parity["logits_max_abs"], parity["features_max_abs"]) <= export_clf.PARITY_ATOL
    assert sorted(p.name for p in out.parent.iterdir()) == ["clf.onnx"]


def test_a_write_that_fails_leaves_the_old_file(exported, tmp_path, monkeypatch):
    model, cfg, done, _ = exported
    proto = onnx.load(str(done))
    monkeypatch.setattr(export_clf, "classifier_to_onnx", lambda model, size: proto)  # skip the slow export

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_clf.onnx, "save", full_disk)
    out = tmp_path / "clf.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(WriteError, match=f"cannot write {out}: No space left on device"):
        export_clf.export_classifier(model, cfg, fake_report(), out, "cmd")
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["clf.onnx"]


def test_training_command_names_every_option_away_from_its_default():
    assert export_clf.training_command(ClassifierConfig()) == (
        "python -m mdx.export.classifier --epochs 60 --seed 0 --width 32 --balance-power 0.5")
    cfg = ClassifierConfig(epochs=40, width=48, balance_power=0.0, class_balance=1.0, cutout=0, flip=False, threads=2)
    assert export_clf.training_command(cfg) == (
        "python -m mdx.export.classifier --epochs 40 --seed 0 --width 48 --balance-power 0.0 "
        "--class-balance 1.0 --cutout 0 --no-flip")


@pytest.mark.parametrize("args, message", [
    (["--class-balance", "1.5"], "--class-balance"),
    (["--balance-power", "-1"], "--balance-power"),
    (["--max-shift", "9"], "--max-shift"),
    (["--cutout", "x"], "--cutout"),
    (["--width", "2"], "--width"),
])
def test_bad_options_end_in_one_line(args, message, tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "clf.onnx"
    result = CliRunner().invoke(export_clf.main, args + ["--out", str(out)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists()
