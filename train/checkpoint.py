"""Safe, atomic checkpoints: safetensors for tensors, JSON for everything else.

A run folder holds:

    config.json             the run's description (model, schedule, classes, training options)
    checkpoint/             the latest checkpoint, replaced as a whole
        model.safetensors       raw weights (+ BatchNorm buffers)
        ema.safetensors         EMA weights
        optimizer.safetensors   AdamW moments, flattened to named tensors
        progress.json           step, epoch, optimizer hyper-parameters, scheduler state

A checkpoint is written into a temporary folder beside `checkpoint/` and swapped in
whole by `mdx.runtime.fileio.atomic_dir`, so a process killed at any instant, or a disk
that fills up, leaves either the old or the new checkpoint complete (a crash in the instant
between the two renames leaves the old one as `.checkpoint.old-*`, which is then found).
Each weights file also carries the run description in its safetensors
metadata (`mdx.config`), so a single `ema.safetensors` is self-describing.
Nothing is ever unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from mdx.runtime.contract import PREDICTION_TYPES
from mdx.runtime.fileio import WriteError, atomic_dir, atomic_write, sha256_file, write_error
from mdx.runtime.schedules import Schedule, ScheduleError
from mdx.train.model import ModelConfig
from mdx.train.unet2d import (DEFAULT_ARCHITECTURE, UNet2DConfig, architecture_of, build_network,
                              config_from_dict)

FORMAT = 1
CKPT_DIR = "checkpoint"
OLD_GLOB = f".{CKPT_DIR}.old-*"  # where atomic_dir keeps the previous folder during the swap
WEIGHTS = {"ema": "ema.safetensors", "raw": "model.safetensors"}
OPTIMIZER_FILE, PROGRESS_FILE = "optimizer.safetensors", "progress.json"  # inside CKPT_DIR
CONFIG_FILE = "config.json"  # in the run folder


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not describe a model we can build."""


# --- small file helpers ---------------------------------------------------------------


