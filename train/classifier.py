"""The emoji16 classifier behind mdx-eval: a small CNN whose penultimate layer is the feature
space for the Fréchet distance and whose logits give the conditional accuracy.

    python -m mdx.train.classifier --epochs 60 --seed 0 --out models/emoji16-classifier.onnx

(about 5-10 minutes on one CPU thread; 0.878 held-out accuracy, 0.705 averaged over classes).

Training uses the TRAIN part of a fixed split, `split_indices(N, 0.2, seed=0)` (the same call
the evaluator documents), so the held-out accuracy written into the model is measured on
images the classifier never saw. emoji16 is very unbalanced (people is 60% of it,
activities 2%), so the loss weights each class by (1 / frequency) ** balance_power (0.5 by
default: rare classes are learned without sacrificing the common ones). The rare classes are
where it overfits (98% train vs 86% held-out accuracy with flips and shifts alone), hence:
horizontal flips, translations of up to 2 pixels, a white 4x4 cutout on half the images,
AdamW weight decay 0.05 and dropout before the last layer.

The ONNX file (opset 17, weights embedded, dynamic batch) has one input `images` float32
(B, 3, 16, 16) in [-1, 1] and two outputs `logits` (B, K) and `features` (B, D), and
metadata_props `mdx.classifier.*` that say what it is and how well it does.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdx.train.data import EMOJI16_PATH, DataError, load_data, split_indices

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "models" / "emoji16-classifier.onnx"
INPUT_NAME, OUTPUT_NAMES = "images", ("logits", "features")
FORMAT = "1"
PARITY_ATOL = 1e-4  # ONNX Runtime vs torch, on logits and features (float32, same graph)


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
    max_shift: int = 2             # translation augmentation, pixels
    cutout: int = 4                # side of the white square painted over half the images
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
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def augment(x: torch.Tensor, max_shift: int, g: torch.Generator, cutout: int = 0) -> torch.Tensor:
    """Per-image random horizontal flip, translation by up to max_shift pixels (edges replicated),
    and, for half the images, a cutout x cutout square painted white (the emoji background)."""
    B, C, H, W = x.shape
    flip = torch.rand(B, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
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
        order = torch.randperm(len(train_idx), generator=g)
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = augment(x_train[idx], cfg.max_shift, g, cfg.cutout)
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


# --- export ---------------------------------------------------------------------------------


class _Exported(nn.Module):
    """The eval-mode model with its two outputs named in order (logits, features)."""

    def __init__(self, model: EmojiClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        logits, features = self.model(images)
        return logits, features


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_onnx(model: EmojiClassifier, cfg: ClassifierConfig, report: dict, out: Path, command: str) -> dict:
    """Write the ONNX file (atomically) with metadata; check ORT against torch; return the parity figures."""
    import onnx
    import onnxruntime as ort

    model.eval()
    size = cfg.image_size
    example = (torch.zeros(2, 3, size, size),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Exported(model), example, str(raw), dynamo=True, opset_version=17,
                              external_data=False, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_shapes={"images": {0: batch}}, verbose=False)
        proto = onnx.load(str(raw))
        opset = {o.domain: o.version for o in proto.opset_import}.get("", 0)
        if opset != 17:
            raise RuntimeError(f"the exported classifier has opset {opset}, not 17")
        meta = {
            "mdx.classifier.format": FORMAT,
            "mdx.classes": json.dumps(report["class_names"]),
            "mdx.image_size": str(size),
            "mdx.channels": "3",
            "mdx.classifier.input": "images float32 (B, 3, H, W) in [-1, 1]",
            "mdx.classifier.feature_dim": str(model.feature_dim),
            "mdx.classifier.holdout_accuracy": f"{report['accuracy']:.4f}",
            "mdx.classifier.holdout_report": json.dumps({k: report[k] for k in
                                                         ("accuracy", "balanced_accuracy", "per_class", "counts")}),
            "mdx.classifier.split": json.dumps(report["split"]),
            "mdx.classifier.data_sha256": _sha256(EMOJI16_PATH) if cfg.data == "emoji16" else "",
            "mdx.classifier.train_config": json.dumps(asdict(cfg)),
            "mdx.classifier.train_command": command,
            "mdx.classifier.train_seconds": str(report["train_seconds"]),
        }
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = "emoji16 classifier for mdx-eval: logits for the classes, features for the FD"
        onnx.checker.check_model(proto, full_check=True)
        final_tmp = Path(tmp) / "final.onnx"
        onnx.save(proto, str(final_tmp))

        # Parity: ONNX Runtime vs torch on real images, at a batch size other than the example's.
        data = load_data(cfg.data, image_size=size)
        x = to_model_input(data.images[:257])
        want_logits, want_features = predict(model, x)
        session = ort.InferenceSession(str(final_tmp), providers=["CPUExecutionProvider"])
        got_logits, got_features = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        parity = {"logits_max_abs": float(np.abs(got_logits - want_logits).max()),
                  "features_max_abs": float(np.abs(got_features - want_features).max()), "atol": PARITY_ATOL}
        if max(parity["logits_max_abs"], parity["features_max_abs"]) > PARITY_ATOL:
            raise RuntimeError(f"ONNX Runtime and torch disagree beyond {PARITY_ATOL}: {parity}")
        final_tmp.replace(out)
    return parity


# --- command line ---------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--epochs", type=click.IntRange(min=1), default=ClassifierConfig.epochs, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=ClassifierConfig.seed, show_default=True,
              help="Weights, batch order and augmentation (the split is fixed: seed 0, fraction 0.2).")
@click.option("--width", type=click.IntRange(min=4), default=ClassifierConfig.width, show_default=True,
              help="Channels of the first block; the feature layer has 4 * width dimensions.")
@click.option("--balance-power", type=click.FloatRange(0, 1), default=ClassifierConfig.balance_power,
              show_default=True, help="Class weights (1 / frequency) ** power: 0 none, 1 fully balanced.")
@click.option("--threads", type=click.IntRange(min=1), default=ClassifierConfig.threads, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
def main(epochs, seed, width, balance_power, threads, out):
    """Train the emoji16 classifier used by mdx-eval and export it to ONNX."""
    cfg = ClassifierConfig(epochs=epochs, seed=seed, width=width, balance_power=balance_power, threads=threads)
    command = "python -m mdx.train.classifier " + " ".join(
        shlex.quote(a) for a in ["--epochs", str(epochs), "--seed", str(seed), "--width", str(width),
                                 "--balance-power", str(balance_power)])
    try:
        model, report = train_classifier(cfg)
    except DataError as e:
        click.echo(f"mdx.train.classifier: error: {e}", err=True)
        sys.exit(2)
    parity = export_onnx(model, cfg, report, out, command)
    params = sum(p.numel() for p in model.parameters())
    print(f"held-out accuracy {report['accuracy']:.4f} (balanced {report['balanced_accuracy']:.4f}) on "
          f"{report['split']['holdout']} images; per class:")
    for name, acc in report["per_class"].items():
        print(f"  {name:<10} {acc:.4f}  ({report['counts'][name]} images)")
    print(f"{params} parameters, features {model.feature_dim}-d, trained in {report['train_seconds']} s")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); ORT vs torch max |diff| logits "
          f"{parity['logits_max_abs']:.2e}, features {parity['features_max_abs']:.2e}")


if __name__ == "__main__":
    main()
