"""The emoji16 classifier behind mdx-eval: a small CNN whose penultimate layer is the feature
space for the Fréchet distance and whose logits give the conditional accuracy.

    python -m mdx.export.classifier --epochs 60 --seed 0 --out models/emoji16-classifier.onnx

trains it (this module) and exports it (mdx.export.classifier), in about 5-10 minutes on one
CPU thread; 0.878 held-out accuracy, 0.705 averaged over classes.

Training uses the TRAIN part of a fixed split, `split_indices(N, 0.2, seed=0)` (the same call
the evaluator documents), so the held-out accuracy written into the model is measured on
images the classifier never saw. emoji16 is very unbalanced (people is 60% of it,
activities 2%), so the loss weights each class by (1 / frequency) ** balance_power (0.5 by
default: rare classes are learned without sacrificing the common ones), or, with class_balance
> 0 (`--class-balance`), the batches are drawn class-balanced instead. The rare classes are
where it overfits (98% train vs 86% held-out accuracy with flips and shifts alone), hence:
horizontal flips, translations of up to 2 pixels, a white 4x4 cutout on half the images,
AdamW weight decay 0.05 and dropout before the last layer.

The ONNX file's interface and metadata are described in mdx.export.classifier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdx.runtime.images import to_float
from mdx.train.data import load_data, split_indices


@dataclass(frozen=True)
class ClassifierConfig:
    """Every option of a classifier run; written into the ONNX metadata."""

    data: str = "emoji16"
    image_size: int = 16
    holdout_fraction: float = 0.2  # the split is fixed: mdx-eval documents the same one
    split_seed: int = 0
    seed: int = 0                  # weights, batch order, augmentation
    epochs: int = 60
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.05
    width: int = 32                # channels of the first block; features are 4 * width
    balance_power: float = 0.5     # class weight = (1 / frequency) ** balance_power
    class_balance: float = 0.0     # sampling: an image is drawn with weight (1 / class size) ** class_balance
    max_shift: int = 2             # translation augmentation, pixels
    cutout: int = 4                # side of the white square painted over half the images
    flip: bool = True              # random horizontal flips
    threads: int = 1


# --- the network ----------------------------------------------------------------------------


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class EmojiClassifier(nn.Module):
    """Three stages of two conv blocks (16 -> 8 -> 4 pixels), global average pool -> features."""

    def __init__(self, num_classes: int, width: int = 32, channels: int = 3, image_size: int = 16) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            conv_block(channels, w), conv_block(w, w), nn.MaxPool2d(2),  # (B, w, 8, 8)
            conv_block(w, 2 * w), conv_block(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, 4, 4)
            conv_block(2 * w, 4 * w), conv_block(4 * w, 4 * w),  # (B, 4w, 4, 4)
            # A fixed-size AvgPool, not AdaptiveAvgPool2d: that exports as an opset-18 ReduceMean
            # which the converter cannot bring down to opset 17.
            nn.AvgPool2d(image_size // 4), nn.Flatten(),  # (B, 4w): the feature layer
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(4 * w, num_classes)
        self.feature_dim = 4 * w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)  # (B, D)
        return self.head(self.dropout(features)), features  # (B, K), (B, D)


# --- data -----------------------------------------------------------------------------------


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], as the diffusion models see them."""
    return torch.from_numpy(to_float(images))


def augment(x: torch.Tensor, max_shift: int, g: torch.Generator, cutout: int = 0, flip: bool = True) -> torch.Tensor:
    """Per-image random horizontal flip (if flip), translation by up to max_shift pixels (edges
    replicated), and, for half the images, a cutout x cutout square painted white (the emoji background)."""
    B, C, H, W = x.shape
    flipped = torch.rand(B, generator=g) < 0.5  # drawn even when unused: the same stream either way
    if flip:
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    if max_shift > 0:
        s = max_shift
        padded = F.pad(x, (s, s, s, s), mode="replicate")  # (B, C, H + 2s, W + 2s)
        dy = torch.randint(0, 2 * s + 1, (B,), generator=g)
        dx = torch.randint(0, 2 * s + 1, (B,), generator=g)
        rows = (dy[:, None] + torch.arange(H))[:, None, :, None].expand(B, C, H, W + 2 * s)
        cols = (dx[:, None] + torch.arange(W))[:, None, None, :].expand(B, C, H, W)
        x = padded.gather(2, rows).gather(3, cols)
    if cutout > 0:
        top = torch.randint(0, H - cutout + 1, (B,), generator=g)
        left = torch.randint(0, W - cutout + 1, (B,), generator=g)
        apply = torch.rand(B, generator=g) < 0.5
        ys, xs = torch.arange(H), torch.arange(W)
        inside_y = (ys[None] >= top[:, None]) & (ys[None] < top[:, None] + cutout)  # (B, H)
        inside_x = (xs[None] >= left[:, None]) & (xs[None] < left[:, None] + cutout)  # (B, W)
        mask = (inside_y[:, :, None] & inside_x[:, None, :] & apply[:, None, None])[:, None]  # (B, 1, H, W)
        x = x.masked_fill(mask, 1.0)
    return x


