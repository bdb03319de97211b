"""The Python API: load a model once, then sample it with a call.

    from mdx.runtime import Pipeline

    pipe = Pipeline.load("emoji16", provider="auto")   # a shipped model's name or a path to a contract .onnx
    out = pipe(classes=["food"], n=4, steps=20, guidance=5.0, seed=0)
    out.images       # uint8 (n, H, W, C)
    out.samples      # float32 (n, C, H, W) in [-1, 1]
    out.save("food.png")                               # a grid; an .npz or a folder, as mdx-sample writes them

Every setting left out is the model's recommendation (`mdx.recommended`, resolved by
`mdx.runtime.contract.resolve_settings`, as every command resolves it). mdx-sample, mdx-eval
and mdx-ui are thin layers over this class, so the same settings give the same images from
Python and from the command line.

`classes` says what each image is conditioned on:

    None or []              the grid: image i gets class i mod K (one class per column)
    "food", 3               one class, by name or index, for every image
    ["food", "animals"]     those classes mixed (multi-hot), for every image, as repeated --class
    np.ndarray (K,)         class weights for every image (a mix; all zeros: unconditional)
    np.ndarray (n, K)       class weights per image (n is then its number of rows)

and `unconditional=True` samples without a class (an all-zero context). Errors a caller can
cause raise the exceptions in `ERRORS`, with a message that names the bad value and what is
allowed; the commands print that message as their one-line error.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

from mdx.runtime.contract import ModelError, ModelInfo, resolve_settings
from mdx.runtime.images import (OutputError, check_writable, grid_columns, output_kind, save_folder, save_gif,
                                save_grid_png, save_npz, to_uint8)
from mdx.runtime.pipeline import PipelineError, build_context, generate, prepare_sampler
from mdx.runtime.samplers import SamplerError
from mdx.runtime.schedules import ScheduleError
from mdx.runtime.shipped import resolve_model
from mdx.runtime.fileio import WriteError

__all__ = ["ERRORS", "Output", "Pipeline", "Request", "SamplingSettings", "Timings", "ClassSpec", "StepCallback"]

MAX_DEFAULT_N = 64  # the grid's default size: 2 images per class, at most this many
ERRORS: tuple[type[Exception], ...] = (ModelError, PipelineError, SamplerError, ScheduleError, OutputError,
                                       WriteError)

ClassSpec = Union[None, str, int, Sequence[Union[str, int]], np.ndarray]
StepCallback = Callable[[int, int, np.ndarray], None]  # (step 1..total, total, predicted x_0 (n, C, H, W))


# --- results --------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """What a call sampled with, after the model's recommendations filled in the gaps."""

    sampler: str
    steps: int
    guidance: float
    eta: float
    seed: int
    n: int
    sampler_options: dict
    classes: str  # what the images are conditioned on, in words ("all 9 classes", "class food", ...)
    unconditional: bool
    notes: tuple[str, ...] = ()  # recommended values that could not be used, and why

    def as_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance, "eta": self.eta,
                "seed": self.seed, "n": self.n, "sampler_options": dict(self.sampler_options),
                "classes": self.classes}


@dataclass(frozen=True)
class Request:
    """A checked request: what each image is conditioned on, and the settings (`Pipeline.request`)."""

    context: np.ndarray  # (n, K) float32 class weights
    labels: np.ndarray  # (n,) int64, -1 for a mix or unconditional
    settings: SamplingSettings


@dataclass(frozen=True)
class Timings:
    total_seconds: float  # the sampling loop, model calls included
    model_seconds: float  # inside the model calls (with host <-> device copies)


