"""Validate an exported ONNX model against the torch model it came from.

`validate_onnx` runs every check the exporter promises before it keeps a file, and
can be used on its own (the benchmark suite, a hand-made file):

1. the file is one self-contained model (no external weights);
2. `onnx.checker.check_model(full_check=True)` and strict shape inference pass;
3. the graph is static: no `If`, `Loop`, `Scan`, and no random ops;
4. the interface is docs/contract.md's model contract (names, float32, one symbolic batch
   dimension shared by all inputs and the output) and the `mdx.*` metadata is present
   and agrees with the model;
5. an ONNX Runtime CPU session loads it;
6. numerical parity with the torch model in eval mode on fresh random inputs, batch
   1, 7 and 64, timesteps spread over 0..T-1, one-hot, multi-hot and all-zero contexts.

fp32 is held to an absolute bound (max |onnx - torch| <= 1e-4). fp16 and int8 change the
arithmetic, so they are held to the relative RMS error of the whole output,
||y - y_ref||_2 / ||y_ref||_2, with the bounds in `TOLERANCES` (measured, see there).

A failed check raises `ValidationError`, whose message carries the numbers and whose
`report` holds everything measured up to the failure.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from mdx.runtime.contract import INPUTS, OUTPUT, PRECISIONS, PREDICTION_TYPES, REQUIRED_METADATA

INPUT_NAMES = INPUTS
OUTPUT_NAMES = (OUTPUT,)
BATCH_SIZES = (1, 7, 64)

# Ops that would make the graph data-dependent or non-deterministic.
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                        "Multinomial", "Bernoulli"})

# (metric, bound) per precision. fp32: the arithmetic is the same as torch's up to
# operation order, so an absolute bound. fp16 and int8: relative RMS error of the output.
# Measured (batches 1/7/64, these parity inputs): fp16 1.5e-4..4.7e-4 relative RMS on the
# default model (n_feat=64, 9 classes, 16x16, 400 training steps) and on a tiny random one;
# the bound 5e-3 leaves 10x. int8 (QDQ, per-channel weights, MinMax calibration on 256
# noised images): 0.019..0.023 on the trained default model and 0.037..0.044 on the tiny
# untrained test model, whose weak deep paths make the output more sensitive; the bound 0.10
# leaves 4x over the trained figure and 2x over the worst seen. (On noised real images the
# trained model's int8 error is 0.03 overall and 0.066 for t < 100, where x_t is nearly clean:
# sample quality is for mdx-eval to judge, this bound only catches a broken quantization.)
# An earlier shipped model (n_feat=32, 15,000 steps; convs quantized, first and last in
# float) measured 0.026 / 0.11 / 0.071 at batches 1/7/64: its activations on N(0, 1) inputs at
# small t (where a real x_t is a nearly clean image) fall outside the ranges calibrated on real
# noised images, and saturate. The bound is therefore 0.20 (1.8x over that); a broken
# quantization gives ~1. The shipped model (n_feat=64, fine-tuned) measured 0.022 / 0.030 / 0.029
# with scope "all" and 0.006 / 0.009 / 0.009 with the default "context-free" scope (quantize.py).
# mdx-eval measures the shipped int8 model's FD (models/README.md).
TOLERANCES: dict[str, tuple[str, float]] = {
    "fp32": ("max_abs", 1e-4),
    "fp16": ("rel_rms", 5e-3),
    "int8": ("rel_rms", 0.20),
}


class ValidationError(RuntimeError):
    """An exported model failed a check; the message names it with the numbers."""

    def __init__(self, message: str, report: "ValidationReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ParityRow:
    """Parity of one batch: the error figures and the bound they are held to."""

    batch: int
    max_abs: float
    rel_rms: float
    metric: str
    tolerance: float

    @property
    def value(self) -> float:
        return self.max_abs if self.metric == "max_abs" else self.rel_rms

    @property
    def ok(self) -> bool:
        # NaN compares False, so a non-finite output fails.
        return bool(self.value <= self.tolerance)


@dataclass
class ValidationReport:
    """What `validate_onnx` checked and measured."""

    path: Path
    precision: str
    opset: int | None = None
    nodes: int = 0
    size_bytes: int = 0
    checks: list[str] = field(default_factory=list)
    parity: list[ParityRow] = field(default_factory=list)
    seconds: float = 0.0
    openvino: list[str] = field(default_factory=list)  # reported, not enforced (openvino_parity)

    @property
    def ok(self) -> bool:
        return bool(self.parity) and all(r.ok for r in self.parity)

    def parity_lines(self) -> list[str]:
        """A small table: batch, max |err|, relative RMS, the bound and the verdict."""
        if not self.parity:
            return []
        metric = self.parity[0].metric
        bound = "max |err| <=" if metric == "max_abs" else "rel RMS <="
        lines = [f"{'batch':>5}  {'max |err|':>10}  {'rel RMS':>10}  {bound} {self.parity[0].tolerance:g}"]
        for r in self.parity:
            lines.append(f"{r.batch:>5}  {r.max_abs:>10.3e}  {r.rel_rms:>10.3e}  {'ok' if r.ok else 'FAILED'}")
        return lines + self.openvino

    def worst(self) -> ParityRow | None:
        """The batch furthest over (or nearest to) its bound; non-finite output first."""
        return max(self.parity, key=lambda r: (not np.isfinite(r.value), r.value / max(r.tolerance, 1e-30)),
                   default=None)


# --- graph checks ---------------------------------------------------------------------------


def iter_nodes(graph: onnx.GraphProto):
    """Every node of a graph, including those of subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes = list(iter_nodes(model.graph))
    for fn in model.functions:
        nodes.extend(fn.node)
    return nodes


