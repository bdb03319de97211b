"""Fine-tune from an exported model: the ContextUnet's torch weights recovered from an mdx ONNX file.

`mdx-train --init-from models/emoji16.onnx` continues training the shipped model although its
run folder is gone. The fp32 file keeps every weight under its state-dict name (the exporter
names initializers after parameters) except two kinds, which this module rebuilds:

- BatchNorm: export folded each BatchNorm2d (eval mode, running statistics) into the conv
  before it, W' = W * gamma / sigma, b' = (b - mu) * gamma / sigma + beta. The conv takes
  (W', b'); the BatchNorm is then set so that it passes the folded conv's output through
  unchanged in eval mode AND in train mode: its running mean and variance are the measured
  per-channel statistics m, v of its input on noised training images, and its affine
  gamma = sqrt(v + eps), beta = m undoes the normalisation. In train mode a batch's own
  statistics stand in for (m, v), as they did during the original training.
- GroupNorm: its affine weight and bias are anonymous constants of the decomposed
  InstanceNormalization -> Reshape -> Mul -> Add pattern; they are matched to the GroupNorm
  modules in graph order.

The recovered network is checked against the file itself (onnxruntime, eval mode) before
training starts; a file it cannot reproduce is refused. Only fp32 ContextUnet files qualify:
an int8 or fp16 file no longer holds the fp32 weights, and UNet2DModel files name their
weights differently (fine-tune those from their run folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mdx.runtime.contract import PRECISION, TRAIN_CONFIG, read_metadata
from mdx.train.errors import TrainError

PARITY_BOUND = 1e-4  # max abs difference, eval mode, against the file on onnxruntime
CALIBRATION_BATCHES, CALIBRATION_BATCH = 8, 256


def onnx_run_config(path: str | Path) -> dict:
    """The run description (config.json's content) the exporter stored in an fp32 mdx ONNX file."""
    try:
        metadata = read_metadata(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
        raise TrainError(f"--init-from: cannot read {path} ({type(e).__name__}: {e})") from None
    if TRAIN_CONFIG not in metadata:
        raise TrainError(f"--init-from: {path} has no {TRAIN_CONFIG} metadata (not exported by mdx-export)")
    precision = metadata.get(PRECISION, "fp32")
    if precision != "fp32":
        raise TrainError(f"--init-from: {path} is a {precision} file; its fp32 weights are gone, "
                         f"start from the fp32 export instead")
    config = json.loads(metadata[TRAIN_CONFIG])
    if config.get("architecture", "contextunet") != "contextunet":
        raise TrainError(f"--init-from: {path} is a {config['architecture']} model; only ContextUnet files can "
                         f"be fine-tuned from ONNX (start from its run folder)")
    return config


def _initializers(path: Path) -> tuple[dict[str, np.ndarray], "object"]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise TrainError("--init-from an .onnx file needs the onnx package: pip install 'microdiffusion[export]'") from None
    model = onnx.load(str(path))
    return {i.name: np.array(numpy_helper.to_array(i)) for i in model.graph.initializer}, model.graph


def _group_norm_affines(graph, tensors: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of each decomposed GroupNorm, in graph order: the first Mul and Add with a
    constant input after each InstanceNormalization."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def next_with_constant(start: str, op: str) -> tuple[np.ndarray, str]:
        frontier = [start]
        for _ in range(4):  # Reshape / Mul / Add sit within a few nodes of the norm
            nodes = [n for name in frontier for n in consumers.get(name, [])]
            for node in nodes:
                constants = [tensors[i] for i in node.input if i in tensors]
                if node.op_type == op and constants:
                    return constants[0], node.output[0]
            frontier = [o for n in nodes for o in n.output]
        raise TrainError(f"--init-from: cannot find the GroupNorm {op} after {start}")

    affines = []
    for node in graph.node:
        if node.op_type == "InstanceNormalization":
            weight, after_mul = next_with_constant(node.output[0], "Mul")
            bias, _ = next_with_constant(after_mul, "Add")
            affines.append((np.array(weight).reshape(-1), np.array(bias).reshape(-1)))
    return affines


def _load_named(model: torch.nn.Module, tensors: dict[str, np.ndarray], affines: list) -> list[torch.nn.BatchNorm2d]:
    """Copy every weight the file names; GroupNorm affines in order; returns the BatchNorms to calibrate."""
    modules = dict(model.named_modules())
    norms = [m for m in modules.values() if isinstance(m, torch.nn.GroupNorm)]
    if len(norms) != len(affines):
        raise TrainError(f"--init-from: the file has {len(affines)} GroupNorms, the network {len(norms)}")
    for norm, (weight, bias) in zip(norms, affines):
        norm.weight.data.copy_(torch.from_numpy(weight))
        norm.bias.data.copy_(torch.from_numpy(bias))
    batch_norms = [m for m in modules.values() if isinstance(m, torch.nn.BatchNorm2d)]
    owned = {f"{name}.{p}" for name, m in modules.items() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))
             for p in ("weight", "bias")}
    for name, param in model.named_parameters():
        if name in owned:
            continue
        if name not in tensors:
            raise TrainError(f"--init-from: the file has no weight {name}")
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise TrainError(f"--init-from: {name} has shape {tensors[name].shape} in the file, "
                             f"{tuple(param.shape)} in the network")
        param.data.copy_(torch.from_numpy(tensors[name]))
    for bn in batch_norms:  # identity in eval mode until calibrated: (x - 0) / sqrt(1 - eps + eps)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.data.fill_(1.0)
        bn.bias.data.zero_()
    return batch_norms


@torch.no_grad()
def _calibrate(model: torch.nn.Module, batch_norms: list, images: torch.Tensor, sqrt_abar: torch.Tensor,
               sqrt_one_minus_abar: torch.Tensor, n_classes: int, seed: int) -> None:
    """Measure each BatchNorm's input statistics on noised training images (random t, classes,
    10% unconditional), then make it the identity that normalises with them."""
    g = torch.Generator().manual_seed(seed)
    sums = {bn: [0.0, 0.0, 0] for bn in batch_norms}

    def hook(bn, inputs, _output):
        x = inputs[0].double()  # (B, C, H, W)
        s = sums[bn]
        s[0] = s[0] + x.sum((0, 2, 3))
        s[1] = s[1] + (x * x).sum((0, 2, 3))
        s[2] += x.numel() // x.shape[1]

    handles = [bn.register_forward_hook(hook) for bn in batch_norms]
    try:
        for _ in range(CALIBRATION_BATCHES):
            idx = torch.randint(len(images), (CALIBRATION_BATCH,), generator=g)
            x0 = images[idx]
            t = torch.randint(len(sqrt_abar), (len(idx),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            x_t = sqrt_abar[t].view(-1, 1, 1, 1) * x0 + sqrt_one_minus_abar[t].view(-1, 1, 1, 1) * noise
            context = torch.nn.functional.one_hot(torch.randint(n_classes, (len(idx),), generator=g), n_classes)
            context = context.float() * (torch.rand(len(idx), 1, generator=g) >= 0.1)
            model(x_t, t, context)
    finally:
        for h in handles:
            h.remove()
    for bn, (total, squares, count) in sums.items():
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        bn.running_mean.copy_(mean.float())
        bn.running_var.copy_(var.float())
        bn.weight.data.copy_((var + bn.eps).sqrt().float())
        bn.bias.data.copy_(mean.float())


def _parity(model: torch.nn.Module, path: Path, shape: tuple[int, ...], n_classes: int, seed: int) -> float:
    """Max abs difference between the recovered network (eval) and the file on onnxruntime."""
    from mdx.runtime.session import OnnxDenoiser

    rng = np.random.default_rng(seed)
    b = 8
    sample = rng.standard_normal((b, *shape), dtype=np.float32)
    timestep = rng.integers(0, model.config.num_train_timesteps, b).astype(np.int64)
    context = np.eye(n_classes, dtype=np.float32)[rng.integers(0, n_classes, b)]
    context[0] = 0.0  # one unconditional row
    expected = OnnxDenoiser.load(path, provider="cpu")(sample, timestep, context)
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(context)).numpy()
    return float(np.abs(got - expected).max())


def load_onnx_weights(path: str | Path, model: torch.nn.Module, images: torch.Tensor, schedule, seed: int = 0
                      ) -> float:
    """Fill `model` (a ContextUnet of the file's configuration, on the CPU) with the file's weights,
    BatchNorms calibrated on `images` ((N, C, H, W) in [-1, 1]) noised with `schedule`.
    Returns the eval-mode parity against the file (TrainError above PARITY_BOUND)."""
    path = Path(path)
    tensors, graph = _initializers(path)
    batch_norms = _load_named(model, tensors, _group_norm_affines(graph, tensors))
    model.eval()
    sqrt_abar = torch.tensor(schedule.sqrt_alphas_cumprod, dtype=torch.float32)
    sqrt_one_minus = torch.tensor(schedule.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)
    n_classes = model.config.n_classes
    _calibrate(model, batch_norms, images.cpu(), sqrt_abar, sqrt_one_minus, n_classes, seed)
    gap = _parity(model, path, tuple(images.shape[1:]), n_classes, seed)
    if not gap <= PARITY_BOUND:
        raise TrainError(f"--init-from: the weights recovered from {path} differ from the file by {gap:.2e} "
                         f"(bound {PARITY_BOUND:g}); is it an mdx-export file of this network?")
    return gap
