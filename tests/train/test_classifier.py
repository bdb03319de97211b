"""mdx.train.classifier: the network's outputs, the augmentation, the class weights, and the
shipped file's recorded configuration (the model's accuracy is checked in test_eval.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mdx.train import classifier as clf


def test_network_gives_logits_and_features():
    torch.manual_seed(0)
    model = clf.EmojiClassifier(num_classes=9, width=8).eval()
    logits, features = model(torch.zeros(5, 3, 16, 16))
    assert logits.shape == (5, 9) and features.shape == (5, 32) and model.feature_dim == 32


def test_model_input_is_nchw_in_minus_one_one():
    images = np.zeros((2, 16, 16, 3), np.uint8)
    images[1] = 255
    images[0, 3, 4] = (255, 0, 0)
    x = clf.to_model_input(images)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert x[0, 0, 3, 4] == 1.0 and x[0, 1, 3, 4] == -1.0 and x[1].min() == 1.0


def test_augment_flips_and_translates_each_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    flipped = clf.augment(x, 0, g)
    for a, b in zip(x, flipped):
        assert torch.equal(a, b) or torch.equal(a.flip(2), b)
    # One bright pixel in the middle moves by at most 2 pixels each way.
    dot = torch.zeros(200, 1, 16, 16)
    dot[:, 0, 7, 8] = 1.0
    moved = clf.augment(dot, 2, g)
    assert torch.equal(moved.sum((1, 2, 3)), torch.ones(200))
    ys, xs = np.unravel_index(moved.flatten(1).argmax(1).numpy(), (16, 16))
    assert set(ys) == {5, 6, 7, 8, 9}  # every shift happens
    assert set(np.minimum(xs, 15 - xs)) <= {5, 6, 7}  # 8 or its mirror 7, +-2
    assert clf.augment(torch.ones(4, 3, 16, 16), 2, g).eq(1).all()  # edges replicated: no black borders
    # Cutout paints a white 4 x 4 square (all channels) over about half the images.
    painted = clf.augment(torch.full((400, 3, 16, 16), -1.0), 0, g, cutout=4).eq(1.0)
    assert torch.equal(painted[:, 0], painted[:, 2])
    per_image = painted[:, 0].sum((1, 2))
    assert set(per_image.tolist()) == {0, 16} and 150 < (per_image == 16).sum() < 250


def test_class_weights():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    assert torch.allclose(clf.class_weights(labels, 3, 0.0), torch.ones(3))
    w = clf.class_weights(labels, 3, 1.0).numpy()
    counts = np.bincount(labels)
    np.testing.assert_allclose(counts * w, counts[0] * w[0], rtol=1e-6)  # fully balanced
    np.testing.assert_allclose(w[labels].mean(), 1.0, rtol=1e-6)
    w_half = clf.class_weights(labels, 3, 0.5).numpy()
    assert w_half[0] < w_half[1] < w_half[2] and w_half[2] / w_half[0] == pytest.approx(np.sqrt(90), rel=1e-5)


def test_shipped_classifier_records_how_it_was_trained():
    import onnx

    from mdx.export.classifier import DEFAULT_OUT

    proto = onnx.load(str(DEFAULT_OUT))
    meta = {p.key: p.value for p in proto.metadata_props}
    config = clf.ClassifierConfig(**json.loads(meta["mdx.classifier.train_config"]))
    assert (config.holdout_fraction, config.split_seed) == (0.2, 0)
    assert meta["mdx.classifier.train_command"].startswith("python -m mdx.train.classifier")
    assert f"--epochs {config.epochs}" in meta["mdx.classifier.train_command"]
    report = json.loads(meta["mdx.classifier.holdout_report"])
    assert report["accuracy"] == pytest.approx(float(meta["mdx.classifier.holdout_accuracy"]), abs=1e-4)
    assert sum(report["counts"].values()) == json.loads(meta["mdx.classifier.split"])["holdout"] == 1512


def test_epoch_order_is_a_permutation_without_class_balance():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    order = clf.epoch_order(labels, 3, 0.0, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(100))


def test_epoch_order_balances_the_classes():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    g = torch.Generator().manual_seed(0)
    draws = np.concatenate([labels[clf.epoch_order(labels, 3, 1.0, g).numpy()] for _ in range(20)])
    shares = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(shares, 1 / 3, atol=0.02)  # every class alike
    half = labels[clf.epoch_order(labels, 3, 0.5, g).numpy()]
    want = np.sqrt([900, 90, 10]) / np.sqrt([900, 90, 10]).sum()  # share ~ sqrt(class size)
    np.testing.assert_allclose(np.bincount(half, minlength=3) / len(half), want, atol=0.03)
    assert len(half) == len(labels)


def test_augment_without_flips_keeps_the_orientation():
    x = torch.randn(32, 3, 16, 16)
    assert torch.equal(clf.augment(x, 0, torch.Generator().manual_seed(0), flip=False), x)
    # The flip draw is made either way, so the rest of the stream does not move.
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    clf.augment(x, 2, a, flip=True), clf.augment(x, 2, b, flip=False)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
