"""Load a contract ONNX model and run it: metadata, provider choice, reused buffers.

The ONNX file is the interface between export and runtime (DESIGN.md, "Model contract"):
inputs `sample` (B, C, H, W), `timestep` (B,), `context` (B, K), output `model_output`
(B, C, H, W), and `mdx.*` metadata_props that describe the schedule, classes and sizes.

    denoiser = OnnxDenoiser.load("models/emoji16.onnx", provider="auto")
    denoiser.info.schedule, denoiser.info.class_names, denoiser.provider
    eps = denoiser(x, t, context)                 # a fresh float32 array

For the sampling loop, `denoiser.binding(batch)` hands out input buffers that the caller
fills in place and an output buffer that every run overwrites, so a step allocates nothing:
on the CPU the buffers are numpy arrays that ONNX Runtime reads and writes directly
(IO binding to OrtValues over them); on CUDA they are host mirrors of device OrtValues that
are copied in place (`update_inplace`), which is also what CUDA graphs need, since a
captured graph replays fixed device addresses.

Providers: onnxruntime-gpu lists CUDAExecutionProvider even where CUDA cannot start, and
then silently runs on the CPU; the provider that really runs is `session.get_providers()[0]`,
and that is what `.provider` reports.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

from mdx.runtime.schedules import Schedule, ScheduleError

INPUTS = ("sample", "timestep", "context")
OUTPUT = "model_output"
PREDICTION_TYPES = ("epsilon", "v_prediction")
PRECISIONS = ("fp32", "fp16", "int8")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"

# Which command-line option supplies each metadata key when a model lacks it.
OPTIONS_FOR_KEY = {
    "mdx.schedule": "--timesteps (with --schedule, --beta-start, --beta-end)",
    "mdx.classes": "--classes",
    "mdx.image_size": "--image-size",
    "mdx.channels": "--channels",
}
# The keys of `overrides` in `OnnxDenoiser.load`, i.e. the command-line options above.
OVERRIDE_KEYS = ("timesteps", "schedule", "beta_start", "beta_end", "classes", "image_size",
                 "channels", "prediction_type")

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32,
}
# Errors onnxruntime raises for a file it cannot load (they derive from Exception only).
_ORT_LOAD_ERRORS = (_ort_errors.Fail, _ort_errors.InvalidProtobuf, _ort_errors.InvalidGraph,
                    _ort_errors.NoSuchFile, _ort_errors.InvalidArgument, _ort_errors.NotImplemented,
                    _ort_errors.RuntimeException)


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


# --- quiet session creation -----------------------------------------------------------


@contextlib.contextmanager
def _quiet_onnxruntime():
    """Mute onnxruntime while it tries providers: a provider that cannot start logs errors
    (and the Python binding prints an 'EP Error' block) before falling back; the caller
    reports the outcome itself, in one line."""
    ort.set_default_logger_severity(4)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings and above


def _preload_cuda_libraries() -> None:
    """Let onnxruntime find the CUDA and cuDNN libraries that pip installed (with torch or via
    onnxruntime-gpu[cuda,cudnn]) without LD_LIBRARY_PATH; older onnxruntime has no preload_dlls."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with _quiet_onnxruntime():
        try:
            preload()
        except (OSError, RuntimeError):
            # Missing libraries are not an error here: CUDA then fails to start, and the
            # caller checks session.get_providers() and reports that.
            pass


