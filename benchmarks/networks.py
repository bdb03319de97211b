"""The networks the suites measure.

The default network is docs/contract.md's default architecture (ContextUnet, n_feat = 64, 9 classes,
16x16 RGB, T = 500, cosine schedule) with a seeded random initialisation: speed does not depend
on the weights. It is written as an mdx checkpoint (`save_weights_file`) and exported with the
project's own exporter (`mdx.export`) to fp32, fp16 and int8 (int8 calibrated on emoji16), so
the ONNX files are exactly what `mdx-export` ships.

Exports take tens of seconds each, so the files are cached under
`$XDG_CACHE_HOME/mdx-bench/` (default ~/.cache/mdx-bench/), keyed by everything that
determines them: the checkpoint's bytes, the exporter's source and the versions of torch,
onnx, onnxscript, onnxsim and onnxruntime. The export time of the run that made a file is kept
beside it and reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

SEED = 0
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_NETWORK = {"n_feat": 64, "n_classes": 9, "image_size": 16, "in_channels": 3, "num_train_timesteps": 500}


@dataclass
class Network:
    """A torch model and its ONNX files, with how they were made."""

    name: str
    torch_model: object | None  # mdx.train.model.ContextUnet in eval mode, or None (ONNX only)
    schedule: object
    class_names: list[str]
    sample_shape: tuple[int, int, int]
    onnx: dict[str, Path] = field(default_factory=dict)  # precision -> file
    export_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    description: str = ""
    checkpoint: Path | None = None  # the mdx weights file the torch model came from
    flops_per_image: float | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule.num_train_timesteps)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mdx-bench"


def _versions_key() -> str:
    parts = []
    for name in ("torch", "onnx", "onnxscript", "onnxsim", "onnxruntime-gpu", "onnxruntime", "onnxconverter-common"):
        try:
            parts.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name}=-")
    return ";".join(parts)


def _exporter_source_hash() -> str:
    import mdx.export

    h = hashlib.sha256()
    for path in sorted(Path(mdx.export.__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


SMOKE_NETWORK = {"n_feat": 8, "n_classes": 9, "image_size": 16, "in_channels": 3, "num_train_timesteps": 20}


def build_default_network(cache: Path | None = None, precisions=PRECISIONS, log=print, budget=None,
                          arch: dict | None = None) -> Network:
    """The default-architecture network, exported to `precisions` (cached; see the module doc).
    `arch` replaces the architecture (the hidden --smoke option uses a tiny one)."""
    import torch

    from mdx.runtime.schedules import make_schedule
    from mdx.train.checkpoint import make_run_config, save_weights_file
    from mdx.train.data import EMOJI16_CLASSES
    from mdx.train.model import ContextUnet, ModelConfig

    cfg = ModelConfig(**(arch or DEFAULT_NETWORK))
    torch.manual_seed(SEED)
    model = ContextUnet(cfg).eval()
    schedule = make_schedule("cosine", cfg.num_train_timesteps)
    names = list(EMOJI16_CLASSES)
    run_config = make_run_config(cfg, schedule, names, train={"data": "emoji16", "note": "mdx-bench random init"})
    net = Network(name="default" if arch is None else f"smoke-f{cfg.n_feat}", torch_model=model, schedule=schedule, class_names=names,
                  sample_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
                  description=f"ContextUnet n_feat={cfg.n_feat}, {cfg.n_classes} classes, {cfg.image_size}x"
                              f"{cfg.image_size}x{cfg.in_channels}, T={cfg.num_train_timesteps} (random init, seed {SEED})")

    folder = _cache_folder(model, run_config, cache)
    net.checkpoint = save_weights_file(folder / "ema.safetensors", model, run_config)
    _export_precisions(net, folder, precisions, budget, log)
    return net


def _cache_folder(model, run_config: dict, cache: Path | None) -> Path:
    """The network's cache folder, keyed by its weights file's bytes (made in memory), the
    package versions and the exporter's source."""
    from safetensors.torch import save as safetensors_bytes

    from mdx.runtime.fileio import write_error
    from mdx.train.checkpoint import state_to_cpu, weights_metadata

    h = hashlib.sha256(safetensors_bytes(state_to_cpu(model), metadata=weights_metadata(run_config)))
    h.update(_versions_key().encode())
    h.update(_exporter_source_hash().encode())
    folder = (Path(cache) if cache is not None else cache_root()) / h.hexdigest()[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(folder, e) from None
    return folder


def _export_precisions(net: Network, folder: Path, precisions, budget, log) -> None:
    """Export net.checkpoint to each precision not cached yet (within the budget); a failure is a note."""
    from mdx.export.onnx_export import export_checkpoint
    from mdx.runtime.fileio import write_text

    for precision in precisions:
        out = folder / f"{net.name}-{precision}.onnx"
        meta = folder / f"{net.name}-{precision}.json"
        if out.is_file() and meta.is_file():
            net.onnx[precision] = out
            net.export_seconds[precision] = json.loads(meta.read_text())["export_seconds"]
            continue
        if budget is not None and not budget.allows(60):
            net.notes.append(budget.reason(f"exporting {precision}", 60))
            continue
        log(f"  exporting the default network to {precision} (cached afterwards in {folder})")
        t0 = time.perf_counter()
        try:
            export_checkpoint(net.checkpoint, out, precision=precision, verbose=False)
        except Exception as e:  # noqa: BLE001 -- one precision failing must not end the suite; recorded
            net.notes.append(f"{precision} export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        seconds = time.perf_counter() - t0
        write_text(meta, json.dumps({"export_seconds": seconds, "versions": _versions_key()}))
        net.onnx[precision] = out
        net.export_seconds[precision] = seconds


def shipped_network(model_path: Path) -> Network:
    """An exported model file (e.g. models/emoji16.onnx) and its -fp16 / -int8 siblings, ONNX only."""
    from mdx.runtime.session import OnnxDenoiser

    model_path = Path(model_path)
    den = OnnxDenoiser.load(model_path, provider="CPUExecutionProvider")
    info = den.info
    precision = getattr(info, "precision", None) or "fp32"
    files = {precision: model_path}
    stem = model_path.stem
    for suffix in ("fp16", "int8"):
        base = stem[: -len(f"-{precision}")] if stem.endswith(f"-{precision}") else stem
        sib = model_path.with_name(f"{base}-{suffix}.onnx")
        if sib.is_file() and suffix not in files:
            files[suffix] = sib
    meta = den.session.get_modelmeta().custom_metadata_map
    try:
        n_feat = json.loads(meta.get("mdx.train_config", "{}")).get("model", {}).get("n_feat")
    except (ValueError, AttributeError):
        n_feat = None
    return Network(name=model_path.name, torch_model=None, schedule=info.schedule, class_names=list(info.class_names),
                   sample_shape=tuple(info.sample_shape), onnx=files,
                   description=f"{model_path.name}" + (f" (n_feat={n_feat})" if n_feat else ""))
