"""Reduced-precision variants of an exported model: fp16 (for CUDA) and int8 (for the CPU).

fp16: weights and arithmetic in float16, inputs and output kept float32 (onnxconverter-common's
converter with `keep_io_types`), so a runtime feeds both variants the same arrays.

int8: ONNX Runtime static quantization in the QDQ format of the convolutions that
`int8_convs` picks (by default only those upstream of the class context, see quantize_int8),
signed symmetric 7-bit weights per output channel, after `quant_pre_process` (shape inference +
graph optimisation). Activations are unsigned (asymmetric uint8) by default, signed on
request: measured with onnxruntime 1.31
on x86 (AVX-512 VNNI), batch 64, one thread, the default model (n_feat=64), ORT fuses all 21
DQ-Conv-Q groups into QLinearConv with uint8 activations (180 ms against 400 ms for fp32),
but only 2 of 21 with int8 activations, the rest running as float Conv between Q/DQ pairs
(540 ms, slower than fp32); the error against torch is the same (relative RMS 0.020 both;
these figures are of scope "all"). Activation ranges are calibrated on what the model sees
while sampling: real training images x_0 noised to x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (docs/contract.md) at timesteps spread
evenly over 0..T-1, with their one-hot classes and some all-zero (unconditional) contexts.
Everything is seeded, so the same checkpoint and data give the same int8 file.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from mdx.runtime.contract import INPUTS  # (sample, timestep, context): docs/contract.md

CALIBRATION_IMAGES = 1024  # the issue asks for at least 256; 1024 measured closer to fp32 (see quantize_int8)
CALIBRATION_BATCH = 32


class CalibrationError(ValueError):
    """Calibration data that cannot be used with this model (the message says why)."""


# --- fp16 -----------------------------------------------------------------------------------


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and compute in float16; float32 inputs and output (Cast nodes at the edges)."""
    from onnxconverter_common.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        # It warns for every weight it clamps into float16's range; validation measures the effect.
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model, keep_io_types=True)


# --- int8 calibration -----------------------------------------------------------------------


@dataclass
class CalibrationSet:
    """Model inputs for calibration: noised real images with their timesteps and contexts."""

    sample: np.ndarray    # (N, C, H, W) float32, x_t
    timestep: np.ndarray  # (N,) float32, t in 0..T-1
    context: np.ndarray   # (N, K) float32, one-hot or all zero
    description: str      # for the report: what data, how many images, seed

    def __len__(self) -> int:
        return len(self.timestep)


