"""The model contract: what an mdx ONNX file holds, and how the runtime reads it.

The ONNX file is the interface between export and runtime (docs/contract.md): inputs
`sample` (B, C, H, W), `timestep` (B,), `context` (B, K); output `model_output`
(B, C, H, W); and `mdx.*` metadata_props (strings, JSON where structured) that describe the
schedule, the classes, the sizes and the settings the model samples best with.

This module is the one place that names them. The exporter writes the metadata with
`model_metadata`, the runtime parses it with `parse_model_info`, and every command resolves
its sampler settings with `resolve_settings`, so the three cannot drift apart:

    meta = read_metadata("models/emoji16.onnx")        # no session, no graph loaded
    settings = resolve_settings(info, sampler=None, steps=None, guidance=None)
    settings.sampler, settings.steps, settings.guidance, settings.sampler_options, settings.notes
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from mdx.runtime.schedules import Schedule, ScheduleError

# --- names ----------------------------------------------------------------------------

INPUTS = ("sample", "timestep", "context")
OUTPUT = "model_output"
PREDICTION_TYPES = ("epsilon", "v_prediction")
PRECISIONS = ("fp32", "fp16", "int8")
SAMPLERS = ("ddpm", "ddim", "dpmpp")  # the names mdx.recommended and every command use
FORMAT_VERSION = "1"

# metadata_props keys
FORMAT = "mdx.format"
IMAGE_SIZE = "mdx.image_size"
CHANNELS = "mdx.channels"
CLASSES = "mdx.classes"  # JSON list of K names
SCHEDULE = "mdx.schedule"  # JSON: kind, num_train_timesteps, beta_start, beta_end
PREDICTION_TYPE = "mdx.prediction_type"
PRECISION = "mdx.precision"
TRAIN_CONFIG = "mdx.train_config"  # JSON: the training run's config
CHECKPOINT_SHA256 = "mdx.checkpoint_sha256"
NUM_TRAIN_TIMESTEPS = "mdx.num_train_timesteps"
PARAMETERS = "mdx.parameters"
RECOMMENDED = "mdx.recommended"  # JSON: sampler, steps, guidance [, sampler_options]

# What the exporter writes into every model, and its validation requires.
REQUIRED_METADATA = (FORMAT, IMAGE_SIZE, CHANNELS, CLASSES, SCHEDULE, PREDICTION_TYPE, PRECISION, TRAIN_CONFIG,
                     CHECKPOINT_SHA256, NUM_TRAIN_TIMESTEPS, PARAMETERS)

# Which command-line option supplies each metadata key when a model lacks it.
OPTIONS_FOR_KEY = {
    SCHEDULE: "--timesteps (with --schedule, --beta-start, --beta-end)",
    CLASSES: "--classes",
    IMAGE_SIZE: "--image-size",
    CHANNELS: "--channels",
}
# The keys of the `overrides` of `parse_model_info`, i.e. the command-line options above.
OVERRIDE_KEYS = ("timesteps", "schedule", "beta_start", "beta_end", "classes", "image_size",
                 "channels", "prediction_type")

# The settings of a model without (usable) mdx.recommended.
FALLBACK = {"sampler": "ddim", "steps": 25, "guidance": 1.0}


class ModelError(ValueError):
    """A model file, its metadata, the provider or an input is not usable; the message says why."""


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime knows about a model, from its metadata (or the overrides)."""

    image_size: int
    channels: int
    class_names: tuple[str, ...]
    schedule: Schedule
    prediction_type: str
    precision: str
    recommended: dict | None
    path: Path

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.image_size, self.image_size)


# --- writing metadata -----------------------------------------------------------------


