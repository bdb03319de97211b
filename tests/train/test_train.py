"""Tests for mdx-train end to end: the CLI, its outputs, exact resume after SIGKILL, DDP,
every bad input a user can give, telemetry, the missing-extra hint, the torch reference
sampler against diffusers, the learning-rate schedule and the EMA update.

Everything is tiny (n_feat 8, T 50, 48 images of 16x16, a few dozen steps, one thread):
the machine's cores are shared with real training runs.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image
from safetensors.torch import load_file

from mdx.runtime.schedules import Schedule
from mdx.train import checkpoint as ckpt
from mdx.train.cli import TRAIN_EXTRA_HINT, main
from mdx.train.model import ContextUnet, ModelConfig
from mdx.train.reference import leading_timesteps, sample_reference
from mdx.train.trainer import ClassBalancedSampler, TrainConfig, build_run, ema_update, lr_at

PYTHON = sys.executable
N_IMAGES, N_CLASSES, SIZE = 48, 3, 16
SUBPROCESS_TIMEOUT_S = 180
# Torch reference sampler vs diffusers' loop on the same float64 coefficients (observed: 0.0).
REFERENCE_ATOL = 1e-5
# ... and vs diffusers' own scheduler, whose betas and alphas_cumprod are float32: over 50 DDPM
# steps that rounding alone moves samples by up to ~7e-5 (observed; 0.0 with float64 coefficients).
REFERENCE_FLOAT32_ATOL = 2e-4


# --- helpers -------------------------------------------------------------------------------


def write_npz(path: Path, n: int = N_IMAGES, k: int = N_CLASSES, *, images: np.ndarray | None = None,
              labels: np.ndarray | None = None) -> Path:
    """A small synthetic data set in the .npz format (images uint8 NHWC, labels, class_names)."""
    rng = np.random.default_rng(0)
    if images is None:
        images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    if labels is None:
        labels = np.arange(len(images)) % k
    np.savez(path, images=images, labels=labels, class_names=np.array([f"class{i}" for i in range(k)]))
    return path


def train_args(data: Path, out: Path, *, max_steps: int = 6, checkpoint_every: int = 3, **extra: object) -> list[str]:
    """mdx-train options for a tiny CPU run; `extra` adds or overrides --key value pairs."""
    opts: dict[str, object] = {
        "--data": data, "--out": out, "--n-feat": 8, "--timesteps": 50, "--batch-size": 8,
        "--max-steps": max_steps, "--epochs": 100, "--checkpoint-every": checkpoint_every,
        "--warmup-steps": 3, "--sample-every": 0, "--threads": 1, "--device": "cpu",
    }
    flags = []
    for key, value in extra.items():
        name = "--" + key.replace("_", "-")
        if value is True:
            flags.append(name)
        else:
            opts[name] = value
    return [str(a) for kv in opts.items() for a in kv] + flags


def invoke(args: list[str]) -> Result:
    """mdx-train in this process (click's CliRunner), stderr kept apart from stdout."""
    return CliRunner().invoke(main, args, prog_name="mdx-train")


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold the same names and bit-identical tensors."""
    ta, tb = read_tensors(a), read_tensors(b)
    assert sorted(ta) == sorted(tb), f"{a.name}: different tensor names"
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, f"{a.name}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's current checkpoint, or None while there is none (or it is mid-swap)."""
    try:
        return int(json.loads((run_dir / ckpt.CKPT_DIR / "progress.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file under `root`."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_npz: Path) -> tuple[Path, Result]:
    """One short run through the CLI with --telemetry, shared by the output and telemetry tests."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = invoke(train_args(data_npz, out, max_steps=6, checkpoint_every=3, telemetry=True))
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    return out, result


# --- (a) a tiny run and what it writes ------------------------------------------------------


def test_tiny_run_writes_its_outputs(tiny_run: tuple[Path, Result]) -> None:
    out, _ = tiny_run
    for name in ("config.json", "metrics.jsonl", "samples/final.png", "checkpoint/progress.json",
                 "checkpoint/model.safetensors", "checkpoint/ema.safetensors", "checkpoint/optimizer.safetensors"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary or old folder left
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".bin")]

    config = json.loads((out / "config.json").read_text())
    assert config["model"] == ModelConfig(3, 8, N_CLASSES, SIZE, 50).to_dict()
    assert config["class_names"] == [f"class{i}" for i in range(N_CLASSES)]
    assert config["train"]["max_steps"] == 6

    progress = json.loads((out / "checkpoint/progress.json").read_text())
    assert progress["step"] == 6 and math.isfinite(progress["loss"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["step"] == 6
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)

    with Image.open(out / "samples/final.png") as grid:  # one row of 8 per class, 4x upscaled
        assert grid.size == (8 * SIZE * 4, N_CLASSES * SIZE * 4)


def test_checkpoint_loads_without_pickle(tiny_run: tuple[Path, Result], monkeypatch: pytest.MonkeyPatch) -> None:
    """load_checkpoint rebuilds both weight sets; any unpickling on the way fails the test."""
    out, _ = tiny_run

    def no_pickle(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint load touched pickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, no_pickle)
    loaded = {w: ckpt.load_checkpoint(out, weights=w) for w in ("ema", "raw")}
    monkeypatch.undo()

    for w, lc in loaded.items():
        assert lc.step == 6 and lc.class_names == [f"class{i}" for i in range(N_CLASSES)]
        assert lc.path == out / "checkpoint" / ckpt.WEIGHTS[w]
        assert not lc.model.training
        x = torch.zeros(2, 3, SIZE, SIZE)
        with torch.no_grad():
            y = lc.model(x, torch.tensor([0.0, 49.0]), torch.eye(N_CLASSES)[:2])
        assert torch.isfinite(y).all()
    ema, raw = loaded["ema"].model.state_dict(), loaded["raw"].model.state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema), "EMA and raw weights should differ after training"
    # The files are safetensors: an 8-byte little-endian header length, then a JSON header.
    with open(out / "checkpoint/ema.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"]["mdx.step"] == "6"


# --- (b) SIGKILL, then --resume: bit-identical to an uninterrupted run -----------------------


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, data_npz: Path) -> None:
    total, every = 24, 4  # 6 steps per epoch: the kill and the resume cross epoch boundaries
    run_a, run_b = tmp_path / "a", tmp_path / "b"

    result = invoke(train_args(data_npz, run_a, max_steps=total, checkpoint_every=every))
    assert result.exit_code == 0, result.stderr

    proc = subprocess.Popen([PYTHON, "-m", "mdx.train", *train_args(data_npz, run_b, max_steps=total,
                                                                      checkpoint_every=every)],
                            cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killed_at = None
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            step = checkpoint_step(run_b)
            if step is not None and step >= every:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = step
                break
            time.sleep(0.002)  # poll interval; the child's progress is what we wait for
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    if killed_at is None or proc.returncode != -signal.SIGKILL:
        pytest.fail(f"run B was not killed mid-run (exit {proc.returncode}, checkpoint step "
                    f"{checkpoint_step(run_b)}); stderr: {stderr[-2000:]}")
    left = ckpt.find_checkpoint_dir(run_b)
    assert left is not None, "the kill left no complete checkpoint"
    resumed_from = json.loads((left / "progress.json").read_text())["step"]
    assert every <= resumed_from < total and resumed_from % every == 0, (killed_at, resumed_from)

    result = invoke(train_args(data_npz, run_b, max_steps=total, checkpoint_every=every, resume=True))
    assert result.exit_code == 0, result.stderr
    assert f"resuming {run_b} at step {resumed_from}" in result.stderr

    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert_same_tensors(run_a / "checkpoint" / name, run_b / "checkpoint" / name)
    pa, pb = (json.loads((r / "checkpoint/progress.json").read_text()) for r in (run_a, run_b))
    assert (pa["step"], pa["epoch"], pa["optimizer"]) == (pb["step"], pb["epoch"], pb["optimizer"])
    assert pa["step"] == total


# --- (c) DDP with gloo on CPU: only rank 0 writes ------------------------------------------


def test_torchrun_two_processes(tmp_path: Path, data_npz: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mdx.train",
           *train_args(data_npz, out, max_steps=4, checkpoint_every=2)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 logs, and it reports a world of 2.
    starts = [ln for ln in proc.stderr.splitlines() if "parameters," in ln]
    assert len(starts) == 1 and "world 2" in starts[0], starts
    assert sum("mdx-train: done" in ln for ln in proc.stderr.splitlines()) == 1

    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "config.json", "metrics.jsonl", "samples"]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "progress.json"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(ln)["step"] for ln in lines]
    assert len(lines) == len(set(lines)) and steps == sorted(set(steps)) and steps[-1] == 4
    loaded = ckpt.load_checkpoint(out)
    assert loaded.step == 4
    assert "module.init_conv.conv1.0.weight" not in read_tensors(loaded.path)  # DDP prefix stripped


# --- (d) bad inputs: exit 2, one line, no traceback, nothing written -------------------------


def _bad_npz(**arrays: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[Path], Path]:
    """A maker of an .npz whose images/labels are transformed by the given functions."""
    def make(tmp: Path) -> Path:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
        labels = np.arange(N_IMAGES) % N_CLASSES
        images = arrays.get("images", lambda i, l: i)(images, labels)
        labels = arrays.get("labels", lambda i, l: l)(images, labels)
        return write_npz(tmp / "bad.npz", images=images, labels=labels)
    return make


def _empty_folder(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _corrupt_image_folder(tmp: Path) -> Path:
    for cls in ("cats", "dogs"):
        (tmp / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp / "imgs" / cls / "ok.png")
    (tmp / "imgs" / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return tmp / "imgs"


BAD_DATA = {
    "missing path": (lambda tmp: tmp / "nope.npz", "no such file"),
    "wrong rank": (_bad_npz(images=lambda i, l: i[..., 0]), "shape"),
    "wrong dtype": (_bad_npz(images=lambda i, l: i.astype(np.float32)), "uint8"),
    "labels mismatch": (_bad_npz(labels=lambda i, l: l[:-1]), "47 labels for 48 images"),
    "label out of range": (_bad_npz(labels=lambda i, l: l + 1), "out of range"),
    "empty folder": (_empty_folder, "no class sub-folders"),
    "corrupt image": (_corrupt_image_folder, "broken.png"),
}

BAD_OPTIONS = {
    "unknown schedule": (["--schedule", "zigzag"], "zigzag"),
    "beta_start = beta_end": (["--beta-start", "0.02", "--beta-end", "0.02"], "beta"),
    "beta_start > beta_end": (["--beta-start", "0.05", "--beta-end", "0.01"], "beta"),
    "epochs 0": (["--epochs", "0"], "--epochs"),
    "epochs negative": (["--epochs", "-3"], "--epochs"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "not an integer": (["--max-steps", "many"], "--max-steps"),
    "resume nothing": (["--resume"], "no checkpoint to resume"),
    "class balance above 1": (["--class-balance", "1.5"], "--class-balance"),
    "class balance negative": (["--class-balance", "-0.1"], "--class-balance"),
    "init-from nothing": (["--init-from", "/nonexistent/run"], "--init-from"),
    "init-from a missing .onnx": (["--init-from", "/nonexistent/model.onnx"], "no such file"),
    "min-snr negative": (["--min-snr-gamma", "-1"], "--min-snr-gamma"),
    "min-snr nan": (["--min-snr-gamma", "nan"], "--min-snr-gamma"),
    "min-lr-ratio 0": (["--min-lr-ratio", "0"], "--min-lr-ratio"),
    "min-lr-ratio above 1": (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
}


def assert_one_line_error(result: Result, fragment: str) -> None:
    """Exit code 2, exactly one stderr line `mdx-train: error: ...` naming `fragment`, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdx-train: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_exit_2(case: str, tmp_path: Path) -> None:
    make, fragment = BAD_DATA[case]
    out = tmp_path / "run"
    result = invoke(train_args(make(tmp_path), out))
    assert_one_line_error(result, fragment)
    assert not out.exists()


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_one_line_exit_2(case: str, tmp_path: Path, data_npz: Path) -> None:
    options, fragment = BAD_OPTIONS[case]
    out = tmp_path / "run"
    args = train_args(data_npz, out)
    for i in range(0, len(options), 2):  # override in place, or append a flag
        if options[i] in args:
            args[args.index(options[i]) + 1] = options[i + 1]
        else:
            args += options[i:i + 2]
    result = invoke(args)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_unwritable_out_is_one_line_exit_2(tmp_path: Path, data_npz: Path) -> None:
    """--out under a regular file (root ignores permission bits, but not ENOTDIR)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = invoke(train_args(data_npz, blocker / "run"))
    assert_one_line_error(result, "cannot write the run folder")
    assert blocker.read_text() == "not a folder"


def test_existing_checkpoint_needs_resume(tiny_run: tuple[Path, Result], data_npz: Path) -> None:
    out, _ = tiny_run
    before = files_under(out)
    result = invoke(train_args(data_npz, out))
    assert_one_line_error(result, "already holds a checkpoint")
    assert files_under(out) == before


def test_bad_option_in_a_real_process(tmp_path: Path) -> None:
    """The installed entry point (`python -m mdx.train`) prints the same single line; click parses
    options before torch is imported, so this is quick."""
    proc = subprocess.run([PYTHON, "-m", "mdx.train", "--schedule", "zigzag", "--out", "never"], cwd=tmp_path,
                          capture_output=True, text=True, env=subprocess_env(), timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 2
    assert proc.stderr.startswith("mdx-train: error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stdout == "" and not (tmp_path / "never").exists()


# --- (e) telemetry on CPU -------------------------------------------------------------------


def test_telemetry_on_cpu(tiny_run: tuple[Path, Result]) -> None:
    out, result = tiny_run
    rows = (out / "telemetry.csv").read_text().splitlines()
    assert rows[0].split(",") == ["time_s", "rss_mb", "cpu_pct"]
    assert len(rows) >= 2
    assert all(math.isfinite(float(v)) for row in rows[1:] for v in row.split(","))
    with Image.open(out / "telemetry.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert result.stderr.count("no GPU in use") == 1, result.stderr


# --- (f) without torch: say which extra to install -----------------------------------------


def test_without_torch_names_the_extra(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys
        from importlib.abc import MetaPathFinder

        class NoTorch(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        assert "torch" not in sys.modules
        sys.meta_path.insert(0, NoTorch())
        from mdx.train.cli import main
        main(["--max-steps", "1", "--out", "never"], prog_name="mdx-train")
    """)
    proc = subprocess.run([PYTHON, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env=subprocess_env(), timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"mdx-train: error: {TRAIN_EXTRA_HINT}\n"
    assert "microdiffusion[train]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


# --- (g) the torch reference sampler against diffusers -------------------------------------

DIFFUSERS_BETA_SCHEDULE = {"linear": "linear", "quadratic": "scaled_linear", "sigmoid": "sigmoid",
                           "cosine": "squaredcos_cap_v2"}


def diffusers_scheduler(sampler: str, schedule: Schedule, prediction_type: str, float64: bool):
    """diffusers' default scheduler on the same schedule (by name where diffusers knows it).

    With `float64`, its float32 betas/alphas/alphas_cumprod are replaced by mdx's float64 ones,
    so that only the sampling algorithm is compared.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    kwargs = dict(num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
                  beta_end=schedule.beta_end, prediction_type=prediction_type)
    if sampler == "ddim" and schedule.kind == "sigmoid":  # DDIMScheduler has no sigmoid schedule
        scheduler = cls(trained_betas=schedule.betas.tolist(), **kwargs)
    else:
        scheduler = cls(beta_schedule=DIFFUSERS_BETA_SCHEDULE[schedule.kind], **kwargs)
    # The same schedule up to float32 rounding (DESIGN: mdx's schedules equal diffusers' by name).
    np.testing.assert_allclose(scheduler.betas.numpy(), schedule.betas, rtol=1e-6, atol=0)
    if float64:
        scheduler.betas = torch.from_numpy(schedule.betas)
        scheduler.alphas = torch.from_numpy(schedule.alphas)
        scheduler.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)
    return scheduler


@torch.no_grad()
def diffusers_loop(model: ContextUnet, schedule: Schedule, sampler: str, steps: int, context: np.ndarray,
                   seed: int, guidance: float, eta: float, prediction_type: str, float64: bool,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, int, np.ndarray]:
    """The textbook diffusers loop, guidance by two separate model calls, noise from DESIGN's numpy
    stream (diffusers' `randn_tensor` is patched to draw from it). Returns (x_0, draws, timesteps)."""
    import diffusers.schedulers.scheduling_ddim as ddim_mod
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    cfg = model.config
    shape = (len(context), cfg.in_channels, cfg.image_size, cfg.image_size)
    rng = np.random.default_rng(seed)
    draws = 0

    def numpy_randn(*args: object, **kwargs: object) -> torch.Tensor:
        nonlocal draws
        draws += 1
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

    for mod in (ddim_mod, ddpm_mod):
        monkeypatch.setattr(mod, "randn_tensor", numpy_randn)
    scheduler = diffusers_scheduler(sampler, schedule, prediction_type, float64)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    cond = torch.from_numpy(context)
    uncond = torch.zeros_like(cond)
    for t in scheduler.timesteps:
        tt = torch.full((len(x),), float(t))
        out = model(x, tt, cond)
        if guidance != 1.0:
            out_u = model(x, tt, uncond)
            out = out_u + guidance * (out - out_u)  # eps_u + s (eps_c - eps_u)
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x.clamp(-1, 1).numpy(), draws, scheduler.timesteps.numpy()


@pytest.mark.parametrize(("sampler", "kind", "steps", "guidance", "eta", "prediction_type"), [
    ("ddim", "linear", 10, 1.0, 0.0, "epsilon"),
    ("ddim", "cosine", 10, 3.0, 0.0, "epsilon"),
    ("ddim", "sigmoid", 7, 1.0, 1.0, "epsilon"),
    ("ddim", "quadratic", 10, 2.0, 0.5, "v_prediction"),
    ("ddpm", "linear", 10, 2.5, 0.0, "epsilon"),
    ("ddpm", "sigmoid", 50, 1.0, 0.0, "epsilon"),  # steps = T: every training timestep
    ("ddpm", "cosine", 9, 1.0, 0.0, "v_prediction"),
])
def test_reference_sampler_matches_diffusers(sampler: str, kind: str, steps: int, guidance: float, eta: float,
                                             prediction_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = ContextUnet(ModelConfig(in_channels=3, n_feat=8, n_classes=3, image_size=16,
                                    num_train_timesteps=50)).eval()
    schedule = Schedule(kind, 50)
    context = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0]], dtype=np.float32)
    ours = sample_reference(model, schedule, sampler=sampler, steps=steps, context=context, seed=7,
                            guidance=guidance, eta=eta, prediction_type=prediction_type)
    assert ours.shape == (4, 3, 16, 16) and ours.dtype == np.float32
    assert np.abs(ours).max() > 0.1  # not a degenerate all-zero comparison
    for float64, atol in ((True, REFERENCE_ATOL), (False, REFERENCE_FLOAT32_ATOL)):
        theirs, draws, timesteps = diffusers_loop(model, schedule, sampler, steps, context, 7, guidance, eta,
                                                  prediction_type, float64, monkeypatch)
        np.testing.assert_array_equal(timesteps, leading_timesteps(50, steps))
        # DESIGN's convention: DDPM draws at every t > 0, DDIM at every step when eta > 0.
        assert draws == (int((timesteps > 0).sum()) if sampler == "ddpm" else (steps if eta > 0 else 0))
        diff = float(np.abs(ours - theirs).max())
        assert diff <= atol, f"float64 coefficients={float64}: max abs diff {diff:.3g} > {atol}"


# --- (h) learning rate and EMA ---------------------------------------------------------------


def test_lr_warmup_then_cosine() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    lrs = [lr_at(s, cfg, total) for s in range(total + 1)]
    # Linear warm-up: lr * (s + 1) / warmup, reaching the peak at the last warm-up step.
    for s in range(10):
        assert lrs[s] == pytest.approx(1e-3 * (s + 1) / 10, rel=1e-12)
    assert lrs[9] == pytest.approx(1e-3, rel=1e-12) and lrs[10] == pytest.approx(1e-3, rel=1e-12)
    # Cosine decay: halfway down at the middle, min_lr_ratio * lr at the end, monotone between.
    assert lrs[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-12)
    assert lrs[110] == pytest.approx(1e-4, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(500, cfg, total) == pytest.approx(1e-4, rel=1e-12)  # stays at the floor past the end


def test_ema_update_math() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.train()(torch.randn(8, 3))  # move BatchNorm's running statistics
    e0 = [p.detach().clone() for p in ema.parameters()]
    m0 = [p.detach().clone() for p in model.parameters()]
    ema_update(ema, model, decay=0.9)
    for e, before, m in zip(ema.parameters(), e0, m0):
        torch.testing.assert_close(e, 0.9 * before + 0.1 * m, rtol=0, atol=1e-7)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        assert torch.equal(eb, mb)  # buffers are copied, not averaged
    for p, before in zip(model.parameters(), m0):
        assert torch.equal(p, before)  # the model itself is untouched
    ema_update(ema, model, decay=0.0)  # decay 0: the EMA becomes the model
    for e, m in zip(ema.parameters(), model.parameters()):
        assert torch.equal(e, m)


# --- (i) class-balanced data order and fine-tuning ----------------------------------------------


def draw_shares(labels: np.ndarray, power: float, epochs: int = 200) -> np.ndarray:
    sampler = ClassBalancedSampler(labels, power, seed=0)
    drawn = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        drawn += list(iter(sampler))
    return np.bincount(labels[np.array(drawn)], minlength=labels.max() + 1) / len(drawn)


def test_class_balanced_sampler_shares() -> None:
    """A class's share of the draws is proportional to count ** (1 - power)."""
    counts = np.array([64, 16, 4])
    labels = np.repeat(np.arange(3), counts)
    for power in (0.0, 0.5, 1.0):
        want = counts ** (1 - power) / (counts ** (1 - power)).sum()
        np.testing.assert_allclose(draw_shares(labels, power), want, atol=0.02, err_msg=f"power {power}")


def test_class_balanced_sampler_is_seeded_by_epoch_and_shards_by_rank() -> None:
    labels = np.repeat(np.arange(3), [30, 6, 3])
    a, b = ClassBalancedSampler(labels, 0.5, seed=7), ClassBalancedSampler(labels, 0.5, seed=7)
    a.set_epoch(3), b.set_epoch(3)
    assert list(iter(a)) == list(iter(b)) and len(list(iter(a))) == len(a) == len(labels)
    b.set_epoch(4)
    assert list(iter(a)) != list(iter(b))  # a new epoch, a new order
    ranks = [ClassBalancedSampler(labels, 0.5, num_replicas=2, rank=r, seed=7) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(3)
    r0, r1 = (list(iter(r)) for r in ranks)
    assert len(r0) == len(r1) == math.ceil(len(labels) / 2)
    # Both ranks take turns through one sequence: interleaved, they are that sequence's draws.
    g = torch.Generator().manual_seed(7 * 1_000_003 + 3)
    whole = torch.multinomial(ranks[0].weights, 2 * len(r0), replacement=True, generator=g).tolist()
    assert whole[0::2] == r0 and whole[1::2] == r1


def test_class_balance_run_trains(tmp_path: Path, data_npz: Path) -> None:
    out = tmp_path / "balanced"
    result = invoke(train_args(data_npz, out, max_steps=3, checkpoint_every=3, class_balance=1.0))
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert json.loads((out / "config.json").read_text())["train"]["class_balance"] == 1.0
    assert checkpoint_step(out) == 3


def test_init_from_starts_from_the_source_weights(tiny_run: tuple[Path, Result], data_npz: Path,
                                                  tmp_path: Path) -> None:
    source, _ = tiny_run
    cfg = TrainConfig(data=str(data_npz), out=str(tmp_path / "ft"), n_feat=8, timesteps=50, batch_size=8,
                      max_steps=2, threads=1, device="cpu", sample_every=0, init_from=str(source))
    run = build_run(cfg, log=lambda m: None)
    raw = read_tensors(source / ckpt.CKPT_DIR / "model.safetensors")
    ema = read_tensors(source / ckpt.CKPT_DIR / "ema.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # so the test can tell them apart
    for name, tensor in run.module.state_dict().items():
        assert torch.equal(tensor, raw[name]), name
    for name, tensor in run.ema.state_dict().items():
        assert torch.equal(tensor, ema[name]), name
    assert run.step == 0  # a fresh schedule, not a resume
    # Through the CLI the run then trains and records where it started from.
    result = invoke(train_args(data_npz, tmp_path / "ft-cli", max_steps=2, checkpoint_every=2,
                               init_from=source))
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert json.loads((tmp_path / "ft-cli" / "config.json").read_text())["train"]["init_from"] == str(source)
    assert "starting from the weights in" in result.stderr


def test_init_from_another_network_is_one_line_exit_2(tiny_run: tuple[Path, Result], data_npz: Path,
                                                      tmp_path: Path) -> None:
    source, _ = tiny_run
    out = tmp_path / "ft"
    args = train_args(data_npz, out, init_from=source)
    args[args.index("--n-feat") + 1] = "16"
    assert_one_line_error(invoke(args), "different model")
    assert not out.exists()


# --- min-SNR weighting and fine-tuning from an exported .onnx -------------------------------


def test_min_snr_weights_follow_the_paper(tmp_path: Path, data_npz: Path) -> None:
    cfg = TrainConfig(data=str(data_npz), out=str(tmp_path / "w"), n_feat=8, timesteps=50, batch_size=8,
                      max_steps=1, threads=1, device="cpu", sample_every=0, min_snr_gamma=5.0)
    run = build_run(cfg, log=lambda m: None)
    t = torch.arange(50)
    abar = torch.tensor(run.schedule.alphas_cumprod, dtype=torch.float64)
    snr = abar / (1 - abar)
    want = torch.minimum(snr, torch.tensor(5.0)) / snr
    np.testing.assert_allclose(run._loss_weights(t).double().numpy(), want.numpy(), rtol=1e-5)
    assert run._loss_weights(t)[-1] == 1.0 and run._loss_weights(t)[0] < 0.01  # noisy steps keep weight 1
    run.cfg = TrainConfig(**{**asdict(cfg), "prediction_type": "v_prediction"})
    np.testing.assert_allclose(run._loss_weights(t).double().numpy(),
                               (torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)).numpy(), rtol=1e-5)


def test_min_snr_run_trains_differently_and_records_gamma(tmp_path: Path, data_npz: Path) -> None:
    runs = {}
    for gamma in (0.0, 5.0):
        out = tmp_path / f"g{gamma}"
        result = invoke(train_args(data_npz, out, max_steps=3, checkpoint_every=3, min_snr_gamma=gamma))
        assert result.exit_code == 0, result.stderr + repr(result.exception)
        assert json.loads((out / "config.json").read_text())["train"]["min_snr_gamma"] == gamma
        runs[gamma] = read_tensors(out / ckpt.CKPT_DIR / "model.safetensors")
    assert any(not torch.equal(runs[0.0][k], runs[5.0][k]) for k in runs[0.0])


@pytest.fixture(scope="module")
def tiny_onnx(tiny_run: tuple[Path, Result], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny run exported to fp32 and int8 .onnx files."""
    from mdx.export.onnx_export import export_checkpoint

    source, _ = tiny_run
    folder = tmp_path_factory.mktemp("onnx")
    files = {}
    for precision in ("fp32", "int8"):
        files[precision] = folder / f"tiny-{precision}.onnx"
        export_checkpoint(source, files[precision], precision=precision, verbose=False)
    return files


def test_init_from_onnx_recovers_the_exported_network(tiny_run: tuple[Path, Result], tiny_onnx: dict[str, Path],
                                                      data_npz: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    source, _ = tiny_run
    cfg = TrainConfig(data=str(data_npz), out=str(tmp_path / "ft"), n_feat=8, timesteps=50, batch_size=8,
                      max_steps=2, threads=1, device="cpu", sample_every=0, init_from=str(tiny_onnx["fp32"]))
    run = build_run(cfg, log=lambda m: None)
    original = ckpt.load_checkpoint(source).model  # the EMA weights the file was exported from, eval mode
    for name, tensor in run.module.state_dict().items():  # the EMA copy starts equal to the network
        assert torch.equal(tensor, run.ema.state_dict()[name]), name
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 3, SIZE, SIZE), dtype=np.float32)
    t = rng.integers(0, 50, 6)
    c = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, 6)]
    session = ort.InferenceSession(str(tiny_onnx["fp32"]), providers=["CPUExecutionProvider"])
    t_type = np.int64 if "int64" in session.get_inputs()[1].type else np.float32
    from_file = session.run(None, {"sample": x, "timestep": t.astype(t_type), "context": c})[0]
    with torch.no_grad():
        args = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c))
        recovered = run.module.eval()(*args).numpy()
        reference = original(*args).numpy()
    np.testing.assert_allclose(recovered, from_file, atol=1e-4)
    np.testing.assert_allclose(recovered, reference, atol=1e-4)
    # Weights the file names come back bit for bit (not only the function).
    state = original.state_dict()
    for name in ("init_conv.shortcut.weight", "timeembed1.model.0.weight", "contextembed2.model.2.weight",
                 "up0.1.weight", "out.1.bias", "out.3.weight"):
        assert torch.equal(run.module.state_dict()[name], state[name]), name


def test_init_from_onnx_trains_through_the_cli(tiny_onnx: dict[str, Path], data_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft-cli"
    result = invoke(train_args(data_npz, out, max_steps=2, checkpoint_every=2, init_from=tiny_onnx["fp32"]))
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert "recovered from" in result.stderr and checkpoint_step(out) == 2
    assert json.loads((out / "config.json").read_text())["train"]["init_from"] == str(tiny_onnx["fp32"])


def _renamed_weight(src: Path, dst: Path) -> Path:
    import onnx

    model = onnx.load(str(src))
    renamed = next(i for i in model.graph.initializer if i.name == "out.3.weight")
    for node in model.graph.node:
        node.input[:] = ["out_3_w" if i == renamed.name else i for i in node.input]
    renamed.name = "out_3_w"
    onnx.save(model, str(dst))
    return dst


BAD_ONNX_SOURCES = {
    "an int8 file": (lambda files, tmp: files["int8"], "int8 file"),
    "not an onnx file": (lambda files, tmp: _write(tmp / "junk.onnx", b"not a model"), "cannot read"),
    "no train config": (lambda files, tmp: _no_train_config(files["fp32"], tmp / "bare.onnx"), "mdx.train_config"),
    "a weight renamed": (lambda files, tmp: _renamed_weight(files["fp32"], tmp / "renamed.onnx"), "no weight out.3.weight"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _no_train_config(src: Path, dst: Path) -> Path:
    import onnx

    model = onnx.load(str(src))
    keep = [p for p in model.metadata_props if p.key != "mdx.train_config"]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("case", list(BAD_ONNX_SOURCES))
def test_bad_onnx_sources_are_one_line_exit_2(case: str, tiny_onnx: dict[str, Path], data_npz: Path,
                                              tmp_path: Path) -> None:
    make, fragment = BAD_ONNX_SOURCES[case]
    out = tmp_path / "ft"
    assert_one_line_error(invoke(train_args(data_npz, out, init_from=make(tiny_onnx, tmp_path))), fragment)
    assert not out.exists()


def test_init_from_onnx_of_another_network_is_one_line_exit_2(tiny_onnx: dict[str, Path], data_npz: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "ft"
    args = train_args(data_npz, out, init_from=tiny_onnx["fp32"])
    args[args.index("--n-feat") + 1] = "16"
    assert_one_line_error(invoke(args), "different model")
    assert not out.exists()


def test_init_from_onnx_refuses_a_file_it_cannot_reproduce(tiny_onnx: dict[str, Path], data_npz: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity check is real: a recovery that misses (here: the GroupNorm affines swapped) is refused."""
    from mdx.train import from_onnx

    real = from_onnx._group_norm_affines
    monkeypatch.setattr(from_onnx, "_group_norm_affines",
                        lambda graph, tensors: [(b, w) for w, b in real(graph, tensors)])
    out = tmp_path / "ft"
    assert_one_line_error(invoke(train_args(data_npz, out, init_from=tiny_onnx["fp32"])), "differ from the file")
    assert not out.exists()
