"""Safe, atomic checkpoints: safetensors for tensors, JSON for everything else.

A run folder holds:

    config.json             the run's description (model, schedule, classes, training options)
    checkpoint/             the latest checkpoint, replaced as a whole
        model.safetensors       raw weights (+ BatchNorm buffers)
        ema.safetensors         EMA weights
        optimizer.safetensors   AdamW moments, flattened to named tensors
        progress.json           step, epoch, optimizer hyper-parameters, scheduler state

A checkpoint is first written to `checkpoint.tmp/`, then swapped in by two
renames, so a process killed at any instant leaves either the old or the new
checkpoint complete (`checkpoint.old/` is the fallback between the renames).
Each weights file also carries the run description in its safetensors
metadata (`mdx.config`), so a single `ema.safetensors` is self-describing.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from mdx.runtime.schedules import Schedule, ScheduleError
from mdx.train.model import ContextUnet, ModelConfig

FORMAT = 1
CKPT_DIR, TMP_DIR, OLD_DIR = "checkpoint", "checkpoint.tmp", "checkpoint.old"
WEIGHTS = {"ema": "ema.safetensors", "raw": "model.safetensors"}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not describe a model we can build."""


# --- small file helpers ---------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` via a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def save_checkpoint(run_dir: Path, config: dict, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, progress: dict) -> Path:
    """Write a complete checkpoint into `run_dir/checkpoint/`, atomically as a whole."""
    run_dir = Path(run_dir)
    tmp, final, old = run_dir / TMP_DIR, run_dir / CKPT_DIR, run_dir / OLD_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"mdx.config": json.dumps(config, sort_keys=True), "mdx.step": str(progress.get("step", 0))}
    save_file(state_to_cpu(model), tmp / WEIGHTS["raw"], metadata=meta)
    save_file(state_to_cpu(ema), tmp / WEIGHTS["ema"], metadata=meta)
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    write_json_atomic(tmp / "progress.json", {**progress, "optimizer": opt_meta})
    for f in tmp.iterdir():  # make the contents durable before the directory swap
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


# --- reading --------------------------------------------------------------------------


def find_checkpoint_dir(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    for name in (CKPT_DIR, OLD_DIR):
        d = Path(run_dir) / name
        if (d / "progress.json").is_file():
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

    model: ContextUnet
    config: dict
    model_config: ModelConfig
    schedule: Schedule
    class_names: list[str]
    prediction_type: str
    weights: str
    path: Path
    sha256: str
    step: int


def parse_config(config: dict, where: Path) -> tuple[ModelConfig, Schedule, list[str], str]:
    """Validate a run description; CheckpointError names what is wrong."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config is not a JSON object")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{where}: unknown checkpoint format {config.get('format')!r} (this mdx reads {FORMAT})")
    missing = [k for k in ("model", "schedule", "class_names", "prediction_type") if k not in config]
    if missing:
        raise CheckpointError(f"{where}: config lacks {', '.join(missing)}")
    try:
        mcfg = ModelConfig.from_dict(config["model"])
        sched = Schedule.from_dict(config["schedule"])
    except (TypeError, ValueError, ScheduleError) as e:
        raise CheckpointError(f"{where}: bad config: {e}") from None
    names = config["class_names"]
    if not isinstance(names, list) or len(names) != mcfg.n_classes:
        raise CheckpointError(f"{where}: class_names has {len(names) if isinstance(names, list) else '?'} "
                              f"entries but the model has {mcfg.n_classes} classes")
    if sched.num_train_timesteps != mcfg.num_train_timesteps:
        raise CheckpointError(f"{where}: schedule has {sched.num_train_timesteps} timesteps, model {mcfg.num_train_timesteps}")
    if config["prediction_type"] not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{where}: unknown prediction_type {config['prediction_type']!r}")
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
    model = ContextUnet(mcfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{f}: weights do not match the model its config describes ({first})") from None
    model.eval()
    step = 0
    with safe_open(str(f), framework="pt") as sf:
        step = int((sf.metadata() or {}).get("mdx.step", 0))
    return LoadedCheckpoint(model, config, mcfg, sched, names, pred, weights, f, sha256_file(f), step)


def make_run_config(model_config: ModelConfig, schedule: Schedule, class_names: list[str],
                    prediction_type: str = "epsilon", train: dict | None = None) -> dict:
    """The run description stored in config.json and in every weights file."""
    return {
        "format": FORMAT,
        "model": model_config.to_dict(),
        "schedule": schedule.to_dict(),
        "class_names": list(class_names),
        "prediction_type": prediction_type,
        "train": train or {},
    }


def save_weights_file(path: str | Path, module: torch.nn.Module, config: dict, step: int = 0) -> Path:
    """Write one self-describing weights file (atomically); what tests and tools use."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"mdx.config": json.dumps(config, sort_keys=True), "mdx.step": str(step)}
    save_file(state_to_cpu(module), tmp, metadata=meta)
    os.replace(tmp, path)
    return path
