"""Load a contract ONNX model and run it: metadata, provider choice, reused buffers.

The ONNX file is the interface between export and runtime (docs/contract.md, "Model contract"):
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
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

# ModelError and ModelInfo are defined with the contract and re-exported here, where callers meet them.
from mdx.runtime.contract import INPUTS, OUTPUT, ModelError, ModelInfo, parse_model_info

from mdx.runtime import providers
from mdx.runtime.providers import CPU, CUDA, OPENVINO  # noqa: F401 -- re-exported

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32,
}
# Errors onnxruntime raises for a file it cannot load (they derive from Exception only).
ORT_LOAD_ERRORS = (_ort_errors.Fail, _ort_errors.InvalidProtobuf, _ort_errors.InvalidGraph,
                    _ort_errors.NoSuchFile, _ort_errors.InvalidArgument, _ort_errors.NotImplemented,
                    _ort_errors.RuntimeException)


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


def preload_cuda_libraries() -> None:
    """Make the pip-installed CUDA and cuDNN libraries findable before a CUDA session starts
    (for code that builds its own sessions, such as the benchmarks); never raises."""
    _preload_cuda_libraries()


def cuda_provider_options(cuda_graph: bool = False) -> dict[str, str]:
    """The CUDAExecutionProvider options of every mdx session (device 0, heuristic cuDNN
    algorithm search, and CUDA graphs when asked)."""
    return _cuda_options(cuda_graph)


def cpu_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """A plain session on the CPU provider, for models outside the contract (the eval
    classifier); a file onnxruntime cannot load is a ModelError naming it and why."""
    return _create_session(Path(path), [CPU], threads)


def _session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def _create_session(path: Path, spec: list | None, threads: int | None,
                    cuda_graph: bool = False, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A session on the providers of `spec`, or on those already put on `options` (plugins)."""
    options = options if options is not None else _session_options(threads)
    try:
        with _quiet_onnxruntime():
            return ort.InferenceSession(str(path), sess_options=options, providers=spec)
    except _ort_errors.InvalidProtobuf:
        raise ModelError(f"cannot load {path}: it is not an ONNX model (protobuf parsing failed)") from None
    except ORT_LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if cuda_graph and "graph" in first.lower():
            # e.g. a node the CUDA provider cannot take: CUDA graphs need every node on the GPU
            raise ModelError(f"cannot run {path} as a CUDA graph ({first}); run without --cuda-graph") from None
        raise ModelError(f"cannot load {path} as an ONNX model: {first}") from None


def _openvino_session(path: Path, threads: int | None, compute_precision: str,
                      isa: providers.CpuIsa) -> tuple[ort.InferenceSession, str]:
    """A session on the OpenVINO plugin computing in fp32 or bf16; ProviderError where it cannot run."""
    precision = providers.resolve_openvino_precision(compute_precision, isa)
    devices = providers.require_openvino_cpu_devices(isa)
    options = _session_options(threads)
    providers.add_openvino(options, devices, precision, threads)
    session = _create_session(path, None, threads, options=options)
    running = session.get_providers()[0]
    if running != OPENVINO:
        raise ModelError(f"provider {OPENVINO} did not start (onnxruntime runs {running})")
    return session, precision


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
    if providers.openvino_installed():
        try:
            _openvino_session(path, None, "fp32", providers.cpu_isa())
            usable.append(OPENVINO)
        except (ModelError, providers.ProviderError):
            pass  # not usable here: exactly what this list says
    return usable


def _open_auto(path: Path, threads: int | None, cuda_graph: bool,
               compute_precision: str) -> tuple[ort.InferenceSession, list[str], str | None]:
    """`auto`: CUDA when it really starts, then OpenVINO where it is the faster CPU path
    (providers.auto_prefers_openvino; or where bf16 is asked, which only it computes), then the CPU."""
    notes: list[str] = []
    if compute_precision != "bf16" and CUDA in ort.get_available_providers():
        _preload_cuda_libraries()
        session = _create_session(path, [(CUDA, _cuda_options(cuda_graph)), CPU], threads, cuda_graph)
        if session.get_providers()[0] == CUDA:
            return session, notes, None
        notes.append("CUDA did not start: no GPU, or the CUDA/cuDNN libraries are missing (see the README)")
    if cuda_graph:
        notes.append("--cuda-graph ignored: it needs CUDA")
    isa = providers.cpu_isa()
    prefer, why_not = providers.auto_prefers_openvino(isa)
    if why_not:
        notes.append(why_not)
    if compute_precision == "bf16":  # only OpenVINO computes in bf16: its error is the answer
        session, precision = _openvino_session(path, threads, compute_precision, isa)
        return session, notes + [f"OpenVINO computes in {precision}"], precision
    if prefer:
        try:
            session, precision = _openvino_session(path, threads, compute_precision, isa)
            return session, notes + [f"OpenVINO computes in {precision}"], precision
        except (ModelError, providers.ProviderError) as e:  # auto goes on to the CPU provider, and says why
            notes.append(f"OpenVINO did not start ({e}); running on the CPU provider")
    return _create_session(path, [CPU], threads), notes, None