def _noise(schedule, x0: np.ndarray, eps: np.ndarray, t: np.ndarray) -> np.ndarray:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4)."""
    try:
        from mdx.runtime.samplers import add_noise
    except ImportError:  # the runtime's samplers are the reference; this is the same formula
        abar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * eps).astype(np.float32)
    return add_noise(schedule, x0, eps, t)


def _context_rows(data_names: tuple[str, ...], model_names: list[str], labels: np.ndarray) -> tuple[np.ndarray, str]:
    """Model class index per image (-1: no matching class, an all-zero context) and a note."""
    if list(data_names) == list(model_names):
        return labels, ""
    by_name = {name: i for i, name in enumerate(model_names)}
    mapping = np.array([by_name.get(n, -1) for n in data_names], dtype=np.int64)
    if (mapping >= 0).any():
        return mapping[labels], " (classes matched by name)"
    if len(data_names) == len(model_names):
        return labels, " (class names differ from the model's; labels used by index)"
    return np.full_like(labels, -1), " (no class matches the model's; all contexts zero)"


def make_calibration_set(data_spec: str, schedule, class_names: list[str], channels: int, image_size: int, *,
                         labels: str | None = None, n: int = CALIBRATION_IMAGES, cond_drop: float = 0.1,
                         seed: int = 0) -> CalibrationSet:
    """n noised training images (at least `n`; repeated, with fresh noise, if the set is smaller).

    Timesteps are stratified: one in each of n equal slices of 0..T-1, so every part of the
    noise range is represented. A `cond_drop` fraction of contexts is all zero, like the
    classifier-free-guidance dropout of training.
    """
    from mdx.runtime.images import to_float
    from mdx.train.data import DataError, load_data

    try:
        data = load_data(data_spec, image_size=image_size, labels=labels)
    except DataError as e:
        raise CalibrationError(f"calibration data: {e}") from None
    if data.images.shape[-1] != channels:
        raise CalibrationError(f"calibration data {data_spec!r} has {data.images.shape[-1]} channels, "
                               f"the model {channels}")
    rng = np.random.default_rng(seed)
    N, T, K = len(data.labels), schedule.num_train_timesteps, len(class_names)
    idx = rng.permutation(N)[:n] if N >= n else np.concatenate([np.arange(N), rng.integers(0, N, n - N)])
    x0 = to_float(data.images[idx])  # (n, C, H, W) in [-1, 1]
    t = np.floor((np.arange(n) + rng.random(n)) * T / n).astype(np.int64).clip(0, T - 1)
    t = rng.permutation(t)
    eps = rng.standard_normal(x0.shape, dtype=np.float32)
    x_t = _noise(schedule, x0, eps, t)
    cls, note = _context_rows(tuple(data.class_names), class_names, data.labels[idx])
    context = np.zeros((n, K), dtype=np.float32)
    keep = cls >= 0
    context[np.flatnonzero(keep), cls[keep]] = 1.0
    context[rng.permutation(n)[: int(round(n * cond_drop))]] = 0.0  # unconditional rows
    repeated = f", {N} images repeated" if N < n else ""
    desc = f"{n} {data_spec} images{repeated}, t stratified over 0..{T - 1}, {int(round(n * cond_drop))} " \
           f"zero contexts, seed {seed}{note}"
    return CalibrationSet(np.ascontiguousarray(x_t, dtype=np.float32), t.astype(np.float32), context, desc)


class CalibrationReader(CalibrationDataReader):
    """Feeds a CalibrationSet to ONNX Runtime's calibrator in batches; rewindable."""

    def __init__(self, calibration: CalibrationSet, batch_size: int = CALIBRATION_BATCH) -> None:
        self.calibration = calibration
        self.batch_size = batch_size
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        c, i = self.calibration, self._start
        if i >= len(c):
            return None
        self._start = i + self.batch_size
        j = self._start
        return {"sample": c.sample[i:j], "timestep": c.timestep[i:j], "context": c.context[i:j]}

    def rewind(self) -> None:
        self._start = 0

    def __len__(self) -> int:
        return -(-len(self.calibration) // self.batch_size)


# --- int8 quantization ----------------------------------------------------------------------


INT8_ACTIVATIONS = ("u8", "s8")
INT8_SCOPES = ("context-free", "all")
CONV_OPS = ("Conv", "ConvTranspose")
SHAPE_OPS = ("Shape", "Size")  # outputs that depend on an input's shape, not its values


def context_dependent_nodes(graph: onnx.GraphProto, source: str = INPUTS[2]) -> set[str]:
    """Names of the nodes whose output depends, directly or through others, on the values of the
    graph input `source`.

    ONNX graphs are stored in topological order, so one forward pass finds them all. Shape and
    Size read only the shape (an exporter may take the batch size from `context`), so the
    dependence stops there."""
    tainted, nodes = {source}, set()
    for node in graph.node:
        if node.op_type not in SHAPE_OPS and any(name in tainted for name in node.input):
            tainted.update(node.output)
            nodes.add(node.name)
    return nodes


def int8_convs(model: onnx.ModelProto, scope: str = "context-free") -> tuple[list[str], list[str]]:
    """Which convolutions int8 quantizes: (quantized, kept in float32), each in graph order.

    Convolutions that read the graph input `sample` (the raw x_t) and the last one (it writes
    the prediction) always stay float32; with scope "all" every other is quantized. With scope
    "context-free" (the default) only the convolutions upstream of the class context are
    quantized (in an unconditional network, which ignores `context`, that is all of them):
    their inputs are the same for the conditional and the unconditional half of a guidance
    batch, so their rounding errors are the same in both and cancel in eps_c - eps_u, the
    difference classifier-free guidance multiplies by its scale (see quantize_int8).
    """
    if scope not in INT8_SCOPES:
        raise ValueError(f"unknown int8 scope {scope!r}; choose {' or '.join(INT8_SCOPES)}")
    convs = [n for n in model.graph.node if n.op_type in CONV_OPS]
    keep = {n.name for n in convs if INPUTS[0] in n.input} | ({convs[-1].name} if convs else set())
    if scope == "context-free":
        keep |= context_dependent_nodes(model.graph) & {n.name for n in convs}
    return [n.name for n in convs if n.name not in keep], [n.name for n in convs if n.name in keep]


def quantize_int8(model: onnx.ModelProto, reader: CalibrationDataReader, activations: str = "u8",
                  scope: str = "context-free") -> onnx.ModelProto:
    """Static QDQ quantization: int8 weights per channel, u8 (or s8) activations, Percentile ranges.

    Only convolutions are quantized (they hold nearly all the FLOPs), and of them only those
    `int8_convs(scope)` names. The scope matters because of classifier-free guidance: the
    sampler uses eps_u + g (eps_c - eps_u), and the difference eps_c - eps_u is small, so a
    rounding error that differs between the two halves is multiplied by g. Measured on the
    fine-tuned emoji16 (AMD EPYC Zen 3, AVX2; 256 noised training images, guidance 5, against
    fp32): with every convolution but the first and the last quantized (MinMax ranges, the
    previous rule) the error of eps_c - eps_u was 119% of its size and mdx-eval's FD 2.20 against
    1.93 for fp32 (n = 900, DPM-Solver++ 20, guidance 5); keeping also the 1x1 shortcut that
    reads x_t and the second-to-last float, with Percentile ranges: 37%, FD 2.16; "context-free"
    (the down path of the ContextUnet, 10 of 24 convolutions, 80 of its 150 M multiply-adds):
    6.3%, FD **1.88**, conditional accuracy 0.791 against 0.796. The price is speed: one forward
    pass at batch 128 on two threads, the three files side by side, 378 ms against 322 ms for
    scope "all" and 419 ms for fp32 (the benchmark suite's figures are in the README).

    Percentile (99.999) ranges: with this scope they measured better than MinMax (guided
    output relative RMS 0.027 against 0.034); Entropy was no better than MinMax.

    Weights use 7 bits of the int8 range (`reduce_range`): on x86 CPUs without VNNI (AVX2 only,
    e.g. an AMD EPYC Zen 3) ONNX Runtime's u8 x s8 kernels add pairs of products in int16
    (vpmaddubsw), which saturates with full-range weights. Measured there (mdx-eval, n = 900,
    DPM-Solver++ 20, guidance 5) on the fine-tuned emoji16, scope "all": FD 4.93 with 8-bit
    weights against 2.20 with 7-bit and 1.93 in fp32 (relative RMS on N(0, 1) inputs 0.079 -> 0.029).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if activations not in INT8_ACTIVATIONS:
        raise ValueError(f"unknown int8 activation type {activations!r}; choose u8 or s8")
    activation_type = QuantType.QUInt8 if activations == "u8" else QuantType.QInt8

    with tempfile.TemporaryDirectory(prefix="mdx-int8-") as tmp:
        fp32, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(fp32))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs a warning per 1-D weight it keeps per-tensor
        try:
            quant_pre_process(str(fp32), str(pre))
            quantized, kept = int8_convs(onnx.load(str(pre)), scope)
            if not quantized:
                raise CalibrationError(f"no convolution to quantize with int8 scope {scope!r} (every one "
                                       "depends on the class context, reads x_t or is the last); try --int8-scope all")
            quantize_static(
                str(pre), str(out), reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,  # 7-bit weights: see the docstring
                activation_type=activation_type,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Percentile,
                op_types_to_quantize=list(CONV_OPS),
                nodes_to_exclude=kept,
            )
        finally:
            root.setLevel(level)
        return onnx.load(str(out))
