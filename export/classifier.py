"""Train the emoji16 classifier behind mdx-eval (mdx.train.classifier) and export it to ONNX.

    python -m mdx.export.classifier --epochs 60 --seed 0 --out models/emoji16-classifier.onnx

(about 5-10 minutes on one CPU thread; 0.878 held-out accuracy, 0.705 averaged over classes).

The ONNX file (opset 17, weights embedded, dynamic batch) has one input `images` float32
(B, 3, 16, 16) in [-1, 1] and two outputs `logits` (B, K) and `features` (B, D), and
metadata_props `mdx.classifier.*` that say what it is and how well it does. It is made with
the exporter's pieces (onnx_export's quiet dynamo export and opset check, fileio's atomic
write): nothing is left at --out unless ONNX Runtime matches torch on real images.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
from dataclasses import asdict
from pathlib import Path

import click
import numpy as np
import onnx
import torch

from mdx.export.onnx_export import ExportFailure, _quiet, _tail
from mdx.export.validate import onnx_opset
from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
from mdx.runtime.fileio import WriteError, atomic_write, write_error
from mdx.train.classifier import (ClassifierConfig, EmojiClassifier, predict, to_model_input,
                                  train_classifier)
from mdx.train.data import EMOJI16_PATH, DataError, load_data

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "models" / "emoji16-classifier.onnx"
INPUT_NAME, OUTPUT_NAMES = "images", ("logits", "features")
FORMAT = "1"
OPSET = 17
PARITY_ATOL = 1e-4  # ONNX Runtime vs torch, on logits and features (float32, same graph)
PARITY_IMAGES = 257  # real images, a batch size other than the traced one


class _Exported(torch.nn.Module):
    """The eval-mode model with its two outputs named in order (logits, features)."""

    def __init__(self, model: EmojiClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        logits, features = self.model(images)
        return logits, features


def classifier_to_onnx(model: EmojiClassifier, image_size: int) -> onnx.ModelProto:
    """The dynamo export at opset 17 with a dynamic batch; ExportFailure (with the exporter's last words) otherwise."""
    model.eval()
    example = (torch.zeros(2, 3, image_size, image_size),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    held = io.StringIO()
    try:
        with _quiet(held), torch.no_grad():
            program = torch.onnx.export(_Exported(model), example, None, dynamo=True, opset_version=OPSET,
                                        external_data=False, input_names=[INPUT_NAME],
                                        output_names=list(OUTPUT_NAMES), dynamic_shapes={"images": {0: batch}},
                                        verbose=False)
    except Exception as e:  # noqa: BLE001 - reported in one line with the exporter's output
        raise ExportFailure(f"classifier export failed: {type(e).__name__}: {_tail(str(e) or held.getvalue(), 1)}") from None
    proto = program.model_proto
    if onnx_opset(proto) != OPSET:
        raise ExportFailure(f"the exported classifier has opset {onnx_opset(proto)}, not {OPSET}")
    return proto


def classifier_metadata(model: EmojiClassifier, cfg: ClassifierConfig, report: dict, command: str) -> dict[str, str]:
    """What the file says about itself: classes, sizes, the held-out figures and how it was trained."""
    data_sha256 = hashlib.sha256(EMOJI16_PATH.read_bytes()).hexdigest() if cfg.data == "emoji16" else ""
    return {
        "mdx.classifier.format": FORMAT,
        "mdx.classes": json.dumps(report["class_names"]),
        "mdx.image_size": str(cfg.image_size),
        "mdx.channels": "3",
        "mdx.classifier.input": "images float32 (B, 3, H, W) in [-1, 1]",
        "mdx.classifier.feature_dim": str(model.feature_dim),
        "mdx.classifier.holdout_accuracy": f"{report['accuracy']:.4f}",
        "mdx.classifier.holdout_report": json.dumps({k: report[k] for k in
                                                     ("accuracy", "balanced_accuracy", "per_class", "counts")}),
        "mdx.classifier.split": json.dumps(report["split"]),
        "mdx.classifier.data_sha256": data_sha256,
        "mdx.classifier.train_config": json.dumps(asdict(cfg)),
        "mdx.classifier.train_command": command,
        "mdx.classifier.train_seconds": str(report["train_seconds"]),
    }


def check_parity(path: Path, model: EmojiClassifier, cfg: ClassifierConfig) -> dict:
    """ONNX Runtime against torch on real images; ExportFailure beyond PARITY_ATOL."""
    import onnxruntime as ort

    x = to_model_input(load_data(cfg.data, image_size=cfg.image_size).images[:PARITY_IMAGES])
    want_logits, want_features = predict(model, x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_logits, got_features = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    parity = {"logits_max_abs": float(np.abs(got_logits - want_logits).max()),
              "features_max_abs": float(np.abs(got_features - want_features).max()), "atol": PARITY_ATOL}
    if max(parity["logits_max_abs"], parity["features_max_abs"]) > PARITY_ATOL:
        raise ExportFailure(f"ONNX Runtime and torch disagree beyond {PARITY_ATOL}: {parity}")
    return parity


def export_classifier(model: EmojiClassifier, cfg: ClassifierConfig, report: dict, out: Path, command: str) -> dict:
    """Write the ONNX file (atomically) with its metadata once ORT matches torch; return the parity figures."""
    proto = classifier_to_onnx(model, cfg.image_size)
    del proto.metadata_props[:]
    for key, value in classifier_metadata(model, cfg, report, command).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "emoji16 classifier for mdx-eval: logits for the classes, features for the FD"
    onnx.checker.check_model(proto, full_check=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from None
    with atomic_write(out, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
        return check_parity(tmp, model, cfg)


# --- command line ---------------------------------------------------------------------------


def _print_summary(model: EmojiClassifier, report: dict, out: Path, parity: dict) -> None:
    params = sum(p.numel() for p in model.parameters())
    print(f"held-out accuracy {report['accuracy']:.4f} (balanced {report['balanced_accuracy']:.4f}) on "
          f"{report['split']['holdout']} images; per class:")
    for name, acc in report["per_class"].items():
        print(f"  {name:<10} {acc:.4f}  ({report['counts'][name]} images)")
    print(f"{params} parameters, features {model.feature_dim}-d, trained in {report['train_seconds']} s")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); ORT vs torch max |diff| logits "
          f"{parity['logits_max_abs']:.2e}, features {parity['features_max_abs']:.2e}")


@click.command(cls=one_line_command("mdx.export.classifier", (DataError, WriteError), failures=(ExportFailure,)),
               context_settings=CONTEXT_SETTINGS)
@click.option("--epochs", type=click.IntRange(min=1), default=ClassifierConfig.epochs, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=ClassifierConfig.seed, show_default=True,
              help="Weights, batch order and augmentation (the split is fixed: seed 0, fraction 0.2).")
@click.option("--width", type=click.IntRange(min=4), default=ClassifierConfig.width, show_default=True,
              help="Channels of the first block; the feature layer has 4 * width dimensions.")
@click.option("--balance-power", type=click.FloatRange(0, 1), default=ClassifierConfig.balance_power,
              show_default=True, help="Class weights in the loss, (1 / frequency) ** power: 0 none, 1 fully balanced.")
@click.option("--class-balance", type=click.FloatRange(0, 1), default=ClassifierConfig.class_balance,
              show_default=True, help="Class-balanced sampling: an image is drawn with weight (1 / class size) "
              "** power (0: each image once per epoch; 1: every class alike). Combine with --balance-power 0.")
@click.option("--max-shift", type=click.IntRange(0, 8), default=ClassifierConfig.max_shift, show_default=True,
              help="Augmentation: random translations of up to this many pixels (0: none).")
@click.option("--cutout", type=click.IntRange(0, 16), default=ClassifierConfig.cutout, show_default=True,
              help="Augmentation: side of the white square painted over half the images (0: none).")
@click.option("--flip/--no-flip", default=ClassifierConfig.flip, show_default=True,
              help="Augmentation: random horizontal flips.")
@click.option("--threads", type=click.IntRange(min=1), default=ClassifierConfig.threads, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
def main(epochs, seed, width, balance_power, class_balance, max_shift, cutout, flip, threads, out):
    """Train the emoji16 classifier used by mdx-eval and export it to ONNX."""
    cfg = ClassifierConfig(epochs=epochs, seed=seed, width=width, balance_power=balance_power,
                           class_balance=class_balance, max_shift=max_shift, cutout=cutout, flip=flip,
                           threads=threads)
    model, report = train_classifier(cfg)
    parity = export_classifier(model, cfg, report, out, training_command(cfg))
    _print_summary(model, report, out, parity)


def training_command(cfg: ClassifierConfig) -> str:
    """The command line that trains cfg again (every option that changes the weights; not --threads, --out)."""
    args = ["--epochs", str(cfg.epochs), "--seed", str(cfg.seed), "--width", str(cfg.width),
            "--balance-power", str(cfg.balance_power)]
    # The options added later are written only when not at their defaults, so an older file's
    # command and a new one that trains the same model read alike.
    defaults = ClassifierConfig()
    for flag, name in (("--class-balance", "class_balance"), ("--max-shift", "max_shift"), ("--cutout", "cutout")):
        if getattr(cfg, name) != getattr(defaults, name):
            args += [flag, str(getattr(cfg, name))]
    if not cfg.flip:
        args.append("--no-flip")
    return "python -m mdx.export.classifier " + " ".join(shlex.quote(a) for a in args)


if __name__ == "__main__":
    main()