@dataclass(frozen=True)
class Output:
    """Samples with their labels and settings; `save` writes them as mdx-sample does."""

    samples: np.ndarray  # (n, C, H, W) float32 in [-1, 1]
    labels: np.ndarray  # (n,) int64: the class of each image, -1 for a mix or unconditional
    context: np.ndarray  # (n, K) float32: the class weights each image was sampled with
    class_names: tuple[str, ...]
    settings: SamplingSettings
    timings: Timings
    provider: str  # the onnxruntime provider that really ran
    model: Path
    x0_frames: list[np.ndarray] | None = field(default=None, repr=False)  # per step, with record_x0=True
    compute_precision: str | None = None  # what the provider computed in (e.g. OpenVINO's bf16)

    @functools.cached_property
    def images(self) -> np.ndarray:
        """(n, H, W, C) uint8, rounded to nearest (the pixels every writer writes)."""
        return to_uint8(self.samples)

    @property
    def columns(self) -> int:
        """The grid's width: K when the images cycle through the K classes, else about square."""
        return grid_columns(len(self.samples), len(self.class_names))

    def save(self, path: str | os.PathLike, *, scale: int = 4) -> Path:
        """Write a .png grid (upscaled `scale` times), an .npz (images, labels, samples) or a folder
        of one PNG per image (native size), by the path, as `mdx-sample --out` does; atomically."""
        _check_scale(scale)
        kind = output_kind(path)
        check_writable(path, kind)
        if kind == "png":
            return save_grid_png(self.samples, path, self.columns, scale)
        if kind == "npz":
            return save_npz(self.samples, self.labels, path)
        unlabelled = "uncond" if self.settings.unconditional else "mix"
        save_folder(self.samples, self.labels, self.class_names, path, unlabelled=unlabelled)
        return Path(path)

    def save_gif(self, path: str | os.PathLike, *, scale: int = 4) -> Path:
        """An animation of the predicted x_0 at each step, as `mdx-sample --gif`; needs record_x0=True."""
        _check_scale(scale)
        if self.x0_frames is None:
            raise PipelineError("no x_0 frames were recorded: sample with record_x0=True to save a GIF")
        if Path(path).suffix.lower() != ".gif":
            raise OutputError(f"{path}: the animation file must end in .gif")
        check_writable(path, "gif")
        return save_gif(self.x0_frames, self.samples, path, self.columns, scale)


def _check_scale(scale: int) -> None:
    if not _is_int(scale) or scale < 1:
        raise OutputError(f"scale must be an integer >= 1, got {scale!r}")


# --- checking a request ---------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_request(n, steps, guidance, seed, eta, sampler_options) -> None:
    """Types and ranges the sampler does not check itself (it checks steps <= T, eta, options)."""
    if n is not None and (not _is_int(n) or n < 1):
        raise PipelineError(f"n must be an integer >= 1 (the number of images), got {n!r}")
    if steps is not None and (not _is_int(steps) or steps < 1):
        raise PipelineError(f"steps must be an integer >= 1, got {steps!r}")
    if guidance is not None and (not _is_number(guidance) or not math.isfinite(guidance) or guidance < 0):
        raise PipelineError(f"guidance must be a number >= 0 (1: the conditional model alone), got {guidance!r}")
    if not _is_int(seed) or seed < 0:
        raise PipelineError(f"seed must be an integer >= 0, got {seed!r}")
    if eta is not None and (not _is_number(eta) or not math.isfinite(eta)):
        raise PipelineError(f"eta must be a number in [0, 1] (ddim only), got {eta!r}")
    if sampler_options is not None and not isinstance(sampler_options, Mapping):
        raise PipelineError(f"sampler_options must be a dict of option: value, got {sampler_options!r}")


