"""mdx-eval: score samples with a small emoji16 classifier (ONNX Runtime and numpy, no torch).

    mdx-eval --model models/emoji16.onnx --sampler ddim --steps 25 --guidance 2 -n 900
    mdx-eval samples.npz                        # a file written by `mdx-sample --out samples.npz`

Three numbers, all in the classifier's terms (models/emoji16-classifier.onnx, trained by
`python -m mdx.export.classifier` on the train split `split_indices(N, 0.2, seed=0)`):

- FD: the Fréchet distance between Gaussians fitted to the classifier's penultimate-layer
  features (its `features` output) of the samples and of the real images. The real reference
  is the WHOLE emoji16 set, reweighted to the class mix of the samples: mdx-eval samples the
  classes evenly (image i gets class i mod K) while emoji16 is 60% people, and an even mix
  scored against the raw set would be far from it however good the model. The reference is
  the mixture of the per-class Gaussians with the samples' class shares as weights
  (unlabelled samples, label -1, count with the data's own class shares).
- floor: the FD a perfect sampler would get with as many images, i.e. the FD between two
  disjoint parts of the real data, computed exactly like the score: n real images drawn with
  the samples' class counts (at most half of any class) against a reference built from the
  other real images, reweighted to the same class mix; the mean over FLOOR_DRAWS draws.
  Part of any FD at finite n is estimation bias that shrinks like 1/n, so compare an FD with
  the floor for the same n (both are reported with their n).
- conditional accuracy: the share of class-conditioned samples (label >= 0) that the
  classifier assigns to the requested class, overall and per class. Read it against the
  classifier's own accuracy: 0.878 on the held-out split, but 0.705 averaged over classes
  (people 0.99 ... activities 0.27), and an even class mix weighs every class alike, so
  perfect novel samples would score about 0.70; reproductions of training images, about 0.98.

Why the whole set and not the held-out split as the reference: the held-out split has 37
activities images, too few for a class-matched reference; the diffusion models train on the
whole set; and the classifier's features of images it never saw are distributed nearly like
those of its training images (FD of the held-out split against the train split 0.40, of random
train parts of the same size, n = 1512, against the rest 0.17-0.31): a bias of about 0.1-0.2,
small next to the FDs that separate samplers (pure noise scores about 40).

Errors a user can cause (missing or corrupt files, an npz without images, n <= 0, a missing
classifier) end in one line `mdx-eval: error: ...` and exit code 2.
"""

from __future__ import annotations

import json
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from mdx.runtime import shipped
from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
from mdx.runtime.fileio import WriteError, write_text
from mdx.runtime.images import to_float
from mdx.runtime.metrics import (FLOOR_DRAWS, FLOOR_SEED, ClassMoments, EvalError, Gaussian,  # noqa: F401
                                 class_mixture, class_shares, fd_floor, fit_gaussian, frechet_distance,
                                 score_features)
from mdx.runtime.providers import COMPUTE_PRECISIONS
from mdx.runtime.samplers import SAMPLERS

# Both ship in the wheel and are found through mdx.runtime.shipped, never through the checkout.
DEFAULT_CLASSIFIER = shipped.classifier_path()  # with the models
DEFAULT_REAL = shipped.real_data_path()  # the emoji16 data set
PROG = "mdx-eval"


# --- the classifier -------------------------------------------------------------------------


def to_float_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]; float (N, 3, H, W) passes through."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        if images.ndim != 4:
            raise EvalError(f"uint8 images must be (N, H, W, C), got shape {images.shape}")
        return to_float(images)
    if images.dtype.kind == "f":
        if images.ndim != 4:
            raise EvalError(f"float images must be (N, C, H, W) in [-1, 1], got shape {images.shape}")
        return np.ascontiguousarray(images, dtype=np.float32)
    raise EvalError(f"images must be uint8 NHWC or float NCHW, got {images.dtype}")


