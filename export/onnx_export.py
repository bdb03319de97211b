"""Export a checkpoint to one self-contained, validated ONNX file (docs/contract.md's model contract).

    export_checkpoint("runs/emoji16", "models/emoji16.onnx")            # fp32, opset 17
    export_checkpoint("runs/emoji16", "models/emoji16-int8.onnx", precision="int8")

The steps, each reported with its figures:

1. load the checkpoint (EMA weights by default) and rebuild the torch model in eval mode;
2. `torch.onnx.export` with the dynamo exporter (TorchScript exporter as a fallback, said
   aloud), a dynamic batch dimension and the weights embedded;
3. simplify with onnxsim, its own numerical check on;
4. write the `mdx.*` metadata so the runtime needs nothing beside the file;
5. for fp16 / int8, convert (see quantize.py);
6. save under a temporary name beside the output (mdx.runtime.fileio.atomic_write), validate
   (validate.py), and only then rename it into place. Any failure, Ctrl-C or a full disk
   included, removes the temporary file and leaves an existing output as it was.

Errors a user can cause raise `ExportError` (one line); an output that cannot be written
raises `WriteError` (one line, naming the path and the reason); a failure of the tools raises
`ExportFailure`; a model that fails validation raises `ValidationError` with the numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch

from mdx.export.quantize import (INT8_ACTIVATIONS, INT8_SCOPES, CalibrationError, CalibrationReader, convert_fp16,
                                 make_calibration_set, quantize_int8)
from mdx.export.validate import (INPUT_NAMES, OUTPUT_NAMES, PRECISIONS, ValidationError, ValidationReport,
                                 all_nodes, onnx_opset, validate_onnx)
from mdx.runtime.fileio import atomic_write, write_error
from mdx.export.diffusers_import import DiffusersImportError, ScheduleOptions, is_diffusers_folder, load_diffusers
from mdx.train.checkpoint import (CKPT_DIR, WEIGHTS, CheckpointError, LoadedCheckpoint, find_checkpoint_dir,
                                  load_checkpoint)
from mdx.train.model import count_parameters
from mdx.train.unet2d import network_summary
from mdx.runtime import contract
from mdx.runtime.samplers import SAMPLERS, SamplerError, make_sampler
from mdx.runtime.schedules import Schedule

DEFAULT_OPSET = 17
MIN_OPSET = 13  # per-channel QDQ and the ops this model needs are all in opset 13
PRECISION_SUFFIX = {"fp32": "", "fp16": "-fp16", "int8": "-int8"}
PRECISION_DOC = {
    "fp32": "float32 weights and compute",
    "fp16": "float16 weights and compute, float32 inputs and output (for the CUDA provider)",
    "int8": "int8 QDQ static quantization of the {scope} convolutions, per-channel signed 7-bit weights, "
            "{act} activations (for the CPU provider)",
}
ACTIVATION_DOC = {"u8": "asymmetric uint8", "s8": "signed int8"}
SCOPE_DOC = {"context-free": "class-context-free", "all": "(all but the x_t-reading and last)"}
INPUT_DOCS = {
    "sample": "the noisy image x_t, float32 [batch, C, H, W], values about N(0, 1)",
    "timestep": "the timestep index t in 0..T-1, float32 [batch] (the graph normalises it)",
    "context": "class weights, float32 [batch, K]: one-hot, multi-hot to mix, all zeros = unconditional",
    "model_output": "the prediction named by mdx.prediction_type, float32 [batch, C, H, W]",
}


class ExportError(ValueError):
    """Bad input from the user (checkpoint, opset, output path, options); one line."""


class ExportFailure(RuntimeError):
    """The exporter or a conversion failed on a valid checkpoint; one line."""


def max_opset() -> int:
    """The highest opset both the installed torch exporter and onnx support."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as torch_max
    except ImportError:  # a private module; fall back to what the torch this was written for supports
        torch_max = 23
    return min(int(torch_max), onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> int:
    hi = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= hi:
        raise ExportError(f"unsupported opset {opset!r}; the installed exporter supports {MIN_OPSET}..{hi}")
    return opset


def parse_recommended(value: str | dict | None, schedule: Schedule) -> dict | None:
    """Check `--recommended` ({"sampler": ..., "steps": ..., "guidance": ...} and optionally
    "sampler_options": {sampler name: {make_sampler options}}, e.g. {"dpmpp": {"lambda_min_clipped": -3.0},
    "ddim": {"clip_sample": false}}, the options the model works best with); canonical dict or None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ExportError(f"--recommended is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ExportError(f"--recommended must be a JSON object, got {value!r}")
    keys, optional = {"sampler", "steps", "guidance"}, {"sampler_options"}
    if not keys <= set(value) <= keys | optional:
        raise ExportError(f"--recommended must have the keys guidance, sampler, steps (and optionally "
                          f"sampler_options); got {sorted(value)}")
    sampler, steps, guidance = value["sampler"], value["steps"], value["guidance"]
    if sampler not in SAMPLERS:
        raise ExportError(f"--recommended sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    T = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ExportError(f"--recommended steps must be an integer in 1..{T}, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise ExportError(f"--recommended guidance must be a number >= 0, got {guidance!r}")
    out = {"sampler": sampler, "steps": steps, "guidance": float(guidance)}
    if "sampler_options" in value:
        per_sampler = value["sampler_options"]
        if not isinstance(per_sampler, dict) or not all(isinstance(v, dict) for v in per_sampler.values()):
            raise ExportError("--recommended sampler_options must map sampler names to JSON objects of options, "
                              f"got {per_sampler!r}")
        for name, options in per_sampler.items():
            if name not in SAMPLERS:
                raise ExportError(f"--recommended sampler_options: {name!r} is not one of {', '.join(SAMPLERS)}")
            try:  # the runtime builds exactly this sampler, so check it can
                make_sampler(name, schedule, **options).set_timesteps(min(steps, T - 1))
            except (SamplerError, TypeError) as e:
                raise ExportError(f"--recommended sampler_options for {name}: {e}") from None
        out["sampler_options"] = per_sampler
    return out


def default_output(checkpoint: str | Path, precision: str) -> Path:
    """models/<run-folder-name>[-fp16|-int8].onnx, relative to the current directory."""
    p = Path(checkpoint).resolve()
    if p.is_file():
        name = p.parent.parent.name if p.parent.name == CKPT_DIR else p.stem
    elif p.name == CKPT_DIR:
        name = p.parent.name
    else:
        name = p.name
    return Path("models") / f"{name}{PRECISION_SUFFIX[precision]}.onnx"


# --- small helpers ----------------------------------------------------------------------------


def node_count(model: onnx.ModelProto) -> int:
    return len(all_nodes(model))


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@contextlib.contextmanager
def _quiet(capture: io.StringIO):
    """Hold the exporters' progress prints, warnings and log lines (shown only on failure)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(capture), contextlib.redirect_stderr(capture):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _tail(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


# --- torch -> ONNX ----------------------------------------------------------------------------


def example_inputs(model: torch.nn.Module, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with; batch 2 so the exporter does not specialise the batch to 1."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)  # (B, C, H, W)
    timestep = torch.linspace(0, cfg.num_train_timesteps - 1, batch)  # (B,)
    context = torch.nn.functional.one_hot(torch.arange(batch) % cfg.n_classes, cfg.n_classes).float()  # (B, K)
    return sample, timestep, context


def _export_dynamo(model, args, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model, args, None, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
        opset_version=opset, dynamo=True, external_data=False, verbose=False,
        dynamic_shapes={"sample": {0: batch}, "timestep": {0: batch}, "context": {0: batch}},
    )
    return program.model_proto


def _export_torchscript(model, args, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES}
    torch.onnx.export(
        model, args, buf, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
        opset_version=opset, dynamo=False, dynamic_axes=axes, do_constant_folding=True, verbose=False,
    )
    return onnx.load_from_string(buf.getvalue())


def torch_to_onnx(model: torch.nn.Module, opset: int, log: Callable[[str], None]) -> tuple[onnx.ModelProto, str, float]:
    """Export with the dynamo exporter, else the TorchScript one; (model, method, seconds).

    The file's opset must equal the request: the dynamo exporter builds at 18 and converts
    down, and when that conversion fails it keeps 18, which counts as a failure here.
    """
    args = example_inputs(model)
    attempts = [("dynamo", _export_dynamo), ("torchscript", _export_torchscript)]
    problems = []
    for method, export in attempts:
        held = io.StringIO()
        t0 = time.perf_counter()
        try:
            with _quiet(held), torch.no_grad():
                proto = export(model, args, opset)
        except Exception as e:  # noqa: BLE001 - reported, then the next exporter is tried
            problems.append(f"{method} exporter: {type(e).__name__}: {_tail(str(e) or held.getvalue(), 1)}")
            continue
        seconds = time.perf_counter() - t0
        got = onnx_opset(proto)
        if got != opset:
            problems.append(f"{method} exporter wrote opset {got}, not {opset} ({_tail(held.getvalue(), 1)})")
            continue
        if problems:
            log(f"  note       {problems[-1]}; used the {method} exporter instead")
        return proto, method, seconds
    raise ExportFailure("export failed: " + "; ".join(problems))


def simplify_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim with its own check (random inputs, batch 2) on; the batch stays dynamic."""
    import onnxsim

    cfg_shapes = {v.name: [2] + [d.dim_value for d in v.type.tensor_type.shape.dim[1:]] for v in model.graph.input}
    held = io.StringIO()
    try:
        with _quiet(held):
            simplified, ok = onnxsim.simplify(model, check_n=3, test_input_shapes=cfg_shapes, certify=False)
    except Exception as e:  # noqa: BLE001
        raise ExportFailure(f"onnxsim failed: {type(e).__name__}: {_tail(str(e), 1)}") from None
    if not ok:
        raise ExportFailure("onnxsim's check failed: the simplified model differs from the exported one")
    return simplified


# --- metadata ---------------------------------------------------------------------------------


def build_metadata(ckpt: LoadedCheckpoint, precision: str, recommended: dict | None) -> dict[str, str]:
    """The mdx.* metadata of docs/contract.md (all strings, JSON where structured)."""
    mc = ckpt.model_config
    return contract.model_metadata(
        image_size=mc.image_size, channels=mc.in_channels, class_names=ckpt.class_names,
        schedule=ckpt.schedule.to_dict(), prediction_type=ckpt.prediction_type, precision=precision,
        train_config=ckpt.config, checkpoint_sha256=ckpt.sha256, parameters=count_parameters(ckpt.model),
        recommended=recommended)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("microdiffusion")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        return "0"


GRAPH_NAMES = {"contextunet": "mdx_context_unet", "unet2d": "mdx_unet2d"}


def describe(ckpt: LoadedCheckpoint, precision: str, int8_activations: str = "u8", int8_scope: str = "context-free") -> str:
    mc, s = ckpt.model_config, ckpt.schedule
    how = PRECISION_DOC[precision].format(act=ACTIVATION_DOC[int8_activations], scope=SCOPE_DOC[int8_scope])
    return (f"mdx diffusion U-Net ({network_summary(ckpt.model)}): "
            f"{mc.n_classes} classes ({', '.join(ckpt.class_names)}), {mc.in_channels}x{mc.image_size}x"
            f"{mc.image_size} images, {ckpt.prediction_type} prediction, {s.kind} schedule with T="
            f"{s.num_train_timesteps}; {how}. Exported from {ckpt.path.name} "
            f"({ckpt.weights} weights, step {ckpt.step}, sha256 {ckpt.sha256[:12]}). "
            f"Inputs: sample, timestep, context; output: model_output. Sample it with mdx-sample.")


def finish_model(model: onnx.ModelProto, ckpt: LoadedCheckpoint, precision: str,
                 recommended: dict | None, int8_activations: str = "u8",
                 int8_scope: str = "context-free") -> onnx.ModelProto:
    """Set the metadata, producer and doc strings; drop other tools' metadata and unused opset imports."""
    del model.metadata_props[:]  # onnxsim and the quantizer leave their own notes; keep ours only
    for key, value in build_metadata(ckpt, precision, recommended).items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "mdx-export"
    model.producer_version = _version()
    model.model_version = int(ckpt.step)
    model.doc_string = describe(ckpt, precision, int8_activations, int8_scope)
    model.graph.name = GRAPH_NAMES[ckpt.architecture]
    for v in list(model.graph.input) + list(model.graph.output):
        v.doc_string = INPUT_DOCS.get(v.name, "")
    used = {n.domain for n in all_nodes(model)}
    keep = [imp for imp in model.opset_import if imp.domain in ("", "ai.onnx") or imp.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


# --- the whole export -------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What `export_checkpoint` did and measured."""

    path: Path
    precision: str
    opset: int
    method: str
    export_seconds: float
    simplified: bool
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    simplify_seconds: float = 0.0
    convert_seconds: float = 0.0
    calibration: str | None = None
    final_nodes: int = 0
    final_bytes: int = 0
    validation: ValidationReport | None = None
    total_seconds: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)


def check_options(precision: str, weights: str, opset: int, int8_activations: str,
                  calibration_data: str | None, int8_scope: str = "context-free") -> None:
    """ExportError for an option no export could use (before anything slow runs)."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if weights not in WEIGHTS:
        raise ExportError(f"unknown weights {weights!r}; choose {' or '.join(WEIGHTS)}")
    check_opset(opset)
    if int8_activations not in INT8_ACTIVATIONS:
        raise ExportError(f"unknown int8 activation type {int8_activations!r}; choose u8 or s8")
    if int8_scope not in INT8_SCOPES:
        raise ExportError(f"unknown int8 scope {int8_scope!r}; choose {' or '.join(INT8_SCOPES)}")
    if calibration_data is not None and precision != "int8":
        raise ExportError("--calibration-data is only used with --precision int8")


def check_output(out: Path) -> None:
    """The output must be a file path whose folder exists or can be made."""
    if out.is_dir():
        raise ExportError(f"cannot write {out}: it is a folder")
    existing = next((p for p in out.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ExportError(f"cannot write {out}: {existing} is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from None


def _calibration(ckpt: LoadedCheckpoint, calibration_data: str | None):
    train = ckpt.config.get("train") or {}
    spec = calibration_data or train.get("data") or "emoji16"
    labels = None if calibration_data else train.get("labels")
    cond_drop = train.get("cond_drop", 0.1)
    cond_drop = cond_drop if isinstance(cond_drop, (int, float)) and 0 <= cond_drop < 1 else 0.1
    mc = ckpt.model_config
    try:
        return make_calibration_set(spec, ckpt.schedule, ckpt.class_names, mc.in_channels, mc.image_size,
                                    labels=labels, cond_drop=cond_drop)
    except CalibrationError as e:
        hint = "" if calibration_data else " (pass --calibration-data SPEC)"
        raise ExportError(f"{e}{hint}") from None


def _load_diffusers(path: Path, schedule_options: ScheduleOptions | None, class_names: list[str] | None,
                    log: Callable[[str], None]) -> tuple[LoadedCheckpoint, dict | None]:
    """A diffusers folder as a checkpoint, with the recommendation its scheduler config makes."""
    try:
        found = load_diffusers(path, schedule_options, class_names)
    except DiffusersImportError as e:
        raise ExportError(str(e)) from None
    for note in found.notes:
        log(f"  note       {note}")
    loaded = LoadedCheckpoint(found.model, found.config, found.model.config, found.schedule, found.class_names,
                              found.prediction_type, "diffusers", found.path, found.sha256, 0, "unet2d")
    return loaded, found.recommended


def _load(path: str | Path, weights: str, schedule_options: ScheduleOptions | None = None,
          class_names: list[str] | None = None,
          log: Callable[[str], None] = print) -> tuple[LoadedCheckpoint, dict | None]:
    """An mdx run/checkpoint, or a diffusers folder; (checkpoint, the source's own recommendation)."""
    path = Path(path)
    if is_diffusers_folder(path):
        return _load_diffusers(path, schedule_options, class_names, log)
    given = [name for name, value in (("the schedule options", schedule_options and schedule_options.given()),
                                      ("--classes", class_names)) if value]
    if given:
        raise ExportError(f"{' and '.join(given)} apply to a diffusers model folder only; {path} is not one "
                          "(an mdx run carries its schedule and classes)")
    if path.is_dir() and find_checkpoint_dir(path) is None and not (path / WEIGHTS[weights]).is_file():
        raise ExportError(f"{path}: no checkpoint in this folder (expected {CKPT_DIR}/{WEIGHTS[weights]}), and it is "
                          "not a diffusers model folder either (no model_index.json, nor a config.json naming its "
                          "_class_name)")
    try:
        return load_checkpoint(path, weights=weights), None
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def _log_source(ckpt: LoadedCheckpoint, path: str | Path, out: Path, log: Callable[[str], None]) -> None:
    mc = ckpt.model_config
    log(f"mdx-export: {path} ({ckpt.weights} weights, step {ckpt.step}, sha256 {ckpt.sha256[:12]}) -> {out}")
    log(f"  model      {network_summary(ckpt.model)}, {mc.n_classes} classes, {mc.in_channels}x{mc.image_size}x"
        f"{mc.image_size}, {count_parameters(ckpt.model):,} parameters, {ckpt.prediction_type}, "
        f"{ckpt.schedule.kind} T={mc.num_train_timesteps}")


def export_graph(ckpt: LoadedCheckpoint, out: Path, precision: str, opset: int, simplify: bool,
                 log: Callable[[str], None]) -> tuple[onnx.ModelProto, ExportReport]:
    """torch -> ONNX, then onnxsim unless told not to; the report's first figures."""
    proto, method, export_s = torch_to_onnx(ckpt.model, opset, log)
    nodes0, bytes0 = node_count(proto), proto.ByteSize()
    log(f"  export     torch.onnx.export ({method} exporter), opset {opset}, {export_s:.1f} s: "
        f"{nodes0} nodes, {fmt_bytes(bytes0)}")
    simplify_s = 0.0
    if simplify:
        t0 = time.perf_counter()
        proto = simplify_model(proto)
        simplify_s = time.perf_counter() - t0
        log(f"  simplify   onnxsim (check on): {nodes0} -> {node_count(proto)} nodes, "
            f"{fmt_bytes(bytes0)} -> {fmt_bytes(proto.ByteSize())}, {simplify_s:.1f} s")
    else:
        log("  simplify   skipped (--no-simplify)")
    report = ExportReport(out, precision, opset, method, export_s, simplify, nodes0, node_count(proto),
                          bytes0, proto.ByteSize(), simplify_seconds=simplify_s)
    return proto, report


def _count_quantized(proto: onnx.ModelProto) -> str:
    """'q of n' convolutions whose weight comes from a DequantizeLinear (for the log)."""
    produced_by = {o: n.op_type for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    q = sum(produced_by.get(n.input[1]) == "DequantizeLinear" for n in convs)
    return f"{q} of {len(convs)}"


def convert_precision(proto: onnx.ModelProto, report: ExportReport, calib, int8_activations: str,
                      log: Callable[[str], None], int8_scope: str = "context-free") -> onnx.ModelProto:
    """fp16 conversion or int8 quantization (report.precision); fp32 passes through."""
    precision = report.precision
    if precision == "fp32":
        return proto
    t0 = time.perf_counter()
    if precision == "fp16":
        proto = convert_fp16(proto)
    else:
        report.calibration = calib.description
        log(f"  calibrate  {calib.description}")
        held = io.StringIO()
        try:
            with _quiet(held):
                proto = quantize_int8(proto, CalibrationReader(calib), int8_activations, int8_scope)
        except CalibrationError as e:  # nothing to quantize in this scope: the user's choice
            raise ExportError(str(e)) from None
        except Exception as e:  # noqa: BLE001
            raise ExportFailure(f"int8 quantization failed: {type(e).__name__}: {_tail(str(e), 1)}") from None
    report.convert_seconds = time.perf_counter() - t0
    what = {"fp16": "float16, float32 I/O",
            "int8": f"QDQ ({int8_scope} convolutions: {_count_quantized(proto)}), s8 per-channel 7-bit weights, "
                    f"{int8_activations} activations, Percentile ranges"}[precision]
    log(f"  {precision:<10} {what}: {node_count(proto)} nodes, {fmt_bytes(proto.ByteSize())}, "
        f"{report.convert_seconds:.1f} s")
    return proto


def save_and_validate(proto: onnx.ModelProto, tmp: Path, ckpt: LoadedCheckpoint, report: ExportReport,
                      log: Callable[[str], None]) -> None:
    """Save the model to the temporary file and validate it there (ValidationError says no file was written)."""
    onnx.save(proto, str(tmp))
    report.final_nodes, report.final_bytes = node_count(proto), tmp.stat().st_size
    try:
        report.validation = validate_onnx(tmp, ckpt.model, ckpt.schedule, report.precision, opset=report.opset)
    except ValidationError as e:
        raise ValidationError(f"{e}\n(no file written)", e.report) from None
    v = report.validation
    log(f"  validate   {', '.join(v.checks[:-1])}: ok ({v.seconds:.1f} s)")
    log("  parity     vs torch (eval mode), fresh random inputs:")
    for line in v.parity_lines():
        log(f"               {line}")


def export_checkpoint(path: str | Path, out: str | Path | None = None, opset: int = DEFAULT_OPSET,
                      precision: str = "fp32", weights: str = "ema", simplify: bool = True,
                      recommended: str | dict | None = None, calibration_data: str | None = None,
                      verbose: bool = True, int8_activations: str = "u8", int8_scope: str = "context-free",
                      schedule_options: ScheduleOptions | None = None,
                      class_names: list[str] | None = None) -> ExportReport:
    """Export a run folder, checkpoint folder, .safetensors file or diffusers folder to a validated ONNX file.

    A diffusers pipeline folder (model_index.json, unet/, scheduler/) or bare UNet2DModel folder
    is read by mdx.export.diffusers_import: `schedule_options` (bare folder only) give its schedule
    and `class_names` name its classes; its scheduler config's settings are the default `recommended`.

    out: the .onnx path (default models/<run-folder-name>[-fp16|-int8].onnx).
    recommended: {"sampler": "ddpm|ddim|dpmpp", "steps": n, "guidance": g} (JSON or dict) for mdx-sample.
    calibration_data: int8 only; a data spec for load_data (default: the run's training data).
    int8_activations: "u8" (default, ORT's fast x86 path) or "s8"; see quantize.py.
    int8_scope: "context-free" (default: only convolutions upstream of the class context, whose
    errors cancel in classifier-free guidance) or "all"; see quantize.int8_convs.
    Raises ExportError (bad input), WriteError (the output cannot be written), ExportFailure
    (a tool failed) or ValidationError (the numbers). Nothing is left at `out` unless it validated.
    """
    log: Callable[[str], None] = print if verbose else (lambda _msg: None)
    t_start = time.perf_counter()
    check_options(precision, weights, opset, int8_activations, calibration_data, int8_scope)
    ckpt, source_recommended = _load(path, weights, schedule_options, class_names, log)
    rec = parse_recommended(recommended if recommended is not None else source_recommended, ckpt.schedule)
    out = Path(out) if out is not None else default_output(path, precision)
    _log_source(ckpt, path, out, log)
    calib = _calibration(ckpt, calibration_data) if precision == "int8" else None  # bad data fails early
    check_output(out)
    # The temporary file beside `out` is made first (an unwritable folder fails before the slow
    # export), renamed onto `out` only once the model validated, and removed on any failure.
    with atomic_write(out) as tmp:
        proto, report = export_graph(ckpt, out, precision, opset, simplify, log)
        proto = convert_precision(proto, report, calib, int8_activations, log, int8_scope)
        proto = finish_model(proto, ckpt, precision, rec, int8_activations, int8_scope)
        report.metadata = {p.key: p.value for p in proto.metadata_props}
        save_and_validate(proto, tmp, ckpt, report, log)
    report.total_seconds = time.perf_counter() - t_start
    log(f"  wrote      {out} ({fmt_bytes(report.final_bytes)}, {report.final_nodes} nodes) "
        f"in {report.total_seconds:.1f} s")
    return report