def _cuda_options(cuda_graph: bool) -> dict[str, str]:
    options = {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def _session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def _create_session(path: Path, providers: list, threads: int | None,
                    cuda_graph: bool = False) -> ort.InferenceSession:
    try:
        with _quiet_onnxruntime():
            return ort.InferenceSession(str(path), sess_options=_session_options(threads), providers=providers)
    except _ort_errors.InvalidProtobuf:
        raise ModelError(f"cannot load {path}: it is not an ONNX model (protobuf parsing failed)") from None
    except _ORT_LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if cuda_graph and "graph" in first.lower():
            # e.g. a node the CUDA provider cannot take: CUDA graphs need every node on the GPU
            raise ModelError(f"cannot run {path} as a CUDA graph ({first}); run without --cuda-graph") from None
        raise ModelError(f"cannot load {path} as an ONNX model: {first}") from None


def usable_providers(path: Path) -> list[str]:
    """The providers that really start on this machine for this model (CPU always does)."""
    usable = []
    for name in ort.get_available_providers():
        if name == CPU:
            usable.append(name)
            continue
        if name == CUDA:
            _preload_cuda_libraries()
        try:
            session = _create_session(path, [name, CPU], threads=None)
        except ModelError:
            continue
        if session.get_providers()[0] == name:
            usable.append(name)
    return usable


def open_session(path: Path, provider: str = "auto", threads: int | None = None,
                 cuda_graph: bool = False) -> tuple[ort.InferenceSession, list[str]]:
    """Create the session on the requested provider; returns it and notes for the user.

    `auto` takes CUDA when it really starts and the CPU otherwise. A named provider that
    is unknown, not in this build, or that fell back to another is a ModelError that lists
    the usable ones.
    """
    notes: list[str] = []
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ModelError(f"threads must be a positive integer, got {threads!r}")
    available = ort.get_available_providers()
    if provider == "auto":
        if CUDA in available:
            _preload_cuda_libraries()
            session = _create_session(path, [(CUDA, _cuda_options(cuda_graph)), CPU], threads, cuda_graph)
            if session.get_providers()[0] == CUDA:
                return session, notes
            notes.append("CUDA did not start: no GPU, or the CUDA/cuDNN libraries are missing (see the README)")
        if cuda_graph:
            notes.append("--cuda-graph ignored: it needs CUDA")
        return _create_session(path, [CPU], threads), notes

    if provider not in ort.get_all_providers():
        raise ModelError(f"unknown provider {provider!r}; usable here: auto, {', '.join(usable_providers(path))}")
    if provider not in available:
        raise ModelError(f"provider {provider} is not in this onnxruntime build; "
                         f"usable here: auto, {', '.join(usable_providers(path))}")
    if cuda_graph and provider != CUDA:
        raise ModelError(f"--cuda-graph needs the CUDA provider, not {provider}")
    if provider == CUDA:
        _preload_cuda_libraries()
        spec: list = [(CUDA, _cuda_options(cuda_graph)), CPU]
    else:
        spec = [provider] if provider == CPU else [provider, CPU]
    session = _create_session(path, spec, threads, cuda_graph)
    running = session.get_providers()[0]
    if running != provider:
        raise ModelError(f"provider {provider} did not start (onnxruntime fell back to {running}); "
                         f"usable here: auto, {', '.join(usable_providers(path))}")
    return session, notes


# --- metadata -------------------------------------------------------------------------


def _static(dim) -> int | None:
    """A graph dimension if it is a fixed positive integer, else None (symbolic or unknown)."""
    return dim if isinstance(dim, int) and dim > 0 else None


def _json(meta: dict, key: str):
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


def _schedule(meta: dict, overrides: dict) -> Schedule | None:
    given = {k: overrides[k] for k in ("timesteps", "schedule", "beta_start", "beta_end")
             if overrides.get(k) is not None}
    if "mdx.schedule" in meta:
        base = _json(meta, "mdx.schedule")
        if not isinstance(base, dict):
            raise ModelError(f"metadata mdx.schedule must be a JSON object, got {meta['mdx.schedule'][:80]!r}")
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
        source = "the schedule options" if given else "metadata mdx.schedule"
        raise ModelError(f"{source}: {e}") from None


def read_model_info(session: ort.InferenceSession, path: Path, overrides: dict | None = None) -> ModelInfo:
    """Model facts from the metadata, `overrides` (which win) and the graph's static shapes.

    Raises ModelError naming the missing keys, and the options that supply them, when the
    schedule, the classes or the image size cannot be determined.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise ModelError(f"unknown override(s) {', '.join(unknown)}; allowed: {', '.join(OVERRIDE_KEYS)}")
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get("mdx.format", "1") != "1":
        raise ModelError(f"{path} has mdx.format {meta['mdx.format']!r}; this runtime reads format 1")
    inputs = {i.name: i for i in session.get_inputs()}
    sample_shape = list(inputs["sample"].shape)
    context_shape = list(inputs["context"].shape)

    schedule = _schedule(meta, overrides)

    if overrides.get("classes") is not None:
        class_names: tuple[str, ...] | None = _class_names(overrides["classes"], "--classes")
    elif "mdx.classes" in meta:
        class_names = _class_names(_json(meta, "mdx.classes"), "metadata mdx.classes")
    else:
        class_names = None

    def size(option: str, key: str, graph_dim) -> int | None:
        if overrides.get(option) is not None:
            return _positive_int(overrides[option], "--" + option.replace("_", "-"))
        if key in meta:
            return _positive_int(meta[key], f"metadata {key}")
        return _static(graph_dim)  # a foreign model's fixed input shape says it too

    channels = size("channels", "mdx.channels", sample_shape[1])
    image_size = size("image_size", "mdx.image_size", sample_shape[2])

    missing = [key for key, value in (("mdx.schedule", schedule), ("mdx.classes", class_names),
                                      ("mdx.image_size", image_size), ("mdx.channels", channels))
               if value is None]
    if missing:
        options = "; ".join(f"{k}: {OPTIONS_FOR_KEY[k]}" for k in missing)
        raise ModelError(f"{path} lacks the metadata {', '.join(missing)}; supply it with the options ({options})")

    # The metadata must agree with the graph wherever the graph fixes a size.
    for what, value, dim in (("channels", channels, sample_shape[1]), ("image size", image_size, sample_shape[2]),
                             ("image size", image_size, sample_shape[3]),
                             ("number of classes", len(class_names), context_shape[1])):
        if _static(dim) is not None and dim != value:
            raise ModelError(f"{path}: the {what} is {value} by the metadata or options, "
                             f"but the graph's inputs fix it at {dim}")

    prediction_type = overrides.get("prediction_type") or meta.get("mdx.prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"prediction type {prediction_type!r} is not supported; "
                         f"choose one of {', '.join(PREDICTION_TYPES)}")
    precision = meta.get("mdx.precision")
    if precision is None:
        precision = "fp16" if inputs["sample"].type == "tensor(float16)" else "fp32"
    elif precision not in PRECISIONS:
        raise ModelError(f"metadata mdx.precision {precision!r} is not one of {', '.join(PRECISIONS)}")

    recommended = None
    if "mdx.recommended" in meta:
        recommended = _json(meta, "mdx.recommended")
        if not isinstance(recommended, dict):
            raise ModelError(f"metadata mdx.recommended must be a JSON object, got {meta['mdx.recommended'][:80]!r}")

    return ModelInfo(image_size=image_size, channels=channels, class_names=class_names, schedule=schedule,
                     prediction_type=prediction_type, precision=precision, recommended=recommended, path=path)


def _check_signature(session: ort.InferenceSession, path: Path) -> None:
    """The contract's input and output names, with element types this runtime can feed."""
    inputs = {i.name: i.type for i in session.get_inputs()}
    outputs = {o.name: o.type for o in session.get_outputs()}
    if set(inputs) != set(INPUTS) or OUTPUT not in outputs:
        raise ModelError(
            f"{path} does not follow the mdx model contract: it has inputs {sorted(inputs)} and outputs "
            f"{sorted(outputs)}; expected inputs {list(INPUTS)} and output {OUTPUT!r}"
        )
    for name, kind in [*inputs.items(), (OUTPUT, outputs[OUTPUT])]:
        if kind not in _ORT_DTYPES:
            raise ModelError(f"{path}: {name} has element type {kind}, which this runtime does not feed")


# --- buffers bound to a session -------------------------------------------------------


class Binding:
    """Input and output buffers for one batch size, reused by every run.

    Fill `sample` (B, C, H, W), `timestep` (B,) and `context` (B, K) in place, call
    `run()`, read the returned (B, C, H, W) array before the next run overwrites it.
    """

    def __init__(self, session: ort.InferenceSession, batch: int, info: ModelInfo, device: str,
                 graph_id: int | None) -> None:
        types = {i.name: _ORT_DTYPES[i.type] for i in session.get_inputs()}
        out_type = _ORT_DTYPES[{o.name: o.type for o in session.get_outputs()}[OUTPUT]]
        self.batch = batch
        self.graph_id = graph_id
        self._session = session
        self.sample = np.zeros((batch, *info.sample_shape), dtype=types["sample"])  # (B, C, H, W)
        self.timestep = np.zeros((batch,), dtype=types["timestep"])  # (B,)
        self.context = np.zeros((batch, info.num_classes), dtype=types["context"])  # (B, K)
        self._host_out = np.zeros((batch, *info.sample_shape), dtype=out_type)
        self._float_out = self._host_out if out_type == np.float32 else np.zeros(self._host_out.shape, np.float32)
        self._host = {"sample": self.sample, "timestep": self.timestep, "context": self.context}
        self._device = device
        self._run_options = ort.RunOptions()
        if graph_id is not None:
            # One captured CUDA graph per batch size (ids > 0; 0 is onnxruntime's own).
            self._run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self._io = session.io_binding()
        if device == "cpu":
            # OrtValues over the numpy buffers: onnxruntime reads and writes them directly.
            self._values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self._host.items()}
            self._out = ort.OrtValue.ortvalue_from_numpy(self._host_out)
        else:
            # Device buffers with fixed addresses, updated in place from the host mirrors.
            self._values = {k: ort.OrtValue.ortvalue_from_shape_and_type(v.shape, v.dtype, device, 0)
                            for k, v in self._host.items()}
            self._out = ort.OrtValue.ortvalue_from_shape_and_type(self._host_out.shape, out_type, device, 0)
        for name, value in self._values.items():
            self._io.bind_ortvalue_input(name, value)
        self._io.bind_ortvalue_output(OUTPUT, self._out)

    def run(self) -> np.ndarray:
        """One model call on the current buffers; returns the float32 output buffer."""
        if self._device != "cpu":
            for name, value in self._values.items():
                value.update_inplace(self._host[name])  # host -> device, same address
        self._session.run_with_iobinding(self._io, self._run_options)
        if self._device != "cpu":
            np.copyto(self._host_out, self._io.copy_outputs_to_cpu()[0])  # device -> host
        if self._float_out is not self._host_out:
            np.copyto(self._float_out, self._host_out)
        return self._float_out