def model_metadata(*, image_size: int, channels: int, class_names: Sequence[str], schedule: Mapping,
                   prediction_type: str, precision: str, train_config: Mapping, checkpoint_sha256: str,
                   parameters: int, recommended: Mapping | None = None) -> dict[str, str]:
    """The mdx.* metadata_props of a model, all strings (JSON with sorted keys where structured).

    `schedule` is `Schedule.to_dict()`; `recommended` is {sampler, steps, guidance[, sampler_options]}.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    meta = {
        FORMAT: FORMAT_VERSION,
        IMAGE_SIZE: str(int(image_size)),
        CHANNELS: str(int(channels)),
        CLASSES: json.dumps(list(class_names)),
        SCHEDULE: json.dumps(dict(schedule), sort_keys=True),
        PREDICTION_TYPE: prediction_type,
        PRECISION: precision,
        TRAIN_CONFIG: json.dumps(dict(train_config), sort_keys=True),
        CHECKPOINT_SHA256: checkpoint_sha256,
        NUM_TRAIN_TIMESTEPS: str(int(schedule["num_train_timesteps"])),
        PARAMETERS: str(int(parameters)),
    }
    if recommended is not None:
        meta[RECOMMENDED] = json.dumps(dict(recommended), sort_keys=True)
    return meta


# --- reading metadata without a session -----------------------------------------------


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message in buf[start:end]; the value of a
    length-delimited field is its (start, end) span, so large fields (the graph) are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("truncated field")
        yield field, wire, value


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an ONNX file without loading its graph or starting a session.

    ModelProto: field 7 is the graph, field 14 the metadata_props (StringStringEntryProto:
    key = 1, value = 2). Raises ValueError when the file is not an ONNX model, OSError when
    it cannot be read.
    """
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise ValueError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            meta, has_graph = {}, False
            for field, wire, value in _fields(buf, 0, len(buf)):
                has_graph |= field == 7 and wire == 2
                if field == 14 and wire == 2:
                    entry = {f: bytes(buf[v[0]:v[1]]).decode("utf-8", "replace")
                             for f, w, v in _fields(buf, *value) if w == 2 and f in (1, 2)}
                    meta[entry.get(1, "")] = entry.get(2, "")
    if not has_graph:
        raise ValueError("no graph")
    return meta


# --- parsing metadata into ModelInfo --------------------------------------------------


def _static(dim) -> int | None:
    """A graph dimension if it is a fixed positive integer, else None (symbolic or unknown)."""
    return dim if isinstance(dim, int) and dim > 0 else None


def _json(meta: Mapping[str, str], key: str):
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ModelError(f"metadata {key} is not valid JSON ({e.msg}): {meta[key][:80]!r}") from None