def onnx_opset(model: onnx.ModelProto) -> int | None:
    """The default-domain (ai.onnx) opset a model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """A value's shape: ints for fixed dims, names for symbolic ones, None for unknown."""
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def check_self_contained(model: onnx.ModelProto) -> None:
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ValueError(f"{len(external)} initializers are stored in external files (e.g. {external[0]}); "
                         "the model must be one self-contained file")


def check_static_graph(model: onnx.ModelProto) -> None:
    found = sorted({n.op_type for n in all_nodes(model)} & (CONTROL_FLOW_OPS | RANDOM_OPS))
    if found:
        raise ValueError(f"graph contains forbidden ops {', '.join(found)} (no control flow or random ops allowed)")


def check_contract(model: onnx.ModelProto, channels: int, image_size: int, n_classes: int) -> str:
    """Inputs/outputs as docs/contract.md's contract; returns the batch dimension's name."""
    g = model.graph
    init_names = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in init_names]
    names_in, names_out = tuple(v.name for v in inputs), tuple(v.name for v in g.output)
    if names_in != INPUT_NAMES or names_out != OUTPUT_NAMES:
        raise ValueError(f"interface is {list(names_in)} -> {list(names_out)}, "
                         f"expected {list(INPUT_NAMES)} -> {list(OUTPUT_NAMES)}")
    if len(g.input) != len(inputs):
        raise ValueError("initializers are listed as graph inputs; only sample, timestep, context may be inputs")
    C, H, K = channels, image_size, n_classes
    expected = {"sample": [C, H, H], "timestep": [], "context": [K], "model_output": [C, H, H]}
    batch_names = set()
    for v in list(g.input) + list(g.output):
        elem = v.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            raise ValueError(f"{v.name} has type {onnx.TensorProto.DataType.Name(elem)}, expected FLOAT (float32)")
        dims = _dims(v)
        if len(dims) != 1 + len(expected[v.name]) or dims[1:] != expected[v.name]:
            want = ["batch"] + expected[v.name]
            raise ValueError(f"{v.name} has shape {dims}, expected {want}")
        if not isinstance(dims[0], str):
            raise ValueError(f"{v.name}: the batch dimension is {dims[0]!r}, not symbolic (dynamic)")
        batch_names.add(dims[0])
    if len(batch_names) != 1:
        raise ValueError(f"inputs and output use different batch dimensions {sorted(batch_names)}")
    return batch_names.pop()