def class_weights(labels: np.ndarray, num_classes: int, power: float) -> torch.Tensor:
    """(1 / frequency) ** power, scaled so that the average weight over the training images is 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** power, 0.0)
    weights /= (weights[labels]).mean()
    return torch.tensor(weights, dtype=torch.float32)


def epoch_order(labels: np.ndarray, num_classes: int, power: float, g: torch.Generator) -> torch.Tensor:
    """The training images of one epoch, as indices: a permutation when power is 0, else
    len(labels) draws with replacement, image i weighted (1 / size of its class) ** power, so a
    class's share of the draws is proportional to size ** (1 - power) (1: every class alike;
    the same rule as mdx-train's --class-balance)."""
    if power == 0:
        return torch.randperm(len(labels), generator=g)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = torch.from_numpy(counts[labels] ** -power)
    return torch.multinomial(weights, len(labels), replacement=True, generator=g)


# --- training and measuring -----------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) and features (N, D) in eval mode."""
    model.eval()
    outs = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    return (torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy())


def accuracy_report(predicted: np.ndarray, labels: np.ndarray, class_names) -> dict:
    """Overall accuracy, per-class accuracy (recall) and the per-class image counts."""
    per_class, counts = {}, {}
    for k, name in enumerate(class_names):
        mask = labels == k
        counts[name] = int(mask.sum())
        per_class[name] = float((predicted[mask] == k).mean()) if mask.any() else None
    return {"accuracy": float((predicted == labels).mean()), "per_class": per_class, "counts": counts,
            "balanced_accuracy": float(np.mean([v for v in per_class.values() if v is not None]))}


def _log(message: str) -> None:
    print(message, flush=True)  # progress shows up in a redirected log as it happens


def train_classifier(cfg: ClassifierConfig, log=_log) -> tuple[EmojiClassifier, dict]:
    """Train on the train split; return the model (eval mode) and the held-out report."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, image_size=cfg.image_size)
    train_idx, holdout_idx = split_indices(len(data), cfg.holdout_fraction, cfg.split_seed)
    x_train, y_train = to_model_input(data.images[train_idx]), torch.from_numpy(data.labels[train_idx])
    x_hold, y_hold = to_model_input(data.images[holdout_idx]), data.labels[holdout_idx]
    K = data.num_classes
    weights = class_weights(data.labels[train_idx], K, cfg.balance_power)
    log(f"emoji16: {len(train_idx)} train / {len(holdout_idx)} held-out images (split seed "
        f"{cfg.split_seed}, fraction {cfg.holdout_fraction}); class weights "
        + ", ".join(f"{n} {w:.2f}" for n, w in zip(data.class_names, weights.tolist())))

    model = EmojiClassifier(K, cfg.width, image_size=cfg.image_size)
    steps_per_epoch = -(-len(train_idx) // cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                    pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = epoch_order(data.labels[train_idx], K, cfg.class_balance, g)
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = augment(x_train[idx], cfg.max_shift, g, cfg.cutout, cfg.flip)
            logits, _ = model(x)
            loss = F.cross_entropy(logits, y_train[idx], weight=weights, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch + 1 == cfg.epochs:
            acc = accuracy_report(predict(model, x_hold)[0].argmax(1), y_hold, data.class_names)
            log(f"epoch {epoch + 1:3d}/{cfg.epochs}: loss {total / len(order):.4f}, held-out accuracy "
                f"{acc['accuracy']:.4f} (balanced {acc['balanced_accuracy']:.4f}), {time.perf_counter() - start:.0f} s")
    model.eval()
    report = accuracy_report(predict(model, x_hold)[0].argmax(1), y_hold, data.class_names)
    report["train_seconds"] = round(time.perf_counter() - start, 1)
    report["class_names"] = list(data.class_names)
    report["split"] = {"data": cfg.data, "holdout_fraction": cfg.holdout_fraction, "seed": cfg.split_seed,
                       "train": int(len(train_idx)), "holdout": int(len(holdout_idx))}
    return model, report
