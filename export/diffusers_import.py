"""Read a user's diffusers model folder as an exportable model (`mdx-export DIR`).

Two layouts are accepted:

- a pipeline folder, as `DDPMPipeline(unet, scheduler).save_pretrained(DIR)` writes it:
  `model_index.json`, `unet/` (config.json + safetensors weights) and `scheduler/`
  (scheduler_config.json). The schedule and prediction type come from the scheduler config.
- a bare UNet2DModel folder (config.json + safetensors weights); the schedule is given by
  options (`ScheduleOptions`), with DDPMScheduler's defaults for what is not given.

What becomes of the network (mdx.train.unet2d.ContextUNet2D): a class-conditional
UNet2DModel (`num_class_embeds = K`) takes the contract's `context` through its class
table, `context @ class_embedding.weight`, so a one-hot row equals diffusers'
`class_labels` lookup; an unconditional UNet2DModel gets one pseudo-class named
`unconditional` whose context it ignores (K = 1; one-hot, all-zero and any guidance scale
give the same samples). See docs/contract.md.

The schedule: beta_schedule `linear`, `scaled_linear`, `squaredcos_cap_v2` and `sigmoid`
are mdx's `linear`, `quadratic`, `cosine` and `sigmoid`; `trained_betas` are accepted
only when they equal one of those four. The scheduler's sampling options that mdx's
samplers implement (timestep spacing, clipping, variance type ...) become the model's
`mdx.recommended` sampler options, so the runtime samples as the pipeline would.

Weights load through safetensors only: nothing is unpickled, and a folder whose weights
are only `.bin` / `.pt` / `.ckpt` files is refused. Every problem a user can cause raises
DiffusersImportError with one line naming it; nothing is written by this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdx.runtime.schedules import SCHEDULES, Schedule, ScheduleError

UNET_CLASS = "UNet2DModel"
UNCONDITIONAL_CLASS = "unconditional"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# diffusers' beta_schedule names -> mdx's schedule names (docs/contract.md, numerical conventions).
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}
# The scheduler classes whose algorithm mdx implements -> the mdx sampler and a step count.
SCHEDULERS = {"DDPMScheduler": ("ddpm", None), "DDIMScheduler": ("ddim", 50),
              "DPMSolverMultistepScheduler": ("dpmpp", 20)}
# DDPMScheduler's defaults, used for a bare UNet folder and for keys a scheduler config omits.
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                      "beta_schedule": "linear", "prediction_type": "epsilon"}
# Scheduler config keys -> mdx sampler options (same meaning), per sampler.
SAMPLER_OPTION_KEYS = {
    "ddpm": ("variance_type", "clip_sample", "clip_sample_range", "timestep_spacing", "steps_offset"),
    "ddim": ("clip_sample", "clip_sample_range", "set_alpha_to_one", "timestep_spacing", "steps_offset"),
    "dpmpp": ("solver_order", "timestep_spacing", "steps_offset", "lambda_min_clipped"),
}
# Scheduler options mdx's samplers do not implement, with the value that changes nothing.
IGNORED_WHEN = {"thresholding": False, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "use_lu_lambdas": False, "final_sigmas_type": "zero", "euler_at_final": False,
                "variance_type": None}
PIPELINE_PARTS = {"unet", "scheduler"}


class DiffusersImportError(ValueError):
    """A diffusers folder mdx cannot export (layout, model class, scheduler, weights); one line."""


@dataclass(frozen=True)
class ScheduleOptions:
    """The schedule of a bare UNet2DModel folder (None: DDPMScheduler's default)."""

    kind: str | None = None
    timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    prediction_type: str | None = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class DiffusersModel:
    """A diffusers folder read for export: the wrapped network and what the metadata says."""

    model: Any  # mdx.train.unet2d.ContextUNet2D in eval mode
    config: dict  # stored as mdx.train_config
    schedule: Schedule
    class_names: list[str]
    prediction_type: str
    path: Path  # the weights file (or shard index)
    sha256: str
    recommended: dict | None
    notes: list[str] = field(default_factory=list)


# --- reading files ---------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DiffusersImportError(f"{path.parent}: no {path.name} ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffusersImportError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise DiffusersImportError(f"{path}: {what} must be a JSON object")
    return data


def is_diffusers_folder(path: str | Path) -> bool:
    """True for a folder that holds a diffusers pipeline (model_index.json) or model (config.json
    with a `_class_name`); the caller then reads it with `load_diffusers`."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "model_index.json").is_file():
        return True
    try:
        return "_class_name" in json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def locate(path: Path) -> tuple[Path, Path | None]:
    """(the UNet folder, the scheduler folder or None) of a pipeline or bare model folder."""
    if not (path / "model_index.json").is_file():
        return path, None
    index = _read_json(path / "model_index.json", "the pipeline index")
    parts = {k: v for k, v in index.items() if not k.startswith("_") and v is not None}
    extra = sorted(k for k, v in parts.items() if k not in PIPELINE_PARTS and isinstance(v, list) and v[1:2] != [None])
    if extra:
        raise DiffusersImportError(f"{path}: the pipeline {index.get('_class_name', '?')} also has "
                                   f"{', '.join(extra)}; mdx exports pixel-space pipelines of a UNet2DModel and "
                                   "a scheduler only (no VAE/VQ-VAE, text encoder or other parts)")
    for part in sorted(PIPELINE_PARTS):
        if part not in parts:
            raise DiffusersImportError(f"{path}: model_index.json names no {part}")
    unet_class = parts["unet"][1] if isinstance(parts["unet"], list) and len(parts["unet"]) == 2 else parts["unet"]
    if unet_class != UNET_CLASS:
        raise DiffusersImportError(f"{path}: the pipeline's unet is a {unet_class}; mdx exports {UNET_CLASS} only")
    return path / "unet", path / "scheduler"


def weights_files(folder: Path) -> list[Path]:
    """The safetensors weights of a diffusers model folder (one file, or the shards of an index)."""
    single, index = folder / WEIGHTS_FILE, folder / SHARD_INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DiffusersImportError(f"{index}: has no weight_map")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise DiffusersImportError(f"{folder}: shard(s) {', '.join(missing)} named by {index.name} are missing")
        return shards
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise DiffusersImportError(f"{folder}: no {WEIGHTS_FILE}, only {', '.join(others)} (a variant?); "
                                   f"rename the one to export to {WEIGHTS_FILE}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise DiffusersImportError(f"{folder}: the weights are only {', '.join(pickles)} (pickle); mdx loads "
                                   "safetensors only and never unpickles. Convert them where you trust the file: "
                                   "UNet2DModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)")
    raise DiffusersImportError(f"{folder}: no weights ({WEIGHTS_FILE})")


def load_state(files: list[Path]) -> tuple[dict, str]:
    """The tensors of the weights files (float32) and a sha256 over the files, in order."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state, h = {}, hashlib.sha256()
    for f in files:
        try:
            state.update(load_file(str(f), device="cpu"))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DiffusersImportError(f"{f}: not a readable safetensors file ({e})") from None
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, h.hexdigest()


# --- the network -----------------------------------------------------------------------------


def check_unet_config(cfg: dict, where: Path) -> int:
    """Refuse a UNet2DModel config outside the contract; returns the image size."""
    cls = cfg.get("_class_name")
    if cls != UNET_CLASS:
        raise DiffusersImportError(f"{where}: the model class is {cls!r}; mdx exports {UNET_CLASS} only")
    size = cfg.get("sample_size")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DiffusersImportError(f"{where}: sample_size must be one positive integer (square images), got {size!r}")
    levels = len(cfg.get("block_out_channels") or [])
    if levels and size % 2 ** (levels - 1):
        raise DiffusersImportError(f"{where}: sample_size {size} is not divisible by 2**{levels - 1} "
                                   f"({levels} resolution levels)")
    c_in, c_out = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if c_in != c_out:
        raise DiffusersImportError(f"{where}: in_channels {c_in} != out_channels {c_out} (a learned-variance "
                                   "model?); the contract's output is one prediction the size of the sample")
    time_type = cfg.get("time_embedding_type", "positional")
    if time_type not in ("positional", "learned"):
        raise DiffusersImportError(f"{where}: time_embedding_type {time_type!r} (a score-SDE model) is not "
                                   "supported; mdx exports DDPM-style models (positional or learned)")
    embed_type = cfg.get("class_embed_type")
    if embed_type is not None:
        raise DiffusersImportError(f"{where}: class_embed_type {embed_type!r} does not take classes; mdx "
                                   "exports unconditional models and num_class_embeds class tables")
    return size


def build_unet(cfg: dict, state: dict, where: Path):
    """The UNet2DModel of `cfg` holding `state`, strictly: the config must match the weights."""
    import torch
    from diffusers import UNet2DModel

    args = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        unet = UNet2DModel.from_config(args)
    except Exception as e:  # noqa: BLE001 - diffusers raises ValueError/TypeError/KeyError for a bad config
        raise DiffusersImportError(f"{where}: config.json does not build a UNet2DModel "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[0]}: weights {list(state[wrong[0]].shape)}, "
                 f"config {list(expected[wrong[0]].shape)})" if wrong else ""]
        raise DiffusersImportError(f"{where}: config.json does not match the weights: "
                                   + "; ".join(p for p in parts if p))
    with torch.no_grad():
        unet.load_state_dict(state, strict=True)
    return unet.float().eval()