def check_metadata(model: onnx.ModelProto, precision: str, channels: int, image_size: int,
                   n_classes: int, schedule) -> dict[str, str]:
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ValueError(f"metadata lacks {', '.join(missing)}")

    def expect(key: str, got, want) -> None:
        if got != want:
            raise ValueError(f"metadata {key} is {got!r}, expected {want!r}")

    try:
        expect("mdx.format", meta["mdx.format"], "1")
        expect("mdx.precision", meta["mdx.precision"], precision)
        expect("mdx.image_size", int(meta["mdx.image_size"]), image_size)
        expect("mdx.channels", int(meta["mdx.channels"]), channels)
        classes = json.loads(meta["mdx.classes"])
        if not isinstance(classes, list) or len(classes) != n_classes:
            raise ValueError(f"metadata mdx.classes must list {n_classes} names, got {meta['mdx.classes']}")
        if schedule is not None:
            expect("mdx.schedule", json.loads(meta["mdx.schedule"]), schedule.to_dict())
            expect("mdx.num_train_timesteps", int(meta["mdx.num_train_timesteps"]), schedule.num_train_timesteps)
        json.loads(meta["mdx.train_config"])
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"metadata is not valid: {e}") from None
    if meta["mdx.prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"metadata mdx.prediction_type is {meta['mdx.prediction_type']!r}")
    return meta


# --- parity ---------------------------------------------------------------------------------


def parity_inputs(batch: int, channels: int, image_size: int, n_classes: int, num_train_timesteps: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random contract inputs: N(0, 1) samples, timesteps spread over 0..T-1, and contexts
    cycling one-hot, multi-hot (2+ classes) and all-zero (unconditional) rows."""
    T, K = num_train_timesteps, n_classes
    sample = rng.standard_normal((batch, channels, image_size, image_size), dtype=np.float32)
    if batch == 1:
        timestep = rng.integers(0, T, size=1)
    else:  # evenly spread, both ends included, in random order
        timestep = rng.permutation(np.round(np.linspace(0, T - 1, batch)).astype(np.int64))
    context = np.zeros((batch, K), dtype=np.float32)
    for i in range(batch):
        kind = i % 3
        if kind == 0:
            context[i, rng.integers(0, K)] = 1.0
        elif kind == 1:
            k = rng.integers(2, K + 1) if K >= 2 else 1
            context[i, rng.choice(K, size=k, replace=False)] = 1.0
        # kind 2: all zeros, the unconditional model
    return {"sample": sample, "timestep": timestep.astype(np.float32), "context": context}


def torch_reference(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The torch model's output in eval mode, float32 on the CPU."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            args = [torch.from_numpy(feeds[n]).to(device) for n in INPUT_NAMES]
            return model(*args).float().cpu().numpy()
    finally:
        model.train(was_training)


def error_figures(y: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |y - ref|, ||y - ref||_2 / ||ref||_2), in float64; NaN for non-finite output."""
    y64, ref64 = y.astype(np.float64), ref.astype(np.float64)
    if y.shape != ref.shape or not np.all(np.isfinite(y64)):
        return float("nan"), float("nan")
    diff = y64 - ref64
    rel = float(np.sqrt(np.mean(diff**2)) / max(np.sqrt(np.mean(ref64**2)), 1e-12))
    return float(np.max(np.abs(diff))), rel


def _cpu_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only; a rejected model raises anyway
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


# --- the whole validation -------------------------------------------------------------------


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_graph(model: onnx.ModelProto, report: ValidationReport, fail: Callable[[str, str], None], *,
                 channels: int, image_size: int, n_classes: int, schedule, metadata: bool, opset: int | None) -> None:
    """Stages 1-4 on the loaded file; each one passed is appended to report.checks."""
    C, H, K, precision = channels, image_size, n_classes, report.precision
    stages = [
        ("self-contained", lambda: check_self_contained(model)),
        ("onnx.checker", lambda: onnx.checker.check_model(model, full_check=True)),
        ("shape inference", lambda: onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)),
        ("static graph", lambda: check_static_graph(model)),
        ("contract", lambda: check_contract(model, C, H, K)),
    ]
    if metadata:
        stages.append(("metadata", lambda: check_metadata(model, precision, C, H, K, schedule)))
    for stage, check in stages:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - every failure is reported, none swallowed
            fail(stage, _first_line(e))
        report.checks.append(stage)
    if opset is not None and report.opset != opset:
        fail("opset", f"the file's opset is {report.opset}, {opset} was requested")
    if opset is not None:
        report.checks.append(f"opset {opset}")


def _check_parity(session, torch_model: torch.nn.Module, report: ValidationReport, fail: Callable[[str, str], None],
                  *, num_train_timesteps: int, batch_sizes: tuple[int, ...], seed: int,
                  tolerance: float | None) -> list[tuple[dict, np.ndarray]]:
    """Stage 6: ONNX Runtime against torch per batch size; the (inputs, output) runs; ValidationError over the bound."""
    cfg, precision = torch_model.config, report.precision
    metric, bound = TOLERANCES[precision]
    bound = bound if tolerance is None else float(tolerance)
    rng = np.random.default_rng(seed)
    runs: list[tuple[dict, np.ndarray]] = []  # (inputs, CPU provider output) per batch
    for b in batch_sizes:
        feeds = parity_inputs(b, cfg.in_channels, cfg.image_size, cfg.n_classes, num_train_timesteps, rng)
        ref = torch_reference(torch_model, feeds)
        try:
            (y,) = session.run(list(OUTPUT_NAMES), feeds)
        except Exception as e:  # noqa: BLE001
            fail("onnxruntime", f"running batch {b} failed ({_first_line(e)})")
        runs.append((feeds, y))
        max_abs, rel_rms = error_figures(y, ref)
        report.parity.append(ParityRow(b, max_abs, rel_rms, metric, bound))
    if not report.ok:
        w = report.worst()
        name = "max |err|" if metric == "max_abs" else "relative RMS error"
        fail("parity with torch", f"{precision} {name} {w.value:.3e} at batch {w.batch} exceeds {bound:g}\n"
             + "\n".join(report.parity_lines()))
    report.checks.append("parity")
    return runs


def validate_onnx(path: str | Path, torch_model: torch.nn.Module, schedule, precision: str = "fp32", *,
                  opset: int | None = None, batch_sizes: tuple[int, ...] = BATCH_SIZES, seed: int = 20240,
                  tolerance: float | None = None, metadata: bool = True) -> ValidationReport:
    """Check an exported model file; return the report or raise ValidationError.

    torch_model: the model it was exported from (its `config` gives C, H and K).
    schedule: its Schedule (T for the timesteps; compared with the metadata).
    opset: when given, the file's ai.onnx opset must equal it.
    tolerance: override the precision's bound in TOLERANCES (same metric).
    metadata: check the mdx.* metadata (off for a foreign file without it).
    """
    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    t0 = time.perf_counter()
    path = Path(path)
    report = ValidationReport(path=path, precision=precision)
    cfg = torch_model.config

    def fail(stage: str, detail: str) -> None:
        report.seconds = time.perf_counter() - t0
        raise ValidationError(f"validation failed: {stage}: {detail}", report)

    try:
        model = onnx.load(str(path), load_external_data=False)  # so that external weights are seen
    except Exception as e:  # noqa: BLE001 - any parse error means the file is unusable
        fail("load", f"{path} is not a readable ONNX file ({type(e).__name__}: {e})")
    report.opset = onnx_opset(model)
    report.nodes = len(all_nodes(model))
    report.size_bytes = path.stat().st_size
    _check_graph(model, report, fail, channels=cfg.in_channels, image_size=cfg.image_size,
                 n_classes=cfg.n_classes, schedule=schedule, metadata=metadata, opset=opset)
    try:
        session = _cpu_session(path)
    except Exception as e:  # noqa: BLE001
        fail("onnxruntime", f"the CPU session cannot load the model ({_first_line(e)})")
    report.checks.append("onnxruntime CPU session")
    runs = _check_parity(session, torch_model, report, fail, num_train_timesteps=schedule.num_train_timesteps,
                         batch_sizes=batch_sizes, seed=seed, tolerance=tolerance)
    report.seconds = time.perf_counter() - t0
    report.openvino = openvino_parity(path, runs)
    return report


def openvino_parity(path: Path, runs: list[tuple[dict, np.ndarray]]) -> list[str]:
    """OpenVINO against the CPU provider on the same inputs: fp32 max |err| and bf16 relative
    RMS, one line each, reported and not enforced (bf16 is a speed option whose quality
    mdx-eval judges). [] without the plugin; a line saying why where a precision cannot run."""
    from mdx.runtime.providers import openvino_installed
    from mdx.runtime.session import ModelError, open_session

    if not openvino_installed():
        return []
    lines = []
    for precision in ("fp32", "bf16"):
        try:
            session = open_session(path, "openvino", compute_precision=precision)[0]
        except ModelError as e:
            lines.append(f"OpenVINO {precision}: not run ({e})")
            continue
        figures = [error_figures(session.run(list(OUTPUT_NAMES), feeds)[0], y) for feeds, y in runs]
        worst = max(f[0] for f in figures) if precision == "fp32" else max(f[1] for f in figures)
        name = "max |err|" if precision == "fp32" else "relative RMS"
        lines.append(f"OpenVINO {precision} vs the CPU provider: {name} {worst:.3e} (batches "
                     f"{', '.join(str(len(y)) for _, y in runs)}; reported, not enforced)")
    return lines