def _positive_int(value, what: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = 0
    if v < 1 or (isinstance(value, float) and value != v):
        raise ModelError(f"{what} must be a positive integer, got {value!r}")
    return v


def _class_names(value, what: str) -> tuple[str, ...]:
    """A list of names, or a count (names '0'..'K-1')."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return tuple(str(i) for i in range(_positive_int(value, what)))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        if len(set(value)) != len(value):
            raise ModelError(f"{what} repeats a class name: {list(value)}")
        return tuple(value)
    raise ModelError(f"{what} must be a non-empty list of names or a count, got {value!r}")


def _schedule(meta: Mapping[str, str], overrides: dict) -> Schedule | None:
    given = {k: overrides[k] for k in ("timesteps", "schedule", "beta_start", "beta_end")
             if overrides.get(k) is not None}
    if SCHEDULE in meta:
        base = _json(meta, SCHEDULE)
        if not isinstance(base, dict):
            raise ModelError(f"metadata {SCHEDULE} must be a JSON object, got {meta[SCHEDULE][:80]!r}")
    elif "timesteps" in given:
        base = {"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    else:
        return None
    desc = dict(base)
    for option, key in (("timesteps", "num_train_timesteps"), ("schedule", "kind"),
                        ("beta_start", "beta_start"), ("beta_end", "beta_end")):
        if option in given:
            desc[key] = given[option]
    try:
        return Schedule.from_dict(desc)
    except ScheduleError as e:
        source = "the schedule options" if given else f"metadata {SCHEDULE}"
        raise ModelError(f"{source}: {e}") from None


def _classes(meta: Mapping[str, str], overrides: dict) -> tuple[str, ...] | None:
    if overrides.get("classes") is not None:
        return _class_names(overrides["classes"], "--classes")
    if CLASSES in meta:
        return _class_names(_json(meta, CLASSES), f"metadata {CLASSES}")
    return None


def _size(meta: Mapping[str, str], overrides: dict, option: str, key: str, graph_dim) -> int | None:
    if overrides.get(option) is not None:
        return _positive_int(overrides[option], "--" + option.replace("_", "-"))
    if key in meta:
        return _positive_int(meta[key], f"metadata {key}")
    return _static(graph_dim)  # a foreign model's fixed input shape says it too


def _check_against_graph(path: Path, channels: int, image_size: int, num_classes: int,
                         sample_shape: Sequence, context_shape: Sequence) -> None:
    """The metadata must agree with the graph wherever the graph fixes a size."""
    for what, value, dim in (("channels", channels, sample_shape[1]), ("image size", image_size, sample_shape[2]),
                             ("image size", image_size, sample_shape[3]),
                             ("number of classes", num_classes, context_shape[1])):
        if _static(dim) is not None and dim != value:
            raise ModelError(f"{path}: the {what} is {value} by the metadata or options, "
                             f"but the graph's inputs fix it at {dim}")


def _prediction_and_precision(meta: Mapping[str, str], overrides: dict, fp16_inputs: bool) -> tuple[str, str]:
    prediction_type = overrides.get("prediction_type") or meta.get(PREDICTION_TYPE, "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"prediction type {prediction_type!r} is not supported; "
                         f"choose one of {', '.join(PREDICTION_TYPES)}")
    precision = meta.get(PRECISION)
    if precision is None:
        precision = "fp16" if fp16_inputs else "fp32"
    elif precision not in PRECISIONS:
        raise ModelError(f"metadata {PRECISION} {precision!r} is not one of {', '.join(PRECISIONS)}")
    return prediction_type, precision


def _recommended(meta: Mapping[str, str]) -> dict | None:
    if RECOMMENDED not in meta:
        return None
    recommended = _json(meta, RECOMMENDED)
    if not isinstance(recommended, dict):
        raise ModelError(f"metadata {RECOMMENDED} must be a JSON object, got {meta[RECOMMENDED][:80]!r}")
    return recommended


def parse_model_info(meta: Mapping[str, str], path: Path, overrides: dict | None = None, *,
                     sample_shape: Sequence = (None, None, None, None), context_shape: Sequence = (None, None),
                     fp16_inputs: bool = False) -> ModelInfo:
    """Model facts from the metadata, `overrides` (which win) and the graph's input shapes
    (ints where fixed; they fill in sizes the metadata lacks and must agree with it).

    Raises ModelError naming the missing keys, and the options that supply them, when the
    schedule, the classes or the image size cannot be determined.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise ModelError(f"unknown override(s) {', '.join(unknown)}; allowed: {', '.join(OVERRIDE_KEYS)}")
    if meta.get(FORMAT, FORMAT_VERSION) != FORMAT_VERSION:
        raise ModelError(f"{path} has {FORMAT} {meta[FORMAT]!r}; this runtime reads format {FORMAT_VERSION}")
    schedule = _schedule(meta, overrides)
    class_names = _classes(meta, overrides)
    channels = _size(meta, overrides, "channels", CHANNELS, sample_shape[1])
    image_size = _size(meta, overrides, "image_size", IMAGE_SIZE, sample_shape[2])

    missing = [key for key, value in ((SCHEDULE, schedule), (CLASSES, class_names),
                                      (IMAGE_SIZE, image_size), (CHANNELS, channels))
               if value is None]
    if missing:
        options = "; ".join(f"{k}: {OPTIONS_FOR_KEY[k]}" for k in missing)
        raise ModelError(f"{path} lacks the metadata {', '.join(missing)}; supply it with the options ({options})")
    _check_against_graph(path, channels, image_size, len(class_names), sample_shape, context_shape)
    prediction_type, precision = _prediction_and_precision(meta, overrides, fp16_inputs)
    return ModelInfo(image_size=image_size, channels=channels, class_names=class_names, schedule=schedule,
                     prediction_type=prediction_type, precision=precision, recommended=_recommended(meta),
                     path=path)


# --- the settings a model samples with ------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Sampler settings resolved from the user's values, the model's mdx.recommended and FALLBACK."""

    sampler: str
    steps: int
    guidance: float
    sampler_options: dict
    notes: tuple[str, ...]  # recommended values that could not be used, and why

    def as_dict(self) -> dict:
        """sampler, steps, guidance (what a page or a report shows)."""
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance}