# --- the schedule ----------------------------------------------------------------------------


def matching_kind(betas: np.ndarray, beta_start: float, beta_end: float) -> str | None:
    """The mdx schedule whose betas equal `betas` (to float32 rounding), or None."""
    for kind in SCHEDULES:
        try:
            ref = Schedule(kind, len(betas), beta_start, beta_end).betas
        except ScheduleError:
            continue
        if np.allclose(betas, ref, rtol=1e-5, atol=1e-9):
            return kind
    return None


def schedule_from_config(sc: dict, where: Path) -> tuple[Schedule, str]:
    """(Schedule, prediction_type) of a scheduler config, diffusers' defaults for absent keys."""
    get = lambda k: sc.get(k, SCHEDULER_DEFAULTS.get(k))  # noqa: E731
    T, start, end = get("num_train_timesteps"), get("beta_start"), get("beta_end")
    if sc.get("rescale_betas_zero_snr"):
        raise DiffusersImportError(f"{where}: rescale_betas_zero_snr changes the betas; mdx's schedules do not "
                                   "rescale (export the model without it)")
    if sc.get("trained_betas") is not None:
        betas = np.asarray(sc["trained_betas"], dtype=np.float64)
        kind = matching_kind(betas, start, end) if betas.ndim == 1 and len(betas) >= 2 else None
        if kind is None:
            raise DiffusersImportError(f"{where}: trained_betas equal none of mdx's schedules ({', '.join(SCHEDULES)} "
                                       f"with beta_start={start}, beta_end={end}); custom betas are not supported")
        if len(betas) != T:
            raise DiffusersImportError(f"{where}: {len(betas)} trained_betas but num_train_timesteps={T}")
    else:
        name = get("beta_schedule")
        if name not in BETA_SCHEDULES:
            raise DiffusersImportError(f"{where}: beta_schedule {name!r} is not supported; choose one of "
                                       f"{', '.join(BETA_SCHEDULES)}")
        kind = BETA_SCHEDULES[name]
    try:
        schedule = Schedule(kind, int(T), float(start), float(end))
    except (ScheduleError, TypeError, ValueError) as e:
        raise DiffusersImportError(f"{where}: {e}") from None
    prediction = get("prediction_type")
    if prediction not in ("epsilon", "v_prediction"):
        raise DiffusersImportError(f"{where}: prediction_type {prediction!r} is not supported; mdx models predict "
                                   "epsilon or v_prediction")
    return schedule, prediction