def open_session(path: Path, provider: str = "auto", threads: int | None = None, cuda_graph: bool = False,
                 compute_precision: str = "auto") -> tuple[ort.InferenceSession, list[str], str | None]:
    """Create the session on the requested provider; returns it, notes for the user, and the
    compute precision OpenVINO was given (None for the other providers: the file's precision).

    `provider` is auto, cpu, cuda, openvino or an onnxruntime provider name. `auto` takes CUDA
    when it really starts, OpenVINO where it is the faster CPU path, the CPU otherwise. A named
    provider that is unknown, not in this build or plugin-less, or that fell back to another,
    and a compute precision it cannot honour, are ModelErrors that say what to do instead.
    """
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ModelError(f"threads must be a positive integer, got {threads!r}")
    try:
        provider = providers.canonical_provider(provider)
        providers.check_compute_precision(compute_precision)
        if provider == "auto":
            return _open_auto(path, threads, cuda_graph, compute_precision)
        if cuda_graph and provider != CUDA:
            raise ModelError(f"--cuda-graph needs the CUDA provider, not {provider}")
        if provider == OPENVINO:
            session, precision = _openvino_session(path, threads, compute_precision, providers.cpu_isa())
            return session, [f"OpenVINO computes in {precision}"], precision
        providers.check_other_provider_precision(compute_precision, provider)
    except providers.ProviderError as e:
        raise ModelError(str(e)) from None
    return _open_named(path, provider, threads, cuda_graph), [], None


def _open_named(path: Path, provider: str, threads: int | None, cuda_graph: bool) -> ort.InferenceSession:
    """A session on a provider built into onnxruntime (CPU, CUDA, ...), which must really run."""
    available = ort.get_available_providers()
    if provider not in ort.get_all_providers():
        raise ModelError(f"unknown provider {provider!r}; usable here: auto, {', '.join(usable_providers(path))}")
    if provider not in available:
        raise ModelError(f"provider {provider} is not in this onnxruntime build; "
                         f"usable here: auto, {', '.join(usable_providers(path))}")
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
    return session


# --- metadata -------------------------------------------------------------------------


def read_model_info(session: ort.InferenceSession, path: Path, overrides: dict | None = None) -> ModelInfo:
    """Model facts from the session's metadata, `overrides` (which win) and the graph's static
    shapes (`contract.parse_model_info`)."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    inputs = {i.name: i for i in session.get_inputs()}
    return parse_model_info(meta, path, overrides, sample_shape=list(inputs["sample"].shape),
                            context_shape=list(inputs["context"].shape),
                            fp16_inputs=inputs["sample"].type == "tensor(float16)")


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

    `device` says how the buffers reach the session: "cpu" binds OrtValues over the numpy
    buffers (the CPU provider reads and writes them in place), "cuda" binds device buffers
    updated from the host each run, and "feeds" passes the host buffers as ordinary feeds on
    every run. OpenVINO needs "feeds": through IO binding over host buffers its outputs are
    wrong (measured with onnxruntime 1.31.1 and onnxruntime-ep-openvino 1.8.1 on an Intel Xeon:
    relative RMS 1.04 against the CPU provider, in f32 and bf16 alike; with feeds 5e-7 in f32).
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
        if device == "feeds":
            return  # run() passes the host buffers as feeds; nothing is bound
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
        if self._device == "feeds":
            np.copyto(self._host_out, self._session.run([OUTPUT], self._host, self._run_options)[0])
        else:
            if self._device == "cuda":
                for name, value in self._values.items():
                    value.update_inplace(self._host[name])  # host -> device, same address
            self._session.run_with_iobinding(self._io, self._run_options)
            if self._device == "cuda":
                np.copyto(self._host_out, self._io.copy_outputs_to_cpu()[0])  # device -> host
        if self._float_out is not self._host_out:
            np.copyto(self._float_out, self._host_out)
        return self._float_out


# --- the denoiser ---------------------------------------------------------------------


class OnnxDenoiser:
    """A contract model in an onnxruntime session: `info`, `provider`, and calls."""

    MAX_BINDINGS = 8  # batch sizes kept bound at once (each holds its buffers, maybe a CUDA graph)

    def __init__(self, session: ort.InferenceSession, info: ModelInfo, notes: list[str] | None = None,
                 cuda_graph: bool = False, compute_precision: str | None = None) -> None:
        self.session = session
        self.info = info
        self.notes = list(notes or [])
        self.provider = session.get_providers()[0]
        # What the provider computes in: OpenVINO's precision hint, else the file's own precision.
        self.compute_precision = compute_precision or info.precision
        self.cuda_graph = bool(cuda_graph) and self.provider == CUDA
        # How Binding hands buffers over (see Binding): in place for the CPU provider, device
        # buffers for CUDA, plain feeds for any other provider (OpenVINO's outputs are wrong
        # through IO binding over host buffers).
        self._device = {CUDA: "cuda", CPU: "cpu"}.get(self.provider, "feeds")
        self._bindings: dict[int, Binding] = {}
        self._next_graph_id = 1

    @classmethod
    def load(cls, path: str | os.PathLike, provider: str = "auto", threads: int | None = None,
             cuda_graph: bool = False, overrides: dict | None = None,
             compute_precision: str = "auto") -> "OnnxDenoiser":
        """Open `path` on `provider` (auto, cpu, cuda, openvino or an onnxruntime provider name),
        computing in `compute_precision` (auto, fp32, bf16: providers.py), and read its metadata."""
        path = Path(path)
        if not path.exists():
            raise ModelError(f"model file {path} does not exist")
        if not path.is_file():
            raise ModelError(f"model path {path} is not a file")
        session, notes, compute_precision = open_session(path, provider, threads, cuda_graph, compute_precision)
        _check_signature(session, path)
        info = read_model_info(session, path, overrides)
        return cls(session, info, notes, cuda_graph, compute_precision)

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
        return f"OnnxDenoiser({str(self.info.path)!r}, provider={self.provider}, compute={self.compute_precision})"
