"""mdx-eval: score samples with a small emoji16 classifier (ONNX Runtime and numpy, no torch).

    mdx-eval --model models/emoji16.onnx --sampler ddim --steps 25 --guidance 2 -n 900
    mdx-eval samples.npz                        # a file written by `mdx-sample --out samples.npz`

Three numbers, all in the classifier's terms (models/emoji16-classifier.onnx, trained by
`python -m mdx.train.classifier` on the train split `split_indices(N, 0.2, seed=0)`):

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
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import click
from typing import NoReturn

from mdx.runtime.cli_common import CONTEXT_SETTINGS, fail, one_line_command
import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

from mdx.runtime.contract import resolve_settings
from mdx.runtime.samplers import SAMPLERS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLASSIFIER = REPO_ROOT / "models" / "emoji16-classifier.onnx"
DEFAULT_REAL = REPO_ROOT / "train" / "data" / "emoji16.npz"
FLOOR_DRAWS = 5
FLOOR_SEED = 0  # fixed: the floor is a property of the data, n and the class mix, not of --seed
CPU = "CPUExecutionProvider"
PROG = "mdx-eval"
# Errors onnxruntime raises for a file it cannot load (they derive from Exception only).
_ORT_LOAD_ERRORS = (_ort_errors.Fail, _ort_errors.InvalidProtobuf, _ort_errors.InvalidGraph,
                    _ort_errors.NoSuchFile, _ort_errors.InvalidArgument, _ort_errors.NotImplemented,
                    _ort_errors.RuntimeException)


class EvalError(ValueError):
    """A bad input to the evaluator; the message names the file or value and the problem."""


# --- the Fréchet distance ----------------------------------------------------------------


def _sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigendecomposition;
    tiny negative eigenvalues (round-off) are clipped to 0."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_gaussian(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise EvalError(f"{which}: mean must be (D,) and covariance (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvalError(f"{which}: mean or covariance is not finite")
    return mu, (sigma + sigma.T) / 2  # exactly symmetric for eigh


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

    (Dowson & Landau 1982; Heusel et al. 2017, Eq. 6). S1^1/2 S2 S1^1/2 is symmetric PSD and has
    the eigenvalues of S1 S2, so its trace-root is the usual tr sqrt(S1 S2) without scipy's
    non-symmetric sqrtm.
    """
    mu1, s1 = _check_gaussian(mu1, sigma1, "first Gaussian")
    mu2, s2 = _check_gaussian(mu2, sigma2, "second Gaussian")
    if mu1.shape != mu2.shape:
        raise EvalError(f"the Gaussians have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    root1 = _sqrtm_psd(s1)
    middle = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt
    return max(float(d2), 0.0)  # >= 0 in exact arithmetic; round-off can leave -1e-12


# --- Gaussians of features ----------------------------------------------------------------


@dataclass(frozen=True)
class Gaussian:
    mu: np.ndarray     # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int             # images it was fitted to


def fit_gaussian(features: np.ndarray) -> Gaussian:
    """Mean and covariance (ddof 1, as FID) of (N, D) features, N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise EvalError(f"need at least 2 feature vectors (N, D) to fit a Gaussian, got shape {x.shape}")
    return Gaussian(x.mean(axis=0), np.cov(x, rowvar=False), len(x))


@dataclass(frozen=True)
class ClassMoments:
    """Per-class sums of x and x x^T (float64), from which any class mixture's Gaussian follows.

    Kept as sums so that the moments of a part of a set are the set's minus the other part's:
    the floor's reference (all real images but n) costs n images of work, not N.
    """

    count: np.ndarray  # (K,)
    sum: np.ndarray    # (K, D)
    outer: np.ndarray  # (K, D, D)

    @classmethod
    def of(cls, features: np.ndarray, labels: np.ndarray, K: int) -> "ClassMoments":
        x = np.asarray(features, dtype=np.float64)
        D = x.shape[1]
        count, total, outer = np.zeros(K), np.zeros((K, D)), np.zeros((K, D, D))
        for k in range(K):
            xk = x[labels == k]
            count[k], total[k], outer[k] = len(xk), xk.sum(axis=0), xk.T @ xk
        return cls(count, total, outer)

    def __sub__(self, other: "ClassMoments") -> "ClassMoments":
        return ClassMoments(self.count - other.count, self.sum - other.sum, self.outer - other.outer)

    def mixture(self, weights: np.ndarray) -> Gaussian:
        """The moment-matched Gaussian of the class mixture in which class k has weight weights[k]:

        mu = sum_k w_k mu_k;  sigma = sum_k w_k E_k[x x^T] - mu mu^T
        (with the data's own class shares: the ddof-0 covariance of all images).
        """
        needed = np.flatnonzero((np.asarray(weights) > 0) & (self.count == 0))
        if len(needed):
            raise EvalError(f"the real data has no images of class {needed[0]}, which the samples need")
        w = np.where(self.count > 0, weights / np.maximum(self.count, 1), 0.0)  # weight per image
        mu = w @ self.sum
        second = np.tensordot(w, self.outer, axes=1)
        return Gaussian(mu, second - np.outer(mu, mu), int(self.count.sum()))


def class_mixture(features: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> Gaussian:
    """The Gaussian of the images reweighted so that class k has total weight weights[k]."""
    return ClassMoments.of(features, labels, len(weights)).mixture(np.asarray(weights, dtype=np.float64))


def class_shares(sample_labels: np.ndarray, real_labels: np.ndarray, K: int) -> np.ndarray:
    """The class mix of the samples: labelled ones by their label, unlabelled (-1) ones with the
    real data's shares."""
    natural = np.bincount(real_labels, minlength=K) / len(real_labels)
    counts = np.bincount(sample_labels[sample_labels >= 0], minlength=K).astype(np.float64)
    shares = counts + (sample_labels < 0).sum() * natural
    return shares / shares.sum()


def _floor_counts(shares: np.ndarray, n: int, real_counts: np.ndarray) -> np.ndarray:
    """n images split by `shares` (largest remainder), each class capped at half its real images."""
    exact = shares * n
    counts = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    return np.minimum(counts, real_counts // 2)


def fd_floor(real_features: np.ndarray, real_labels: np.ndarray, shares: np.ndarray, n: int,
             draws: int = FLOOR_DRAWS, seed: int = FLOOR_SEED, moments: ClassMoments | None = None) -> dict:
    """The FD of n real images (the samples' class mix, at most half of any class) against a
    reference of the other real images reweighted to that mix; mean and std over `draws`.
    `moments`: ClassMoments of all the real images, if already computed."""
    K = len(shares)
    shares = np.asarray(shares, dtype=np.float64)
    counts = _floor_counts(shares, n, np.bincount(real_labels, minlength=K))
    whole = moments if moments is not None else ClassMoments.of(real_features, real_labels, K)
    values = []
    for r in range(draws):
        rng = np.random.default_rng(seed + r)
        part = np.concatenate([rng.choice(np.flatnonzero(real_labels == k), size=counts[k], replace=False)
                               for k in range(K)])
        a = fit_gaussian(real_features[part])
        b = (whole - ClassMoments.of(real_features[part], real_labels[part], K)).mixture(shares)
        values.append(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))
    return {"fd": float(np.mean(values)), "std": float(np.std(values)), "n": int(counts.sum()),
            "reference_n": int(len(real_labels) - counts.sum()), "draws": draws}


# --- the classifier -------------------------------------------------------------------------


def to_float_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]; float (N, 3, H, W) passes through."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        if images.ndim != 4:
            raise EvalError(f"uint8 images must be (N, H, W, C), got shape {images.shape}")
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - 1.0
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
                "; train it with `python -m mdx.train.classifier`" if path == DEFAULT_CLASSIFIER else ""))
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
        except _ORT_LOAD_ERRORS as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EvalError(f"cannot load classifier {path}: {first}") from None
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
    K = len(classifier.class_names)
    features, logits = classifier.features_and_logits(images)
    predicted = logits.argmax(axis=1)
    shares = class_shares(labels, real.labels, K)
    samples = fit_gaussian(features)
    reference = real.moments.mixture(shares)
    conditioned = labels >= 0
    per_class = {name: float((predicted[labels == k] == k).mean()) for k, name in enumerate(classifier.class_names)
                 if (labels == k).any()}
    return {
        "fd": frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma),
        "floor": fd_floor(real.features, real.labels, shares, len(images), moments=real.moments),
        "n": int(len(images)),
        "reference_n": int(len(real.labels)),
        "conditional_accuracy": float((predicted[conditioned] == labels[conditioned]).mean()) if conditioned.any() else None,
        "conditioned_n": int(conditioned.sum()),
        "per_class_accuracy": per_class,
        "predicted_shares": {name: float((predicted == k).mean()) for k, name in enumerate(classifier.class_names)},
        "class_shares": {name: float(s) for name, s in zip(classifier.class_names, shares)},
        "classifier": str(classifier.path),
        "classifier_holdout_accuracy": classifier.holdout_accuracy,
        "classifier_split": classifier.split,
        "real": str(real.path),
    }