def sampler_options_from_config(sc: dict, sampler: str, schedule: Schedule) -> tuple[dict, list[str]]:
    """The options of mdx's `sampler` that the scheduler config sets (what diffusers' scheduler of
    that kind built `from_config` on it would use), and notes on values mdx does not accept."""
    from mdx.runtime.samplers import SamplerError, make_sampler

    options, notes = {}, []
    for key in SAMPLER_OPTION_KEYS[sampler]:
        if sc.get(key) is None:
            continue
        try:  # the runtime builds exactly this sampler; keep only what it accepts
            make_sampler(sampler, schedule, **{key: sc[key]})
            options[key] = sc[key]
        except (SamplerError, TypeError):
            notes.append(f"the scheduler's {key}={sc[key]!r} is not implemented by mdx's {sampler} sampler; "
                         "mdx samples with its default")
    return options, notes


def recommended_from_config(sc: dict, sampler: str, steps: int | None, schedule: Schedule) -> tuple[dict, list[str]]:
    """mdx.recommended for the pipeline's scheduler (options for every mdx sampler, so that e.g.
    clip_sample=False holds for all), and notes on options mdx does not implement."""
    per_sampler = {name: sampler_options_from_config(sc, name, schedule) for name in SAMPLER_OPTION_KEYS}
    notes = per_sampler[sampler][1]
    notes += [f"the scheduler's {k}={sc[k]!r} is not implemented by mdx's {sampler} sampler; mdx samples without it"
              for k, neutral in IGNORED_WHEN.items()
              if k in sc and sc[k] != neutral and k not in SAMPLER_OPTION_KEYS[sampler]]
    T = schedule.num_train_timesteps
    steps = T if steps is None else min(steps, T - 1 if sampler == "dpmpp" else T)
    return {"sampler": sampler, "steps": steps, "guidance": 1.0,
            "sampler_options": {name: opts for name, (opts, _) in per_sampler.items()}}, notes


