"""The numbers mdx-eval reports, from classifier features: Fréchet distance, its floor and
conditional accuracy (numpy only, no files, no sessions; the CLI is `mdx.runtime.evaluate`).

FD is the Fréchet distance between Gaussians fitted to the features of the samples and of the
real images, the real reference reweighted to the samples' class mix (`ClassMoments.mixture`);
the floor is the FD that as many real images get against the other real ones, computed the same
way (`fd_floor`). `mdx.runtime.evaluate`'s docstring explains why each is measured so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

FLOOR_DRAWS = 5
FLOOR_SEED = 0  # fixed: the floor is a property of the data, n and the class mix, not of --seed


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


def score_features(features: np.ndarray, logits: np.ndarray, labels: np.ndarray, real_features: np.ndarray,
                   real_labels: np.ndarray, class_names: Sequence[str],
                   real_moments: ClassMoments | None = None) -> dict:
    """FD, floor and conditional accuracy of samples given their classifier features (N, D),
    logits (N, K) and labels (N,) (-1: no single class), against the real images' features."""
    K = len(class_names)
    if real_moments is None:
        real_moments = ClassMoments.of(real_features, real_labels, K)
    predicted = logits.argmax(axis=1)
    shares = class_shares(labels, real_labels, K)
    samples = fit_gaussian(features)
    reference = real_moments.mixture(shares)
    conditioned = labels >= 0
    per_class = {name: float((predicted[labels == k] == k).mean()) for k, name in enumerate(class_names)
                 if (labels == k).any()}
    accuracy = float((predicted[conditioned] == labels[conditioned]).mean()) if conditioned.any() else None
    return {
        "fd": frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma),
        "floor": fd_floor(real_features, real_labels, shares, len(features), moments=real_moments),
        "n": int(len(features)),
        "reference_n": int(len(real_labels)),
        "conditional_accuracy": accuracy,
        "conditioned_n": int(conditioned.sum()),
        "per_class_accuracy": per_class,
        "predicted_shares": {name: float((predicted == k).mean()) for k, name in enumerate(class_names)},
        "class_shares": {name: float(s) for name, s in zip(class_names, shares)},
    }