def _fsync(path: Path) -> None:
    """Make a file's or folder's contents durable (before a rename publishes them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON to `path` atomically (fileio.atomic_write); WriteError names the path on failure."""
    with atomic_write(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
        _fsync(tmp)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, written atomically; WriteError names the path on failure."""
    with atomic_write(path, suffix=".safetensors") as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # safetensors reports the OSError of its write as its own error
            raise _as_oserror(e) from None
        _fsync(tmp)


def _as_oserror(e: SafetensorError) -> OSError:
    """The OSError inside a safetensors write error ("... (os error 28)"), for WriteError's message."""
    match = re.search(r"os error (\d+)", str(e))
    code = int(match.group(1)) if match else errno.EIO
    return OSError(code, os.strerror(code))


# --- optimizer state <-> flat named tensors -------------------------------------------


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into named tensors (safetensors) and JSON scalars."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of `optimizer_to_tensors`, loaded into `opt`."""
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --- writing --------------------------------------------------------------------------


def state_to_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as contiguous CPU tensors (DDP prefixes removed)."""
    sd = module.state_dict()
    return {k.removeprefix("module."): v.detach().cpu().contiguous() for k, v in sd.items()}


def weights_metadata(config: dict, step: int = 0) -> dict[str, str]:
    """The safetensors metadata that makes a weights file self-describing."""
    return {"mdx.config": json.dumps(config, sort_keys=True), "mdx.step": str(step)}


def save_checkpoint(run_dir: Path, config: dict, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, progress: dict) -> Path:
    """Write a complete checkpoint into `run_dir/checkpoint/`, replaced as a whole (fileio.atomic_dir).

    A failure (no space, a read-only file system, the folder gone) raises WriteError and leaves
    the previous checkpoint as it was, with no temporary folder beside it.
    """
    final = Path(run_dir) / CKPT_DIR
    meta = weights_metadata(config, progress.get("step", 0))
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    with atomic_dir(final) as tmp:
        try:
            write_tensors(tmp / WEIGHTS["raw"], state_to_cpu(model), meta)
            write_tensors(tmp / WEIGHTS["ema"], state_to_cpu(ema), meta)
            write_tensors(tmp / OPTIMIZER_FILE, opt_tensors)
            write_json(tmp / PROGRESS_FILE, {**progress, "optimizer": opt_meta})
            _fsync(tmp)
        except WriteError as e:  # name the file as the user knows it, not the vanished temporary folder
            raise WriteError(final / e.path.name if e.path.parent == tmp else final, e.reason) from None
        except OSError as e:
            raise write_error(final, e) from None
    try:
        _fsync(final.parent)  # make the swap itself durable
        for stale in final.parent.glob(OLD_GLOB):  # left by a crash mid-swap, now superseded
            shutil.rmtree(stale)
    except OSError as e:
        raise write_error(final.parent, e) from None
    return final


# --- reading --------------------------------------------------------------------------


def load_training_state(ck_dir: Path, model: torch.nn.Module, ema: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, device: str) -> dict:
    """Load a checkpoint folder's weights, EMA and optimizer state in place; returns its progress."""
    model.load_state_dict(load_file(str(ck_dir / WEIGHTS["raw"]), device=device))
    ema.load_state_dict(load_file(str(ck_dir / WEIGHTS["ema"]), device=device))
    progress = json.loads((ck_dir / PROGRESS_FILE).read_text())
    optimizer_from_tensors(optimizer, load_file(str(ck_dir / OPTIMIZER_FILE), device=device), progress["optimizer"])
    return progress


def find_checkpoint_dir(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    run_dir = Path(run_dir)
    for d in [run_dir / CKPT_DIR, *sorted(run_dir.glob(OLD_GLOB))]:
        if (d / PROGRESS_FILE).is_file():
            return d
    return None


def read_safetensors_config(path: Path) -> dict:
    """The run description stored in a weights file's metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if "mdx.config" not in meta:
        raise CheckpointError(f"{path}: safetensors file has no mdx.config metadata; not an mdx checkpoint")
    try:
        return json.loads(meta["mdx.config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: mdx.config metadata is not valid JSON ({e})") from None


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, with everything the exporter needs to describe it."""

    model: torch.nn.Module  # ContextUnet or ContextUNet2D, by `architecture`
    config: dict
    model_config: ModelConfig | UNet2DConfig
    schedule: Schedule
    class_names: list[str]
    prediction_type: str
    weights: str
    path: Path
    sha256: str
    step: int
    architecture: str = DEFAULT_ARCHITECTURE


def run_architecture(config: dict) -> str:
    """The architecture a run description names (runs from before unet2d name none: contextunet)."""
    return config.get("architecture", DEFAULT_ARCHITECTURE)


def parse_config(config: dict, where: Path) -> tuple[ModelConfig | UNet2DConfig, Schedule, list[str], str]:
    """Validate a run description; CheckpointError names what is wrong."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config is not a JSON object")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{where}: unknown checkpoint format {config.get('format')!r} (this mdx reads {FORMAT})")
    missing = [k for k in ("model", "schedule", "class_names", "prediction_type") if k not in config]
    if missing:
        raise CheckpointError(f"{where}: config lacks {', '.join(missing)}")
    try:
        mcfg = config_from_dict(run_architecture(config), config["model"])
        sched = Schedule.from_dict(config["schedule"])
    except (TypeError, ValueError, ScheduleError) as e:
        raise CheckpointError(f"{where}: bad config: {e}") from None
    names = config["class_names"]
    if not isinstance(names, list) or len(names) != mcfg.n_classes:
        raise CheckpointError(f"{where}: class_names has {len(names) if isinstance(names, list) else '?'} "
                              f"entries but the model has {mcfg.n_classes} classes")
    if sched.num_train_timesteps != mcfg.num_train_timesteps:
        raise CheckpointError(f"{where}: schedule has {sched.num_train_timesteps} timesteps, model {mcfg.num_train_timesteps}")
    if config["prediction_type"] not in PREDICTION_TYPES:
        raise CheckpointError(f"{where}: unknown prediction_type {config['prediction_type']!r} "
                              f"(known: {', '.join(PREDICTION_TYPES)})")
    return mcfg, sched, list(names), config["prediction_type"]


def resolve_weights_file(path: Path, weights: str = "ema") -> Path:
    """Map a run folder, checkpoint folder or weights file to the weights file to load."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"unknown weights {weights!r}; choose ema or raw")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        return path
    ckpt = find_checkpoint_dir(path) if not (path / WEIGHTS[weights]).is_file() else path
    if ckpt is None:
        raise CheckpointError(f"{path}: no checkpoint in this folder (expected {CKPT_DIR}/{WEIGHTS[weights]})")
    f = ckpt / WEIGHTS[weights]
    if not f.is_file():
        raise CheckpointError(f"{ckpt}: {WEIGHTS[weights]} is missing")
    return f


def load_checkpoint(path: str | Path, weights: str = "ema", map_location: str = "cpu") -> LoadedCheckpoint:
    """Rebuild the model of a run folder, checkpoint folder or `.safetensors` file, in eval mode.

    `weights` picks the EMA (default) or raw weights when a folder is given.
    Raises CheckpointError with a one-line message for anything wrong.
    """
    f = resolve_weights_file(Path(path), weights)
    config = read_safetensors_config(f)
    mcfg, sched, names, pred = parse_config(config, f)
    try:
        state = load_file(str(f), device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{f}: cannot read tensors ({e})") from None
    try:
        model = build_network(run_architecture(config), mcfg)
    except ValueError as e:  # e.g. diffusers missing for a unet2d
        raise CheckpointError(f"{f}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{f}: weights do not match the model its config describes ({first})") from None
    model.eval()
    step = 0
    with safe_open(str(f), framework="pt") as sf:
        step = int((sf.metadata() or {}).get("mdx.step", 0))
    return LoadedCheckpoint(model, config, mcfg, sched, names, pred, weights, f, sha256_file(f), step,
                            run_architecture(config))


def make_run_config(model_config: ModelConfig | UNet2DConfig, schedule: Schedule, class_names: list[str],
                    prediction_type: str = "epsilon", train: dict | None = None) -> dict:
    """The run description stored in config.json and in every weights file."""
    return {
        "format": FORMAT,
        "architecture": architecture_of(model_config),
        "model": model_config.to_dict(),
        "schedule": schedule.to_dict(),
        "class_names": list(class_names),
        "prediction_type": prediction_type,
        "train": train or {},
    }


def save_weights_file(path: str | Path, module: torch.nn.Module, config: dict, step: int = 0) -> Path:
    """Write one self-describing weights file (atomically); what tests and tools use."""
    path = Path(path)
    write_tensors(path, state_to_cpu(module), weights_metadata(config, step))
    return path