class Classifier:
    """The ONNX classifier: input `images` (B, 3, H, W) in [-1, 1] -> `logits` (B, K), `features` (B, D).

    It always runs on the CPU provider: it is small, and CPU features are the same on every
    machine, so FDs from a GPU box and a laptop compare.
    """

    def __init__(self, path: str | Path = DEFAULT_CLASSIFIER, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise EvalError(f"classifier {path} not found" + (
                "; train it with `python -m mdx.export.classifier`" if path == DEFAULT_CLASSIFIER else ""))
        from mdx.runtime.session import ModelError, cpu_session

        try:
            self.session = cpu_session(path, threads)
        except ModelError as e:
            message = str(e).replace(f"cannot load {path}", f"cannot load classifier {path}", 1)
            if not message.startswith("cannot load classifier"):
                message = f"cannot load classifier {path}: {message}"
            raise EvalError(message) from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != ["images"] or not {"logits", "features"} <= set(outputs):
            raise EvalError(f"{path} is not an mdx classifier: inputs {inputs}, outputs {outputs}; "
                            "expected input images and outputs logits, features")
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.class_names = tuple(json.loads(meta["mdx.classes"]))
            self.image_size = int(meta["mdx.image_size"])
        except (KeyError, ValueError, TypeError) as e:
            raise EvalError(f"{path}: classifier metadata mdx.classes / mdx.image_size missing or bad ({e})") from None
        self.holdout_accuracy = float(meta.get("mdx.classifier.holdout_accuracy", "nan"))
        self.split = json.loads(meta.get("mdx.classifier.split", "null"))  # the data it was trained on
        self.holdout_report = json.loads(meta.get("mdx.classifier.holdout_report", "null"))
        self.path = path

    def features_and_logits(self, images: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Features (N, D) and logits (N, K), float32, for uint8 NHWC or float NCHW images."""
        x = to_float_nchw(images)
        want = (3, self.image_size, self.image_size)
        if x.shape[1:] != want or len(x) == 0:
            raise EvalError(f"the classifier takes images of shape (N, {want[1]}, {want[2]}, 3) uint8 "
                            f"or (N, 3, {want[1]}, {want[2]}) float, N >= 1; got {np.shape(images)}")
        features, logits = [], []
        for i in range(0, len(x), batch):
            lg, ft = self.session.run(["logits", "features"], {"images": x[i:i + batch]})
            logits.append(lg)
            features.append(ft)
        return np.concatenate(features), np.concatenate(logits)


# --- reading files --------------------------------------------------------------------------


def read_npz(path: str | Path, what: str) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{what} {path} does not exist")
    if not path.is_file():
        raise EvalError(f"{what} {path} is not a file")
    try:
        loaded = np.load(path, allow_pickle=False)  # no pickle: a file must not run code
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise EvalError(f"{what} {path} is not an .npz archive (a single .npy array?)")
        with loaded as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, EvalError):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"cannot read {what} {path}: not a readable .npz ({reason})") from None


def _check_images(images: np.ndarray, path: Path, image_size: int) -> np.ndarray:
    if images.ndim == 4 and len(images) == 0:
        raise EvalError(f"{path}: no images (shape {images.shape})")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise EvalError(f"{path}: images must be uint8 (N, {image_size}, {image_size}, 3), "
                        f"got {images.dtype} {images.shape}")
    return images


def load_samples(path: str | Path, class_names: tuple[str, ...], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`images` uint8 (N, H, W, 3) and `labels` int64 (N,) (-1: no single class) from an mdx-sample npz."""
    path = Path(path)
    arrays = read_npz(path, "samples file")
    if "images" not in arrays:
        raise EvalError(f"{path} has no 'images' array (it has {sorted(arrays) or 'nothing'}); "
                        "write one with mdx-sample --out FILE.npz")
    images = _check_images(arrays["images"], path, image_size)
    if len(images) < 2:
        raise EvalError(f"{path}: need at least 2 images for an FD, got {len(images)}")
    labels = arrays.get("labels")
    if labels is None:
        labels = np.full(len(images), -1, dtype=np.int64)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
        raise EvalError(f"{path}: labels must be integers (N,) = ({len(images)},), got {labels.dtype} {labels.shape}")
    K = len(class_names)
    if labels.size and (labels.min() < -1 or labels.max() >= K):
        raise EvalError(f"{path}: labels must lie in -1..{K - 1} (the classifier's classes "
                        f"{', '.join(class_names)}), got {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)


@dataclass(frozen=True)
class RealData:
    features: np.ndarray    # (N, D) float32
    labels: np.ndarray      # (N,) int64
    moments: ClassMoments   # of the features, per class
    path: Path


_REAL_CACHE: dict = {}


def real_reference(classifier: Classifier, path: str | Path = DEFAULT_REAL) -> RealData:
    """Classifier features of every real image (cached per classifier and file in this process)."""
    path = Path(path)
    arrays = read_npz(path, "real data")
    missing = {"images", "labels", "class_names"} - set(arrays)
    if missing:
        raise EvalError(f"real data {path} lacks {sorted(missing)}; it needs images, labels and class_names")
    names = tuple(str(c) for c in arrays["class_names"])
    if names != classifier.class_names:
        raise EvalError(f"real data {path} has classes {list(names)}, the classifier {list(classifier.class_names)}")
    images = _check_images(arrays["images"], path, classifier.image_size)
    if len(images) < 4:
        raise EvalError(f"real data {path}: need more than {len(images)} images for a reference")
    labels = arrays["labels"]
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= len(names):
        raise EvalError(f"real data {path}: labels must be (N,) integers in 0..{len(names) - 1}")
    key = (str(classifier.path.resolve()), classifier.path.stat().st_mtime_ns, str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _REAL_CACHE:
        features, _ = classifier.features_and_logits(images)
        _REAL_CACHE.clear()
        labels = labels.astype(np.int64)
        _REAL_CACHE[key] = RealData(features, labels, ClassMoments.of(features, labels, len(names)), path)
    return _REAL_CACHE[key]


# --- scoring --------------------------------------------------------------------------------


def score(images: np.ndarray, labels: np.ndarray, classifier: Classifier, real: RealData) -> dict:
    """FD, floor and conditional accuracy of (N, H, W, 3) uint8 images with labels (-1: none)."""
    features, logits = classifier.features_and_logits(images)
    result = score_features(features, logits, labels, real.features, real.labels, classifier.class_names,
                            real.moments)
    return {**result, "classifier": str(classifier.path), "classifier_holdout_accuracy": classifier.holdout_accuracy,
            "classifier_split": classifier.split, "real": str(real.path)}


def open_model(model: str | Path, provider: str, threads: int | None, class_names: tuple[str, ...] | None,
               compute_precision: str = "auto"):
    """The mdx ONNX model (a file or a shipped model's name) as an OnnxDenoiser; its classes must be
    the classifier's."""
    from mdx.runtime.api import Pipeline

    denoiser = Pipeline.load(model, provider=provider, threads=threads, compute_precision=compute_precision).denoiser
    if class_names is not None and tuple(denoiser.info.class_names) != tuple(class_names):
        raise EvalError(f"{model} has classes {list(denoiser.info.class_names)}, but the classifier scores "
                        f"{list(class_names)}; mdx-eval scores emoji16 models")
    return denoiser


def sample_with_model(model, *, sampler, steps, guidance, eta, seed, n, provider: str = "auto",
                      threads: int | None = None, class_names: tuple[str, ...] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """n images, image i of class i mod K, made exactly as `mdx-sample -n n --out X.npz` makes them
    (both go through mdx.runtime.Pipeline: the same defaults, one batch, uint8 rounding), so that
    both routes score the same.

    model: an OnnxDenoiser, or a path opened with `provider` and `threads` (and checked to have
    `class_names`, when given). Returns uint8 (n, H, W, C) images, int64 labels and the settings.
    """
    from mdx.runtime.api import Pipeline

    if isinstance(model, (str, Path)):
        model = open_model(model, provider, threads, class_names)
    out = Pipeline(model)(None, n=n, sampler=sampler, steps=steps, guidance=guidance, eta=eta, seed=seed)
    s = out.settings
    settings = {"model": str(out.model), "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
                "eta": s.eta, "seed": s.seed, "provider": out.provider, "compute_precision": out.compute_precision,
                "sampling_seconds": round(out.timings.total_seconds, 3)}
    return out.images, out.labels, settings


# --- the report -----------------------------------------------------------------------------


def format_report(result: dict) -> str:
    floor = result["floor"]
    rows = [("FD", f"{result['fd']:.3f}  (n = {result['n']} samples vs {result['reference_n']} real images, "
                   "classifier features)"),
            ("floor", f"{floor['fd']:.3f} ± {floor['std']:.3f}  (n = {floor['n']} real vs the other "
                      f"{floor['reference_n']}, mean of {floor['draws']} draws)")]
    if result["conditional_accuracy"] is None:
        rows.append(("cond. accuracy", f"-  (no class-conditioned samples)"))
    else:
        rows.append(("cond. accuracy", f"{result['conditional_accuracy']:.3f}  ({result['conditioned_n']} "
                                       f"class-conditioned samples; classifier held-out accuracy "
                                       f"{result['classifier_holdout_accuracy']:.3f})"))
        rows.append(("per class", ", ".join(f"{k} {v:.2f}" for k, v in result["per_class_accuracy"].items())))
    rows.append(("n", str(result["n"])))
    s = result.get("sampling")
    if s:
        rows.append(("sampler", f"{s['sampler']}, {s['steps']} steps, guidance {s['guidance']:g}, eta {s['eta']:g}, "
                                f"seed {s['seed']}, {s['provider']}"
                                + (f" ({s['compute_precision']})" if s.get("compute_precision") else "")))
    else:
        rows.append(("samples", result["samples"]))
    wall = result["seconds"]
    rows.append(("wall time", (f"sampling {wall['sampling']:.1f} s, " if "sampling" in wall else "")
                 + f"scoring {wall['scoring']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- the command ----------------------------------------------------------------------------


def _user_errors() -> tuple[type[Exception], ...]:
    from mdx.runtime.pipeline import PipelineError
    from mdx.runtime.samplers import SamplerError
    from mdx.runtime.schedules import ScheduleError
    from mdx.runtime.session import ModelError

    return (EvalError, ModelError, PipelineError, SamplerError, ScheduleError, WriteError)


def check_options(ctx: click.Context, samples, model, n: int, threads: int | None, json_out) -> None:
    """EvalError for option combinations and values no evaluation could use, before any work."""
    if (samples is None) == (model is None):
        raise EvalError("give either SAMPLES.npz or --model FILE" + (", not both" if samples else ""))
    given = [f"--{name.replace('_', '-')}" if name != "n" else "-n" for name in
             ("sampler", "steps", "guidance", "eta", "seed", "n", "provider", "compute_precision")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if samples is not None and given:
        raise EvalError(f"{', '.join(given)}: sampling options apply to --model, not to a samples file")
    if n < 2:
        raise EvalError(f"-n {n}: need at least 2 images for an FD")
    if threads is not None and threads < 1:
        raise EvalError(f"--threads {threads}: need at least 1 thread")
    if json_out is not None and not Path(json_out).resolve().parent.is_dir():
        raise EvalError(f"--json {json_out}: the folder {Path(json_out).resolve().parent} does not exist")


@click.command(cls=one_line_command(PROG, _user_errors), context_settings=CONTEXT_SETTINGS)
@click.argument("samples", required=False, metavar="[SAMPLES.npz]")
@click.option("--model", metavar="FILE|NAME", default=None,
              help="Sample this mdx ONNX model (a file, or a shipped model's name: emoji16, emoji16-int8, ...) "
                   "and score the samples.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="Sampler (default: the model's recommendation, else ddim).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's recommendation, else 25).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale (default: recommended, else 1).")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM noise scale (ddim only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("-n", "--num-images", "n", type=int, default=900, show_default=True,
              help="Images to sample, cycling through the classes (n/K each).")
@click.option("--provider", default="auto", show_default=True,
              help="Provider for the model: auto, cpu, cuda, openvino or an onnxruntime name.")
@click.option("--compute-precision", type=click.Choice(COMPUTE_PRECISIONS), default="auto", show_default=True,
              help="What OpenVINO computes in: auto = bf16 where the CPU has native bf16, else fp32.")
@click.option("--threads", type=int, default=None, help="CPU threads for onnxruntime.")
@click.option("--classifier", metavar="FILE", default=None, help="Classifier ONNX [the shipped emoji16-classifier].")
@click.option("--real", metavar="FILE.npz", default=None, help="Real images, labels, class_names [the shipped emoji16 data set].")
@click.option("--json", "json_out", metavar="OUT", default=None, help="Also write the results as JSON.")
def main(samples, model, sampler, steps, guidance, eta, seed, n, provider, compute_precision, threads, classifier,
         real, json_out):
    """Score samples: FD in the emoji16 classifier's feature space, its floor, conditional accuracy.

    Give SAMPLES.npz (from mdx-sample --out) or --model FILE (sampled here). No torch needed.
    """
    check_options(click.get_current_context(), samples, model, n, threads, json_out)
    clf = Classifier(classifier or DEFAULT_CLASSIFIER, threads=threads)
    # Bad samples files and models fail before the real features are computed.
    if samples is not None:
        images, labels = load_samples(samples, clf.class_names, clf.image_size)
    else:
        denoiser = open_model(model, provider, threads, clf.class_names, compute_precision)
    reference = real_reference(clf, real or DEFAULT_REAL)

    seconds = {}
    if model is not None:
        images, labels, settings = sample_with_model(denoiser, sampler=sampler, steps=steps, guidance=guidance,
                                                     eta=eta, seed=seed, n=n)
        seconds["sampling"] = settings.pop("sampling_seconds")
    start = time.perf_counter()
    result = score(images, labels, clf, reference)
    seconds["scoring"] = round(time.perf_counter() - start, 3)
    result["seconds"] = seconds
    if model is not None:
        result["sampling"] = settings
    else:
        result["samples"] = str(samples)
    click.echo(format_report(result))
    if json_out is not None:
        write_text(json_out, json.dumps(result, indent=2) + "\n")  # atomic; WriteError names the path
    return 0


if __name__ == "__main__":
    main()