def max_steps(sampler: str, num_train_timesteps: int) -> int:
    """DPM-Solver++ visits at most T-1 steps (it needs a previous timestep), the others T."""
    return num_train_timesteps - 1 if sampler == "dpmpp" else num_train_timesteps


def recommended_sampler_options(info: ModelInfo, sampler: str) -> dict:
    """The options the model recommends for `sampler` (`mdx.recommended`'s sampler_options), or {}.

    A cosine-schedule model, for instance, recommends DPM-Solver++ with lambda_min_clipped (its
    last abar_t are ~1e-8, where the data prediction amplifies any error in eps ~1e4-fold) and
    DDIM without clip_sample (clipping x_0 at high noise distorts its samples).
    """
    per_sampler = (info.recommended or {}).get("sampler_options")
    options = per_sampler.get(sampler) if isinstance(per_sampler, dict) else None
    return dict(options) if isinstance(options, dict) else {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_settings(info: ModelInfo, sampler: str | None = None, steps: int | None = None,
                     guidance: float | None = None, sampler_options: dict | None = None,
                     max_guidance: float = math.inf) -> Settings:
    """Each setting from the user's value when given (checked later, by the sampler), else the
    model's mdx.recommended when it is usable, else FALLBACK.

    A recommended value is usable when it is a known sampler, a step count in 1..max_steps for
    the chosen sampler, a guidance in 0..max_guidance; an unusable one is skipped with a note.
    The sampler options are the user's, else those the model recommends for the chosen sampler.
    """
    given, notes = info.recommended or {}, []
    if sampler is None:
        sampler = FALLBACK["sampler"]
        if "sampler" in given:
            if given["sampler"] in SAMPLERS:
                sampler = given["sampler"]
            else:
                notes.append(f"{RECOMMENDED} sampler {given['sampler']!r} ignored: not one of {', '.join(SAMPLERS)}")
    limit = max_steps(sampler, info.schedule.num_train_timesteps)
    if steps is None:
        steps = min(FALLBACK["steps"], limit)
        if "steps" in given:
            value = given["steps"]
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit:
                steps = value
            else:
                notes.append(f"{RECOMMENDED} steps {value!r} ignored: not an integer in 1..{limit}")
    if guidance is None:
        guidance = FALLBACK["guidance"]
        if "guidance" in given:
            value = given["guidance"]
            if _is_number(value) and 0 <= value <= max_guidance:
                guidance = float(value)
            else:
                bound = f"in 0..{max_guidance:g}" if math.isfinite(max_guidance) else ">= 0"
                notes.append(f"{RECOMMENDED} guidance {value!r} ignored: not a number {bound}")
    if sampler_options is None:
        sampler_options = recommended_sampler_options(info, sampler)
    return Settings(sampler=sampler, steps=steps, guidance=guidance, sampler_options=dict(sampler_options),
                    notes=tuple(notes))