def scheduler_folder_schedule(folder: Path) -> tuple[Schedule, str, dict, list[str], dict]:
    """Read scheduler/scheduler_config.json: schedule, prediction type, recommended, notes, config."""
    sc = _read_json(folder / "scheduler_config.json", "the scheduler config")
    cls = sc.get("_class_name")
    if cls not in SCHEDULERS:
        raise DiffusersImportError(f"{folder}: scheduler {cls!r} is not supported; mdx reads "
                                   f"{', '.join(SCHEDULERS)} (or export the unet/ folder alone with --schedule "
                                   "and the other schedule options)")
    schedule, prediction = schedule_from_config(sc, folder)
    sampler, steps = SCHEDULERS[cls]
    rec, notes = recommended_from_config(sc, sampler, steps, schedule)
    return schedule, prediction, rec, notes, sc


def options_schedule(options: ScheduleOptions, where: Path) -> tuple[Schedule, str]:
    """The schedule of a bare UNet folder from the options, DDPMScheduler's defaults otherwise."""
    inverse = {v: k for k, v in BETA_SCHEDULES.items()}
    kind = options.kind or "linear"
    if kind not in inverse:
        raise DiffusersImportError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    sc = {"beta_schedule": inverse[kind], "num_train_timesteps": options.timesteps,
          "beta_start": options.beta_start, "beta_end": options.beta_end,
          "prediction_type": options.prediction_type}
    return schedule_from_config({k: v for k, v in sc.items() if v is not None}, where)


# --- the whole import ------------------------------------------------------------------------


def class_names_for(unet, names: list[str] | None, where: Path) -> list[str]:
    """The contract's class names: the table's K (named by `names` or 0..K-1), or the pseudo-class."""
    K = unet.config.num_class_embeds if unet.class_embedding is not None else None
    if K is None:
        if names:
            raise DiffusersImportError(f"{where}: the UNet2DModel is unconditional; class names do not apply")
        return [UNCONDITIONAL_CLASS]
    if names is None:
        return [str(i) for i in range(K)]
    if len(names) != K or len(set(names)) != K or not all(names):
        raise DiffusersImportError(f"{where}: give {K} distinct class names (num_class_embeds={K}), got {names}")
    return list(names)


def load_diffusers(path: str | Path, schedule_options: ScheduleOptions | None = None,
                   class_names: list[str] | None = None) -> DiffusersModel:
    """Read a diffusers pipeline or bare UNet2DModel folder; DiffusersImportError for anything wrong."""
    from mdx.train.unet2d import ContextUNet2D, ContractShape

    path = Path(path)
    if not path.is_dir():
        raise DiffusersImportError(f"{path}: not a folder")
    unet_dir, scheduler_dir = locate(path)
    options = schedule_options or ScheduleOptions()
    cfg = _read_json(unet_dir / "config.json", "the UNet2DModel config")
    size = check_unet_config(cfg, unet_dir / "config.json")
    if scheduler_dir is not None:
        if options.given():
            raise DiffusersImportError(f"{path}: the pipeline's scheduler config fixes the schedule; the schedule "
                                       f"options ({', '.join(options.given())}) apply to a bare UNet folder only")
        schedule, prediction, rec, notes, sc = scheduler_folder_schedule(scheduler_dir)
    else:
        schedule, prediction = options_schedule(options, unet_dir)
        rec, notes, sc = None, [], None
    files = weights_files(unet_dir)
    state, sha = load_state(files)
    unet = build_unet(cfg, state, unet_dir)
    names = class_names_for(unet, class_names, unet_dir)
    shape = ContractShape(in_channels=cfg.get("in_channels", 3), n_classes=len(names), image_size=size,
                          num_train_timesteps=schedule.num_train_timesteps)
    model = ContextUNet2D(unet, shape).eval()
    config = {"format": 1, "architecture": "unet2d", "source": "diffusers",
              "conditional": model.conditional, "diffusers_config": cfg, "scheduler_config": sc,
              "schedule": schedule.to_dict(), "class_names": names, "prediction_type": prediction}
    where = files[0] if len(files) == 1 else unet_dir / SHARD_INDEX
    return DiffusersModel(model, config, schedule, names, prediction, where, sha, rec, notes)