# --- the denoiser ---------------------------------------------------------------------


class OnnxDenoiser:
    """A contract model in an onnxruntime session: `info`, `provider`, and calls."""

    MAX_BINDINGS = 8  # batch sizes kept bound at once (each holds its buffers, maybe a CUDA graph)

    def __init__(self, session: ort.InferenceSession, info: ModelInfo, notes: list[str] | None = None,
                 cuda_graph: bool = False) -> None:
        self.session = session
        self.info = info
        self.notes = list(notes or [])
        self.provider = session.get_providers()[0]
        self.cuda_graph = bool(cuda_graph) and self.provider == CUDA
        self._device = "cuda" if self.provider == CUDA else "cpu"
        self._bindings: dict[int, Binding] = {}
        self._next_graph_id = 1

    @classmethod
    def load(cls, path: str | os.PathLike, provider: str = "auto", threads: int | None = None,
             cuda_graph: bool = False, overrides: dict | None = None) -> "OnnxDenoiser":
        """Open `path` on `provider` ("auto" or an onnxruntime provider name) and read its metadata."""
        path = Path(path)
        if not path.exists():
            raise ModelError(f"model file {path} does not exist")
        if not path.is_file():
            raise ModelError(f"model path {path} is not a file")
        session, notes = open_session(path, provider, threads, cuda_graph)
        _check_signature(session, path)
        info = read_model_info(session, path, overrides)
        return cls(session, info, notes, cuda_graph)

    def binding(self, batch: int) -> Binding:
        """The reused buffers for `batch` images (created on first use, then cached)."""
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ModelError(f"batch must be a positive integer, got {batch!r}")
        batch = int(batch)
        bound = self._bindings.get(batch)
        if bound is None:
            if len(self._bindings) >= self.MAX_BINDINGS:
                oldest = self._bindings.pop(next(iter(self._bindings)))
                release = getattr(self.session, "release_captured_graph", None)  # onnxruntime >= 1.2x
                if oldest.graph_id is not None and release is not None:
                    release(oldest.graph_id)
            graph_id = None
            if self.cuda_graph:
                graph_id, self._next_graph_id = self._next_graph_id, self._next_graph_id + 1
            bound = self._bindings[batch] = Binding(self.session, batch, self.info, self._device, graph_id)
        return bound

    def __call__(self, sample: np.ndarray, timestep, context: np.ndarray) -> np.ndarray:
        """model_output (B, C, H, W) float32 for sample (B, C, H, W), timestep scalar or (B,), context (B, K)."""
        sample = np.asarray(sample)
        context = np.asarray(context)
        C, H, W = self.info.sample_shape
        if sample.ndim != 4 or sample.shape[1:] != (C, H, W) or sample.shape[0] < 1:
            raise ModelError(f"sample must have shape (B, {C}, {H}, {W}), got {sample.shape}")
        B = sample.shape[0]
        if context.shape != (B, self.info.num_classes):
            raise ModelError(f"context must have shape ({B}, {self.info.num_classes}), got {context.shape}")
        timestep = np.asarray(timestep)
        if timestep.shape not in ((), (B,)):
            raise ModelError(f"timestep must be a scalar or have shape ({B},), got {timestep.shape}")
        T = self.info.schedule.num_train_timesteps
        if timestep.size and (timestep.min() < 0 or timestep.max() > T - 1):
            raise ModelError(f"timestep must lie in 0..{T - 1}, got {timestep.min()}..{timestep.max()}")
        bound = self.binding(B)
        bound.sample[...] = sample
        bound.timestep[...] = timestep
        bound.context[...] = context
        return bound.run().copy()

    def __repr__(self) -> str:
        return f"OnnxDenoiser({str(self.info.path)!r}, provider={self.provider})"
