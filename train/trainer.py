"""The training loop: epsilon (or v) objective, AdamW with warm-up and cosine decay,
gradient clipping, EMA, classifier-free-guidance dropout, atomic safetensors
checkpoints, exact resume, and DistributedDataParallel under torchrun.

Reproducibility: every random draw of step s (timesteps, noise, guidance dropout,
flips) comes from a generator seeded by (seed, s, rank), and the data order of
an epoch from DistributedSampler(seed).set_epoch(epoch). So a run that is killed
and resumed from its last checkpoint replays exactly what an uninterrupted run
would have done.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2

from mdx.runtime.contract import PREDICTION_TYPES
from mdx.runtime.fileio import WriteError, append_line, atomic_write, write_error, write_text
from mdx.runtime.images import make_grid, to_float, to_uint8
from mdx.runtime.schedules import SCHEDULES, Schedule, ScheduleError
from mdx.train import checkpoint as ckpt
from mdx.train.errors import TrainError
from mdx.train.data import DataError, ImageData, load_data
from mdx.train.model import ContextUnet, ModelConfig, count_parameters
from mdx.train.unet2d import ARCHITECTURES, DEFAULT_ARCHITECTURE, UNet2DConfig, build_network
from mdx.train.reference import sample_reference


@dataclass
class TrainConfig:
    """Every option of a training run; stored in config.json and the exported model."""

    data: str = "emoji16"
    labels: str | None = None
    image_size: int = 16
    schedule: str = "linear"
    timesteps: int = 500
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    cond_drop: float = 0.1
    ema_decay: float = 0.999
    n_feat: int = 64
    hflip: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    out: str = "runs/emoji16"
    checkpoint_every: int = 500
    sample_every: int = 5
    telemetry: bool = False
    threads: int | None = None
    class_balance: float = 0.0     # sampling weight of an image = (1 / its class's count) ** class_balance
    init_from: str | None = None   # fine-tune: start model and EMA from this run/checkpoint's (or .onnx file's) weights
    min_snr_gamma: float = 0.0     # Min-SNR-gamma loss weighting (Hang et al. 2023); 0 = plain MSE
    arch: str = DEFAULT_ARCHITECTURE  # contextunet (the course's network, n_feat) or unet2d (diffusers' UNet2DModel)
    unet_channels: tuple[int, ...] = UNet2DConfig.block_out_channels  # unet2d: channels per resolution level
    unet_layers: int = UNet2DConfig.layers_per_block  # unet2d: ResNet layers per down block (up blocks: + 1)
    unet_attention: tuple[int, ...] = UNet2DConfig.attention_levels  # unet2d: levels with self-attention
    unet_norm_groups: int = UNet2DConfig.norm_num_groups  # unet2d: GroupNorm groups
    unet_head_dim: int = UNet2DConfig.attention_head_dim  # unet2d: channels per attention head

    def validate(self) -> None:
        """Raise TrainError for an option no run could use."""
        def positive(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, (int, float)) or v <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {v}")

        if self.schedule not in SCHEDULES:
            raise TrainError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.schedule != "cosine" and not (0 < self.beta_start < self.beta_end < 1):
            raise TrainError(f"need 0 < --beta-start < --beta-end < 1, got {self.beta_start} and {self.beta_end}")
        for name in ("epochs", "batch_size", "lr", "timesteps", "n_feat", "image_size", "checkpoint_every"):
            positive(name)
        positive("max_steps", allow_none=True)
        positive("threads", allow_none=True)
        if self.timesteps < 2:
            raise TrainError(f"--timesteps must be at least 2, got {self.timesteps}")
        if self.image_size % 4:
            raise TrainError(f"--image-size must be a multiple of 4, got {self.image_size}")
        if self.n_feat % 8:
            raise TrainError(f"--n-feat must be a multiple of 8 (GroupNorm(8, F)), got {self.n_feat}")
        if not 0 <= self.cond_drop < 1:
            raise TrainError(f"--cond-drop must be in [0, 1), got {self.cond_drop}")
        if not 0 <= self.ema_decay < 1:
            raise TrainError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.sample_every < 0:
            raise TrainError(f"--sample-every must be >= 0 (0 = never), got {self.sample_every}")
        if not 0 <= self.class_balance <= 1:
            raise TrainError(f"--class-balance must be in [0, 1] (0 = data order, 1 = classes equally often), "
                             f"got {self.class_balance}")
        if not (self.min_snr_gamma >= 0 and math.isfinite(self.min_snr_gamma)):
            raise TrainError(f"--min-snr-gamma must be >= 0 (0 = off; 5 is the paper's choice), got {self.min_snr_gamma}")
        if not 0 < self.min_lr_ratio <= 1:
            raise TrainError(f"--min-lr-ratio must be in (0, 1], got {self.min_lr_ratio}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise TrainError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {self.prediction_type!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise TrainError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise TrainError("--device cuda asked for, but torch sees no CUDA device")
        if self.arch not in ARCHITECTURES:
            raise TrainError(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.arch == "unet2d":
            self.unet2d_config(in_channels=3, n_classes=1)  # the widths and levels, before any data is read

    def unet2d_config(self, in_channels: int, n_classes: int) -> UNet2DConfig:
        """The UNet2DModel the --unet-* options describe; TrainError naming a bad one."""
        try:
            return UNet2DConfig(in_channels=in_channels, n_classes=n_classes, image_size=self.image_size,
                                num_train_timesteps=self.timesteps, block_out_channels=tuple(self.unet_channels),
                                layers_per_block=self.unet_layers, attention_levels=tuple(self.unet_attention),
                                norm_num_groups=self.unet_norm_groups, attention_head_dim=self.unet_head_dim)
        except (TypeError, ValueError) as e:
            raise TrainError(f"--arch unet2d: {e} (options --unet-channels, --unet-layers, --unet-attention, "
                             "--unet-norm-groups, --unet-head-dim)") from None

    def make_schedule(self) -> Schedule:
        try:
            return Schedule(self.schedule, self.timesteps, self.beta_start, self.beta_end)
        except ScheduleError as e:
            raise TrainError(str(e)) from None


# --- distributed helpers --------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly one-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun job if there is one (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local)


def resolve_device(cfg: TrainConfig, d: Dist) -> str:
    if cfg.device == "auto":
        return f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda":
        return f"cuda:{d.local_rank}"
    return cfg.device


# --- schedules and LR ------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of all random draws of one step (see the module docstring)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 131 + rank)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, in one fused pass; buffers copied."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


# --- data order ------------------------------------------------------------------------


class ClassBalancedSampler:
    """Per-epoch index order that shows rare classes more often (drawn with replacement).

    An image of class k is drawn with probability proportional to count_k ** -power, so a
    class's share of the draws is proportional to count_k ** (1 - power): power 0 is the
    data's own mix, 1 shows every class equally often. An epoch is still len(data) draws,
    seeded by (seed, epoch) so that resume replays it; under torchrun each rank takes
    every world-th draw of the same sequence (padded to equal length), as
    DistributedSampler does.
    """

    def __init__(self, labels: np.ndarray, power: float, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        counts = np.bincount(labels)
        self.weights = torch.tensor(counts[labels].astype(np.float64) ** -power)
        self.n, self.world, self.rank, self.seed, self.epoch = len(labels), num_replicas, rank, seed, 0
        self.num_samples = math.ceil(self.n / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        draws = torch.multinomial(self.weights, self.num_samples * self.world, replacement=True, generator=g)
        return iter(draws[self.rank::self.world].tolist())


RUN_IDENTITY = ("architecture", "model", "schedule", "class_names", "prediction_type")  # what weights only fit


def first_difference(old: dict, new: dict) -> str | None:
    """The first RUN_IDENTITY key on which two run configs differ, or None (a run from before
    the unet2d architecture names none: it is a contextunet)."""
    old = {"architecture": DEFAULT_ARCHITECTURE, **old}
    return next((key for key in RUN_IDENTITY if old.get(key) != new[key]), None)


def load_init_weights(source: str, run_config: dict, device: str) -> tuple[dict, dict, str]:
    """The raw and EMA weights of another run (or checkpoint folder) to fine-tune from.

    The network, schedule, classes and prediction type must match this run's; a weights
    file alone has only one set of weights, which then starts both.
    """
    try:
        ema_file = ckpt.resolve_weights_file(Path(source), "ema")
        config = ckpt.read_safetensors_config(ema_file)
        raw_file = ema_file.parent / ckpt.WEIGHTS["raw"]
        from safetensors.torch import load_file

        ema_state = load_file(str(ema_file), device=device)
        paired = ema_file.name == ckpt.WEIGHTS["ema"] and raw_file.is_file()
        raw_state = load_file(str(raw_file), device=device) if paired else ema_state
    except ckpt.CheckpointError as e:
        raise TrainError(f"--init-from: {e}") from None
    except Exception as e:  # an unreadable file is the user's to see, in one line
        raise TrainError(f"--init-from: cannot read {source} ({type(e).__name__}: {e})") from None
    key = first_difference(config, run_config)
    if key is not None:
        raise TrainError(f"--init-from: {source} has a different {key} ({config.get(key)!r}, "
                         f"this run {run_config[key]!r}); pass the same network and schedule options")
    return raw_state, ema_state, str(ema_file.parent)


# --- the run ---------------------------------------------------------------------------


class HorizontalFlip:
    """Per-sample random horizontal flip of a batch, through torchvision.transforms.v2.

    v2.RandomHorizontalFlip draws one coin for the whole batch tensor; a diffusion
    batch wants one per image, drawn from the step's generator for reproducibility.
    """

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        flip = torch.rand(len(x), generator=g) < 0.5  # (B,)
        flip = flip.to(x.device)
        return torch.where(flip[:, None, None, None], v2.functional.horizontal_flip(x), x)


@dataclass
class Run:
    """Everything one training process holds; `train_steps` advances it."""

    cfg: TrainConfig
    run_config: dict
    data: ImageData
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1] on the device
    labels: torch.Tensor  # (N,) int64 on the device
    model: torch.nn.Module  # possibly DDP-wrapped
    ema: torch.nn.Module  # ContextUnet or ContextUNet2D (cfg.arch)
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    device: str
    dist: Dist
    sampler: DistributedSampler | ClassBalancedSampler
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    flip: HorizontalFlip | None = None
    scaler: torch.amp.GradScaler | None = None
    sqrt_abar: torch.Tensor = field(init=False, repr=False)  # (T,) on the device
    sqrt_one_minus_abar: torch.Tensor = field(init=False, repr=False)  # (T,) on the device
    _order: torch.Tensor | None = field(default=None, repr=False)
    _order_epoch: int = -1

    def __post_init__(self) -> None:
        self.sqrt_abar = torch.tensor(self.schedule.sqrt_alphas_cumprod, dtype=torch.float32, device=self.device)
        self.sqrt_one_minus_abar = torch.tensor(self.schedule.sqrt_one_minus_alphas_cumprod, dtype=torch.float32,
                                                device=self.device)

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _batch_indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            self.sampler.set_epoch(epoch)
            self._order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
            self._order_epoch = epoch
        bs = self.cfg.batch_size
        return self._order[i * bs:(i + 1) * bs]

    def _loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023, Eq. 8 and its v form): min(SNR_t, gamma) / SNR_t
        for an epsilon target, min(SNR_t, gamma) / (SNR_t + 1) for v, with SNR_t = abar_t / (1 - abar_t).
        Low-noise steps (large SNR) stop dominating the gradient; steps with SNR <= gamma keep weight 1
        (epsilon)."""
        snr = (self.sqrt_abar[t] / self.sqrt_one_minus_abar[t]).pow(2)  # (B,)
        clipped = snr.clamp(max=self.cfg.min_snr_gamma)
        return clipped / snr if self.cfg.prediction_type == "epsilon" else clipped / (snr + 1)

    def train_step(self) -> float:
        """One optimisation step; returns the loss."""
        cfg, s = self.cfg, self.step
        g = step_generator(cfg.seed, s, self.dist.rank)
        idx = self._batch_indices(s).to(self.images.device)
        x0 = self.images[idx]  # (B, C, H, W)
        labels = self.labels[idx]
        B = len(x0)
        t = torch.randint(0, self.schedule.num_train_timesteps, (B,), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        keep = (torch.rand(B, generator=g) >= cfg.cond_drop).float().to(self.device)  # CFG dropout
        if self.flip is not None:
            x0 = self.flip(x0, g)
        a = self.sqrt_abar[t].view(B, 1, 1, 1)
        b = self.sqrt_one_minus_abar[t].view(B, 1, 1, 1)
        x_t = a * x0 + b * noise  # DDPM Eq. 4 (forward process)
        target = noise if cfg.prediction_type == "epsilon" else a * noise - b * x0
        context = F.one_hot(labels, len(self.data.class_names)).float() * keep[:, None]  # (B, K)

        lr = lr_at(s, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        dev_type = "cuda" if self.device.startswith("cuda") else "cpu"
        amp_dtype = torch.float16 if dev_type == "cuda" else torch.bfloat16
        with torch.autocast(dev_type, dtype=amp_dtype, enabled=cfg.amp):
            out = self.model(x_t, t.float(), context)
        if cfg.min_snr_gamma > 0:
            loss = (self._loss_weights(t) * (out.float() - target).pow(2).mean((1, 2, 3))).mean()
        else:
            loss = F.mse_loss(out.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # EMA warm-up (as in many DDPM codes): early on, follow the model more closely. A
        # fine-tuning run starts from a trained EMA, which the warm-up would throw away.
        decay = cfg.ema_decay if cfg.init_from else min(cfg.ema_decay, (1 + s) / (10 + s))
        ema_update(self.ema, self.module, decay)
        self.step += 1
        return float(loss.detach())

    def progress(self, extra: dict | None = None) -> dict:
        return {"step": self.step, "epoch": self.epoch, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, **(extra or {})}

    def save(self, extra: dict | None = None) -> None:
        if self.dist.main:
            ckpt.save_checkpoint(Path(self.cfg.out), self.run_config, self.module, self.ema,
                                 self.optimizer, self.progress(extra))


def load_training_data(cfg: TrainConfig) -> ImageData:
    """The images and labels `cfg.data` names; TrainError naming a bad data set."""
    try:
        return load_data(cfg.data, image_size=cfg.image_size, labels=cfg.labels)
    except DataError as e:
        raise TrainError(str(e)) from None


def check_run_folder(out: Path, resume: bool) -> None:
    """--resume needs a checkpoint in --out; a fresh run must not overwrite one."""
    found = ckpt.find_checkpoint_dir(out)
    if resume and found is None:
        raise TrainError(f"--resume: no checkpoint to resume in {out}")
    if not resume and found is not None:
        raise TrainError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")


def check_same_run(out: Path, run_config: dict) -> None:
    """--resume with other network or schedule options than the run was started with is an error."""
    config_file = out / ckpt.CONFIG_FILE
    old = json.loads(config_file.read_text()) if config_file.is_file() else None
    key = first_difference(old, run_config) if old is not None else None
    if key is not None:
        raise TrainError(f"--resume: the run in {out} has a different {key} "
                         f"({old.get(key)!r}, now {run_config[key]!r})")


def model_config(cfg: TrainConfig, data: ImageData) -> ModelConfig | UNet2DConfig:
    """The network the options and the data describe."""
    if cfg.arch == "unet2d":
        return cfg.unet2d_config(in_channels=data.images.shape[-1], n_classes=len(data.class_names))
    return ModelConfig(in_channels=data.images.shape[-1], n_feat=cfg.n_feat, n_classes=len(data.class_names),
                       image_size=cfg.image_size, num_train_timesteps=cfg.timesteps)


def init_from_onnx(source: str, model: torch.nn.Module, run_config: dict, images: torch.Tensor, schedule: Schedule,
                   seed: int) -> float:
    """--init-from FILE.onnx: the exported ContextUnet's weights, recovered (mdx.train.from_onnx)."""
    from mdx.train.from_onnx import load_onnx_weights, onnx_run_config

    if not Path(source).is_file():
        raise TrainError(f"--init-from: {source}: no such file")
    key = first_difference(onnx_run_config(source), run_config)
    if key is not None:
        raise TrainError(f"--init-from: {source} has a different {key} than this run; pass the same network "
                         f"and schedule options")
    device = next(model.parameters()).device
    gap = load_onnx_weights(source, model.cpu(), images, schedule, seed)
    model.to(device)
    return gap


def build_networks(cfg: TrainConfig, mcfg: ModelConfig | UNet2DConfig, run_config: dict, device: str, *,
                   resume: bool, log: Callable[[str], None], images: torch.Tensor | None = None,
                   schedule: Schedule | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The network (--arch) and its EMA copy: the same seeded weights on every rank, or --init-from's
    (an .onnx file's weights are recovered with its BatchNorms calibrated on `images`, noised by `schedule`)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    try:
        model = build_network(cfg.arch, mcfg).to(device)
        ema = build_network(cfg.arch, mcfg).to(device)
    except ValueError as e:  # diffusers missing for unet2d
        raise TrainError(str(e)) from None
    if cfg.init_from and not resume and Path(cfg.init_from).suffix == ".onnx":
        gap = init_from_onnx(cfg.init_from, model, run_config, images, schedule, cfg.seed)
        ema.load_state_dict(model.state_dict())
        log(f"starting from the weights recovered from {cfg.init_from} (eval-mode max abs difference "
            f"{gap:.1e} against the file)")
    elif cfg.init_from and not resume:
        raw_state, ema_state, where = load_init_weights(cfg.init_from, run_config, device)
        model.load_state_dict(raw_state)
        ema.load_state_dict(ema_state)
        log(f"starting from the weights in {where}")
    else:
        ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    return model, ema


def make_data_sampler(cfg: TrainConfig, data: ImageData, d: Dist) -> DistributedSampler | ClassBalancedSampler:
    """This rank's per-epoch index order: shuffled, or class-balanced with --class-balance."""
    if cfg.class_balance > 0:
        return ClassBalancedSampler(data.labels, cfg.class_balance, d.world, d.rank, cfg.seed)
    return DistributedSampler(range(len(data.images)), num_replicas=d.world, rank=d.rank, shuffle=True,
                              seed=cfg.seed, drop_last=False)


def count_steps(cfg: TrainConfig, sampler) -> tuple[int, int]:
    """(steps per epoch, total steps): --epochs of this rank's share, capped by --max-steps."""
    steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    return steps_per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def resume_state(out: Path, model: ContextUnet, ema: ContextUnet, optimizer: torch.optim.Optimizer, device: str,
                 log: Callable[[str], None]) -> int:
    """Load the run's last checkpoint into model, EMA and optimizer; returns its step."""
    ck_dir = ckpt.find_checkpoint_dir(out)
    try:
        progress = ckpt.load_training_state(ck_dir, model, ema, optimizer, device)
    except Exception as e:  # a corrupt checkpoint is the user's problem to see, in one line
        raise TrainError(f"--resume: cannot load the checkpoint in {ck_dir} ({type(e).__name__}: {e})") from None
    step = int(progress["step"])
    log(f"resuming {out} at step {step}")
    return step


def images_tensor(data: ImageData) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(to_float(data.images))


def build_run(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print) -> Run:
    """Validate the options, load the data, build model, EMA and optimizer (and resume)."""
    cfg.validate()
    schedule = cfg.make_schedule()
    d = init_distributed(cfg.device)
    device = resolve_device(cfg, d)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_training_data(cfg)
    out = Path(cfg.out)
    check_run_folder(out, resume)
    mcfg = model_config(cfg, data)
    run_config = ckpt.make_run_config(mcfg, schedule, list(data.class_names), cfg.prediction_type, asdict(cfg))
    if resume:
        check_same_run(out, run_config)

    images = images_tensor(data)  # (N, C, H, W) on the CPU
    model, ema = build_networks(cfg, mcfg, run_config, device, resume=resume, log=log, images=images,
                                schedule=schedule)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = make_data_sampler(cfg, data, d)
    steps_per_epoch, total = count_steps(cfg, sampler)
    step = resume_state(out, model, ema, optimizer, device, log) if resume else 0
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    return Run(cfg=cfg, run_config=run_config, data=data, images=images.to(device),
               labels=torch.from_numpy(data.labels.astype(np.int64)).to(device), model=model, ema=ema,
               optimizer=optimizer, schedule=schedule, device=device, dist=d, sampler=sampler,
               total_steps=total, steps_per_epoch=steps_per_epoch, step=step,
               flip=HorizontalFlip() if cfg.hflip else None,
               scaler=torch.amp.GradScaler("cuda") if cfg.amp and device.startswith("cuda") else None)


# --- outputs during training -----------------------------------------------------------

METRICS_FILE, SAMPLES_DIR = "metrics.jsonl", "samples"
TELEMETRY_CSV, TELEMETRY_PNG = "telemetry.csv", "telemetry.png"
METRICS_EVERY = 20  # steps between metrics lines (and progress-bar figures)


def save_sample_grid(run: Run, path: Path, steps: int = 25, seed: int = 0) -> Path:
    """A DDIM grid of the EMA model: one row per class (the torch reference sampler)."""
    K = len(run.data.class_names)
    per_class = 8
    context = np.repeat(np.eye(K, dtype=np.float32), per_class, axis=0)  # (K*8, K)
    samples = sample_reference(run.ema, run.schedule, sampler="ddim", steps=steps, context=context, seed=seed,
                               prediction_type=run.cfg.prediction_type, device=run.device)
    return _save_grid(samples, path, columns=per_class, scale=4)


def _save_grid(samples: np.ndarray, path: Path, columns: int, scale: int) -> Path:
    """(N, C, H, W) in [-1, 1] -> one PNG grid without gaps, `columns` images per row, upscaled."""
    from PIL import Image

    grid = make_grid(to_uint8(samples), columns, scale=scale, pad=0)  # (rows*H*scale, columns*W*scale, C)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path.parent, e) from None
    with atomic_write(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return path


class MetricsLog:
    """metrics.jsonl, one JSON object a line (fileio.append_line). A resumed run first drops the
    lines logged after its checkpoint (the run that died logged them; this one logs them again)."""

    def __init__(self, path: Path, resumed_at: int | None = None) -> None:
        self.path = path
        if resumed_at is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= resumed_at]
            write_text(path, "".join(line + "\n" for line in kept))

    def add(self, record: dict) -> None:
        append_line(self.path, json.dumps(record))


def _logged_step(line: str) -> float:
    """A metrics line's step; a line cut short (the disk filled mid-write) counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def start_run_folder(run: Run, out: Path, log: Callable[[str], None]) -> None:
    """Create --out and write config.json; say what the run is."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"cannot write the run folder {out}: {e.strerror or e}") from None
    ckpt.write_json(out / ckpt.CONFIG_FILE, run.run_config)
    log(f"mdx-train: {count_parameters(run.ema):,} parameters, {len(run.data.images):,} images, "
        f"{run.steps_per_epoch} steps/epoch, {run.total_steps} steps, device {run.device}, world {run.dist.world}")


class RunOutputs:
    """What a run writes while it trains (rank 0 only): metrics, checkpoints, sample grids,
    telemetry, and the progress bar."""

    def __init__(self, run: Run, out: Path, log: Callable[[str], None], resume: bool) -> None:
        from tqdm import tqdm

        self.run, self.out, self.log, self.main = run, out, log, run.dist.main
        self.bar = tqdm(total=run.total_steps, initial=run.step, disable=not self.main, unit="step",
                        dynamic_ncols=True, mininterval=1.0)
        self.metrics = MetricsLog(out / METRICS_FILE, run.step if resume else None) if self.main else None
        self.telemetry = None
        if run.cfg.telemetry and self.main:
            from mdx.train.telemetry import start_training_telemetry

            self.telemetry = start_training_telemetry(out / TELEMETRY_CSV, run.device, log=log)
        self.loss_avg: float | None = None
        self.t_last, self.n_last = time.perf_counter(), 0

    def after_step(self, loss: float) -> None:
        """Account for the step just taken; log, checkpoint and sample when due."""
        run, cfg = self.run, self.run.cfg
        self.loss_avg = loss if self.loss_avg is None else 0.98 * self.loss_avg + 0.02 * loss
        self.n_last += cfg.batch_size * run.dist.world
        self.bar.update(1)
        last = run.step == run.total_steps
        if run.step % METRICS_EVERY == 0 or last:
            self._log_metrics()
        if run.step % cfg.checkpoint_every == 0 or last:
            run.save({"loss": self.loss_avg})
        end_of_epoch = run.step % run.steps_per_epoch == 0
        if self.main and cfg.sample_every and end_of_epoch and run.epoch % cfg.sample_every == 0 and not last:
            save_sample_grid(run, self.out / SAMPLES_DIR / f"epoch-{run.epoch:04d}.png")

    def _log_metrics(self) -> None:
        run, now = self.run, time.perf_counter()
        ips = self.n_last / max(now - self.t_last, 1e-9)
        self.bar.set_postfix(loss=f"{self.loss_avg:.4f}", img_s=f"{ips:.0f}", epoch=run.epoch)
        if self.metrics is not None:
            self.metrics.add({"step": run.step, "epoch": run.epoch, "loss": self.loss_avg,
                              "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": ips})
        self.t_last, self.n_last = now, 0

    def close(self, failing: bool) -> None:
        """Close the bar and write the telemetry CSV (when a run fails, its own error is the one to see)."""
        self.bar.close()
        if self.telemetry is None:
            return
        try:
            self.telemetry.stop()
        except WriteError:
            if not failing:
                raise
            self.telemetry = None  # lost with the run's own error, which is reported instead

    def finish(self) -> None:
        """The final sample grid and the telemetry plot."""
        save_sample_grid(self.run, self.out / SAMPLES_DIR / "final.png")
        if self.telemetry is not None:
            from mdx.train.telemetry import plot

            plot(self.out / TELEMETRY_CSV, self.out / TELEMETRY_PNG)
        self.log(f"mdx-train: done, {self.run.step} steps; checkpoint in {self.out / ckpt.CKPT_DIR}")


def train(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) a training run to its end; returns the run folder."""
    run = build_run(cfg, resume=resume, log=log)
    out = Path(cfg.out)
    if run.dist.main:
        start_run_folder(run, out, log)
    outputs = RunOutputs(run, out, log, resume)
    try:
        while run.step < run.total_steps:
            outputs.after_step(run.train_step())
    except BaseException:
        outputs.close(failing=True)
        raise
    outputs.close(failing=False)
    if run.dist.main:
        outputs.finish()
    if run.dist.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out