def _weight_context(weights: np.ndarray, K: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Class weights (K,) or (n, K) -> context (n, K) float32 and labels (a one-hot row: its
    class; any other row: -1)."""
    w = np.asarray(weights)
    if w.dtype.kind not in "biuf":
        raise PipelineError(f"class weights must be numbers, got an array of {w.dtype}")
    if w.ndim == 1 and w.shape == (K,):
        rows = n if n is not None else min(2 * K, MAX_DEFAULT_N)
        w = np.broadcast_to(w, (rows, K))
    elif w.ndim == 2 and w.shape[1] == K and w.shape[0] >= 1:
        if n is not None and n != w.shape[0]:
            raise PipelineError(f"n={n} but the class weights have {w.shape[0]} rows; give one or the other")
    else:
        raise PipelineError(f"class weights must have shape ({K},) or (n, {K}) for this model's {K} classes, "
                            f"got {w.shape}")
    w = np.array(w, dtype=np.float32)  # (n, K), a fresh copy
    if not np.isfinite(w).all() or (w < 0).any():
        raise PipelineError("class weights must be finite and >= 0 (all zeros: unconditional)")
    one_hot = ((w != 0).sum(axis=1) == 1) & (w.max(axis=1) == 1)
    labels = np.where(one_hot, w.argmax(axis=1), -1).astype(np.int64)
    return w, labels


def _class_list(classes: object) -> list:
    """None, a name, an index or a sequence of them -> a list of names and indices."""
    if classes is None:
        return []
    if isinstance(classes, (str, int, np.integer)) and not isinstance(classes, bool):
        return [classes]
    if isinstance(classes, (list, tuple)):
        bad = [c for c in classes if not (isinstance(c, (str, np.integer, int)) and not isinstance(c, bool))]
        if bad:
            raise PipelineError(f"a class is a name or an index, got {bad[0]!r}; give class weights as a numpy "
                                "array of shape (K,) or (n, K)")
        return list(classes)
    raise PipelineError(f"classes must be a name, an index, a list of them or a numpy array of class weights, "
                        f"got {type(classes).__name__}")


def conditioning(class_names: Sequence[str], classes: ClassSpec = None, n: int | None = None,
                 unconditional: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """Context (n, K) float32, labels (n,) int64 and a description, for a `classes` value (see
    the module docstring); n left at None is the weight matrix's rows, else 2 per class (at most 64)."""
    K = len(class_names)
    if isinstance(classes, np.ndarray):
        if unconditional:
            raise PipelineError("give class weights or unconditional=True, not both")
        context, labels = _weight_context(classes, K, n)
        return context, labels, "class weights"
    names = _class_list(classes)
    count = n if n is not None else min(2 * K, MAX_DEFAULT_N)
    context, labels = build_context(class_names, names, unconditional, count)
    if unconditional:
        return context, labels, "unconditional"
    if names:
        return context, labels, "class " + "+".join(class_names[k] for k in np.flatnonzero(context[0]))
    return context, labels, f"all {K} classes"


# --- the pipeline ---------------------------------------------------------------------


class Pipeline:
    """A loaded model and the settings it samples best with; call it to sample.

    Build it with `Pipeline.load(...)`, or wrap an existing `OnnxDenoiser` (anything with
    `.info`, `.provider` and `.binding(batch)`) as `Pipeline(denoiser)`.
    """

    def __init__(self, denoiser: Any, *, load_seconds: float = 0.0) -> None:
        self.denoiser = denoiser
        self.load_seconds = load_seconds

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, *, provider: str = "auto",
             overrides: Mapping[str, Any] | None = None, **session_options: Any) -> "Pipeline":
        """Open a shipped model by name ("emoji16", "emoji16-int8", ...), a contract .onnx by
        path, or (None) the default model that mdx-sample uses.

        provider: "auto" (CUDA when it really starts, else the best CPU provider) or an onnxruntime
        provider name; session_options go to `OnnxDenoiser.load` (threads, cuda_graph, and where
        supported compute_precision); overrides supply a foreign model's missing metadata
        (timesteps, schedule, beta_start, beta_end, classes, image_size, channels, prediction_type).
        """
        from mdx.runtime.session import OnnxDenoiser  # onnxruntime is imported here, not with mdx.runtime

        path = resolve_model(model)
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        start = time.perf_counter()
        denoiser = OnnxDenoiser.load(path, provider=provider, overrides=given, **session_options)
        return cls(denoiser, load_seconds=time.perf_counter() - start)

    @property
    def info(self) -> ModelInfo:
        return self.denoiser.info

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.info.class_names)

    @property
    def provider(self) -> str:
        """The onnxruntime provider that really runs the model."""
        return self.denoiser.provider

    @property
    def notes(self) -> list[str]:
        """What the provider choice could not honour (e.g. CUDA did not start), for the user."""
        return list(getattr(self.denoiser, "notes", []))

    @property
    def compute_precision(self) -> str | None:
        """What the provider computes in (OpenVINO's precision hint, else the file's precision)."""
        return getattr(self.denoiser, "compute_precision", None)

    @property
    def path(self) -> Path:
        return Path(self.info.path)

    def request(self, classes: ClassSpec = None, *, n: int | None = None, steps: int | None = None,
                guidance: float | None = None, seed: int = 0, sampler: str | None = None,
                eta: float | None = None, sampler_options: Mapping[str, Any] | None = None,
                unconditional: bool = False) -> Request:
        """Check a request and resolve its settings without sampling (what `__call__` samples):
        a command prints what it will do, or fails, before any work or output."""
        _check_request(n, steps, guidance, seed, eta, sampler_options)
        context, labels, what = conditioning(self.class_names, classes, n, unconditional)
        resolved = resolve_settings(self.info, sampler=sampler, steps=steps, guidance=guidance,
                                    sampler_options=None if sampler_options is None else dict(sampler_options))
        settings = SamplingSettings(
            sampler=resolved.sampler, steps=resolved.steps, guidance=float(resolved.guidance),
            eta=float(eta or 0.0), seed=int(seed), n=len(context), sampler_options=dict(resolved.sampler_options),
            classes=what, unconditional=bool(unconditional), notes=tuple(resolved.notes))
        # A bad sampler, step count (1..T), eta or option fails here, before any sampling.
        prepare_sampler(self.info, settings.sampler, settings.steps, settings.eta, settings.sampler_options)
        return Request(context=context, labels=labels, settings=settings)

    def run(self, request: Request, *, callback: StepCallback | None = None, record_x0: bool = False) -> Output:
        """Sample a checked request; see `__call__` for callback and record_x0."""
        if callback is not None and not callable(callback):
            raise PipelineError(f"callback must be callable as callback(step, total, x0), got {callback!r}")
        s = request.settings
        result = generate(self.denoiser, sampler=s.sampler, steps=s.steps, n=s.n, context=request.context,
                          guidance=s.guidance, eta=s.eta, seed=s.seed, record_x0=record_x0,
                          sampler_options=s.sampler_options, callback=callback)
        return Output(samples=result.samples, labels=request.labels, context=request.context,
                      class_names=self.class_names, settings=s,
                      timings=Timings(result.total_seconds, result.model_seconds), provider=self.provider,
                      model=self.path, x0_frames=result.x0_frames, compute_precision=self.compute_precision)

    def __call__(self, classes: ClassSpec = None, *, n: int | None = None, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, sampler: str | None = None,
                 eta: float | None = None, sampler_options: Mapping[str, Any] | None = None,
                 unconditional: bool = False, callback: StepCallback | None = None,
                 record_x0: bool = False) -> Output:
        """Sample images; every setting left at None is the model's recommendation.

        callback(step, total, x0) runs after each step with the predicted clean images x0
        (n, C, H, W) float32 (raise from it to stop); record_x0 keeps them all for `save_gif`.
        """
        if callback is not None and not callable(callback):
            raise PipelineError(f"callback must be callable as callback(step, total, x0), got {callback!r}")
        request = self.request(classes, n=n, steps=steps, guidance=guidance, seed=seed, sampler=sampler, eta=eta,
                               sampler_options=sampler_options, unconditional=unconditional)
        return self.run(request, callback=callback, record_x0=record_x0)

    def __repr__(self) -> str:
        return f"Pipeline({str(self.path)!r}, provider={self.provider}, classes={list(self.class_names)})"
