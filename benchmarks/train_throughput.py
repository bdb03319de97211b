"""Training throughput: mdx's training step loop against a bare seed-style loop, same machine.

    python -m mdx.bench.train_throughput [--quick] [--batch 128] [--steps 10] [--repeats 5]

Both sides train the same ContextUnet (DESIGN's course network, n_feat F) on emoji16 at the
same batch size, in fp32:

- "mdx": a `Run` built by `mdx.train.trainer.build_run`, stepped as `train()` steps it:
  `run.train_step()` (per-step generator draws, per-sample flips, CFG dropout, AdamW with the
  warm-up/cosine LR, gradient clipping, EMA update) and `run.save()` (atomic safetensors
  checkpoint with fsyncs) whenever `run.step % checkpoint_every == 0`. The data live on the
  device as one tensor and batches are gathered by index.
- "seed": the seed's loop: a torch `Dataset` whose `__getitem__` applies the per-sample
  torchvision `T.Compose([RandomHorizontalFlip, ToTensor, Normalize])` to a PIL image, a plain
  `DataLoader` (shuffle, `num_workers=0`: the transforms run in the training process), Adam,
  forward noising, CFG dropout; no EMA, no clipping, no checkpoints.

Method (mdx.bench.timing): one warm-up block of k steps each, then `repeats` timed blocks of
k steps, interleaved mdx, seed, mdx, seed, ... so a drift of the machine hits both alike;
median and p90 of the block times; images/s = batch * k / median; `ratio_vs_seed` = mdx
images/s / seed images/s (above 1: mdx is faster).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mdx.bench.records import make_record
from mdx.bench.timing import InterleavedTimer
from mdx.runtime.fileio import write_text
from mdx.runtime.schedules import make_schedule
from mdx.train.data import ImageData, load_data
from mdx.train.model import ContextUnet, count_parameters
from mdx.train.trainer import Run, TrainConfig, build_run

DATA = "emoji16"
DEFAULT_STEPS, DEFAULT_REPEATS = 10, 5
QUICK_STEPS, QUICK_REPEATS = 2, 3


# --- the seed-style loop ----------------------------------------------------------------------


class SeedDataset(Dataset):
    """The seed's dataset: uint8 NHWC images, one-hot labels, per-sample torchvision transforms."""

    def __init__(self, data: ImageData, augment_horizontal_flip: bool = True) -> None:
        import torchvision.transforms as T

        self.images = data.images  # (N, H, W, 3) uint8
        self.context = np.eye(data.num_classes, dtype=np.float32)[data.labels]  # (N, K) one-hot
        self.transform = T.Compose([
            T.RandomHorizontalFlip() if augment_horizontal_flip else torch.nn.Identity(),
            T.ToTensor(),                # from [0, 255] to [0.0, 1.0]
            T.Normalize((0.5,), (0.5,)),  # to [-1, 1]
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(Image.fromarray(self.images[idx])), torch.from_numpy(self.context[idx])


class SeedLoop:
    """The seed's training loop, without EMA, clipping or checkpoints; `steps(k)` runs k steps."""

    def __init__(self, data: ImageData, model: ContextUnet, batch: int, device: str, lr: float = 1e-3,
                 seed: int = 0) -> None:
        self.model, self.device = model.to(device).train(), device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        T = model.config.num_train_timesteps
        sched = make_schedule("linear", T)
        self.T = T
        self.sqrt_abar = torch.tensor(sched.sqrt_alphas_cumprod, dtype=torch.float32, device=device)
        self.sqrt_1m_abar = torch.tensor(sched.sqrt_one_minus_alphas_cumprod, dtype=torch.float32, device=device)
        g = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(SeedDataset(data), batch_size=batch, shuffle=True, num_workers=0, generator=g)
        self._it: Iterator = iter(self.loader)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._it)
        except StopIteration:  # a new epoch
            self._it = iter(self.loader)
            return next(self._it)

    def step(self) -> float:
        x, c = self._next_batch()
        x, c = x.to(self.device), c.to(self.device)  # (B, C, H, W), (B, K)
        B = len(x)
        mask = torch.bernoulli(torch.full((B,), 0.9, device=self.device))  # CFG dropout
        c = c * mask[:, None]
        noise = torch.randn_like(x)
        t = torch.randint(0, self.T, (B,), device=self.device)
        x_t = self.sqrt_abar[t].view(B, 1, 1, 1) * x + self.sqrt_1m_abar[t].view(B, 1, 1, 1) * noise
        self.optimizer.zero_grad()
        loss = F.mse_loss(self.model(x_t, t.float(), c), noise)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def steps(self, k: int) -> None:
        for _ in range(k):
            self.step()


# --- the mdx loop -----------------------------------------------------------------------------


def mdx_steps(run: Run, k: int, checkpoint_every: int) -> None:
    """k steps of mdx's loop, saving a checkpoint on the trainer's cadence."""
    for _ in range(k):
        run.train_step()
        if run.step % checkpoint_every == 0:
            run.save()


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --- the benchmark ----------------------------------------------------------------------------


def run(batch: int = 128, steps: int | None = None, repeats: int | None = None, threads: int | None = None,
        n_feat: int = 64, quick: bool = False, *, device: str = "auto", checkpoint_every: int | None = None,
        warmup: int = 1, log=print) -> list[dict]:
    """Time mdx's training loop against the seed-style loop; returns the two records [mdx, seed].

    `steps` (k) is the block length, `repeats` the number of timed blocks per side. `quick`
    shortens both (k = 2, 3 repeats) and checkpoints at the end of every mdx block, so that the
    save path is timed too (an upper bound of its cost: the trainer's default is one save per
    500 steps, which is what `checkpoint_every` defaults to otherwise).
    """
    k = steps or (QUICK_STEPS if quick else DEFAULT_STEPS)
    repeats = repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    checkpoint_every = checkpoint_every or (k if quick else TrainConfig().checkpoint_every)
    if min(batch, k, repeats, checkpoint_every, n_feat) < 1:
        raise ValueError(f"batch, steps, repeats, checkpoint_every and n_feat must be >= 1, got "
                         f"{batch}, {k}, {repeats}, {checkpoint_every}, {n_feat}")
    device = _resolve_device(device)
    provider = "cuda" if device.startswith("cuda") else "cpu"
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if provider == "cuda" else None
    try:
        with tempfile.TemporaryDirectory(prefix="mdx-train-bench-") as tmp:
            cfg = TrainConfig(data=DATA, batch_size=batch, n_feat=n_feat, device=device, threads=threads,
                              checkpoint_every=checkpoint_every, sample_every=0, out=str(Path(tmp) / "run"))
            mdx_run = build_run(cfg, log=lambda m: None)
            torch.manual_seed(cfg.seed)  # the same initial weights as mdx's model
            seed_loop = SeedLoop(load_data(DATA, image_size=cfg.image_size), ContextUnet(mdx_run.module.config),
                                 batch, device)
            log(f"train_throughput: batch {batch}, {k} steps x {repeats} repeats (+{warmup} warm-up), "
                f"n_feat {n_feat}, {count_parameters(mdx_run.ema):,} parameters, device {device}, "
                f"{torch.get_num_threads()} threads, mdx checkpoint every {checkpoint_every} steps")
            timer = InterleavedTimer(repeats=repeats, warmup=warmup, sync=sync)
            stats = timer.run({"mdx": lambda: mdx_steps(mdx_run, k, checkpoint_every),
                               "seed": lambda: seed_loop.steps(k)})
    finally:
        torch.set_num_threads(threads_before)

    common = dict(steps=k, images=batch * k, n_feat=n_feat, params=count_parameters(seed_loop.model),
                  threads=threads or threads_before, device=device, data=DATA)
    records = {name: make_record("training", "torch", provider, "fp32", batch, stats=st, variant=name, **common)
               for name, st in stats.items()}
    records["mdx"]["checkpoint_every"] = checkpoint_every
    records["mdx"]["ratio_vs_seed"] = records["mdx"]["images_per_s"] / records["seed"]["images_per_s"]
    return [records["mdx"], records["seed"]]


def format_table(records: list[dict]) -> str:
    lines = [f"{'variant':8} {'batch':>5} {'steps':>5} {'median_s':>9} {'p90_s':>9} {'images/s':>9}"]
    for r in records:
        lines.append(f"{r['variant']:8} {r['batch']:5d} {r['steps']:5d} {r['median_s']:9.3f} {r['p90_s']:9.3f} "
                     f"{r['images_per_s']:9.1f}")
    mdx = next(r for r in records if r["variant"] == "mdx")
    lines.append(f"mdx / seed images/s: {mdx['ratio_vs_seed']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mdx.bench.train_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help=f"steps per timed block (default {DEFAULT_STEPS})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed blocks per side (default {DEFAULT_REPEATS})")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n-feat", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--quick", action="store_true", help=f"k = {QUICK_STEPS}, {QUICK_REPEATS} repeats")
    p.add_argument("--json", type=Path, default=None, help="also write the records to this file")
    a = p.parse_args(argv)
    records = run(batch=a.batch, steps=a.steps, repeats=a.repeats, threads=a.threads, n_feat=a.n_feat,
                  quick=a.quick, device=a.device, checkpoint_every=a.checkpoint_every)
    print(format_table(records))
    if a.json:
        write_text(a.json, json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