def open_model(model: str | Path, provider: str, threads: int | None, class_names: tuple[str, ...] | None):
    """The mdx ONNX model as an OnnxDenoiser; its classes must be the classifier's."""
    from mdx.runtime.session import OnnxDenoiser

    denoiser = OnnxDenoiser.load(model, provider=provider, threads=threads)
    if class_names is not None and tuple(denoiser.info.class_names) != tuple(class_names):
        raise EvalError(f"{model} has classes {list(denoiser.info.class_names)}, but the classifier scores "
                        f"{list(class_names)}; mdx-eval scores emoji16 models")
    return denoiser


def sample_with_model(model, *, sampler, steps, guidance, eta, seed, n, provider: str = "auto",
                      threads: int | None = None, class_names: tuple[str, ...] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """n images, image i of class i mod K, made exactly as `mdx-sample -n n --out X.npz` makes them
    (the same defaults, one batch, uint8 rounding), so that both routes score the same.

    model: an OnnxDenoiser, or a path opened with `provider` and `threads` (and checked to have
    `class_names`, when given). Returns uint8 (n, H, W, C) images, int64 labels and the settings.
    """
    from mdx.runtime.images import to_uint8
    from mdx.runtime.pipeline import build_context, generate

    if isinstance(model, (str, Path)):
        model = open_model(model, provider, threads, class_names)
    denoiser = model
    info = denoiser.info
    resolved = resolve_settings(info, sampler, steps, guidance)
    sampler, steps, guidance = resolved.sampler, resolved.steps, resolved.guidance
    context, labels = build_context(info.class_names, None, False, n)
    result = generate(denoiser, sampler=sampler, steps=steps, n=n, context=context, guidance=guidance,
                      eta=eta, seed=seed, sampler_options=resolved.sampler_options)
    settings = {"model": str(info.path), "sampler": sampler, "steps": steps, "guidance": guidance, "eta": eta,
                "seed": seed, "provider": denoiser.provider, "sampling_seconds": round(result.total_seconds, 3)}
    return to_uint8(result.samples), labels, settings


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
                                f"seed {s['seed']}, {s['provider']}"))
    else:
        rows.append(("samples", result["samples"]))
    wall = result["seconds"]
    rows.append(("wall time", (f"sampling {wall['sampling']:.1f} s, " if "sampling" in wall else "")
                 + f"scoring {wall['scoring']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- the command ----------------------------------------------------------------------------


def _fail(message: str, code: int = 2) -> NoReturn:
    fail(PROG, message, code)


def _user_errors() -> tuple[type[Exception], ...]:
    from mdx.runtime.pipeline import PipelineError
    from mdx.runtime.samplers import SamplerError
    from mdx.runtime.schedules import ScheduleError
    from mdx.runtime.session import ModelError

    return (EvalError, ModelError, PipelineError, SamplerError, ScheduleError)


@click.command(cls=one_line_command(PROG, _user_errors), context_settings=CONTEXT_SETTINGS)
@click.argument("samples", required=False, metavar="[SAMPLES.npz]")
@click.option("--model", metavar="FILE", default=None, help="Sample this mdx ONNX model and score the samples.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="Sampler (default: the model's recommendation, else ddim).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's recommendation, else 25).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale (default: recommended, else 1).")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM noise scale (ddim only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("-n", "--num-images", "n", type=int, default=900, show_default=True,
              help="Images to sample, cycling through the classes (n/K each).")
@click.option("--provider", default="auto", show_default=True, help="onnxruntime provider for the model.")
@click.option("--threads", type=int, default=None, help="CPU threads for onnxruntime.")
@click.option("--classifier", metavar="FILE", default=None, help="Classifier ONNX [models/emoji16-classifier.onnx].")
@click.option("--real", metavar="FILE.npz", default=None, help="Real images, labels, class_names [train/data/emoji16.npz].")
@click.option("--json", "json_out", metavar="OUT", default=None, help="Also write the results as JSON.")
def main(samples, model, sampler, steps, guidance, eta, seed, n, provider, threads, classifier, real, json_out):
    """Score samples: FD in the emoji16 classifier's feature space, its floor, conditional accuracy.

    Give SAMPLES.npz (from mdx-sample --out) or --model FILE (sampled here). No torch needed.
    """
    if (samples is None) == (model is None):
        raise EvalError("give either SAMPLES.npz or --model FILE" + (", not both" if samples else ""))
    ctx = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" if name != "n" else "-n" for name in
             ("sampler", "steps", "guidance", "eta", "seed", "n", "provider")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if samples is not None and given:
        raise EvalError(f"{', '.join(given)}: sampling options apply to --model, not to a samples file")
    if n < 2:
        raise EvalError(f"-n {n}: need at least 2 images for an FD")
    if threads is not None and threads < 1:
        raise EvalError(f"--threads {threads}: need at least 1 thread")
    if json_out is not None and not Path(json_out).resolve().parent.is_dir():
        raise EvalError(f"--json {json_out}: the folder {Path(json_out).resolve().parent} does not exist")
    clf = Classifier(classifier or DEFAULT_CLASSIFIER, threads=threads)
    # Bad samples files and models fail before the real features are computed.
    if samples is not None:
        images, labels = load_samples(samples, clf.class_names, clf.image_size)
    else:
        denoiser = open_model(model, provider, threads, clf.class_names)
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
        try:
            Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise EvalError(f"cannot write {json_out}: {e.strerror}") from None
    return 0


if __name__ == "__main__":
    main()
