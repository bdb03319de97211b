"""The unet2d architecture (diffusers' UNet2DModel behind the contract): the wrapper against
diffusers, its config, and a tiny mdx-train --arch unet2d run through resume, DDP, bf16 autocast,
mdx-export and the runtime.

The network is tiny (one 8-channel level with attention, one layer per block: the exporter
traces diffusers' Python for ~10 s even so) and runs are a few steps long: the cores are shared.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from mdx.train import checkpoint as ckpt
from mdx.train.unet2d import (ContextUNet2D, UNet2DConfig, build_network, config_from_dict)

from test_train import (N_CLASSES, SIZE, assert_same_tensors, invoke, subprocess_env, train_args,  # noqa: F401
                        write_npz)

TINY_UNET = {"--arch": "unet2d", "--unet-channels": "8", "--unet-layers": 1, "--unet-attention": "0",
             "--unet-norm-groups": 4, "--unet-head-dim": 8}
TINY_CONFIG = UNet2DConfig(in_channels=3, n_classes=N_CLASSES, image_size=SIZE, num_train_timesteps=50,
                           block_out_channels=(8,), layers_per_block=1, attention_levels=(0,), norm_num_groups=4,
                           attention_head_dim=8)


def unet_args(data: Path, out: Path, **extra) -> list[str]:
    return train_args(data, out, **{k.lstrip("-").replace("-", "_"): v for k, v in TINY_UNET.items()}, **extra)


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory, data_npz) -> Path:
    out = tmp_path_factory.mktemp("runs") / "unet2d"
    result = invoke(unet_args(data_npz, out, max_steps=4, checkpoint_every=4, class_balance=0.5))
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    return out


# --- the wrapper ------------------------------------------------------------------------------


def test_context_is_diffusers_class_embedding():
    """One-hot context = diffusers' class_labels lookup; zeros = no class term; the state dict is
    a diffusers UNet2DModel's (prefixed `unet.`), so it loads into diffusers unchanged."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = build_network("unet2d", TINY_CONFIG).eval()
    plain = UNet2DModel(**TINY_CONFIG.diffusers_config()).eval()
    plain.load_state_dict({k.removeprefix("unet."): v for k, v in net.state_dict().items()}, strict=True)
    x, t = torch.randn(3, 3, SIZE, SIZE), torch.tensor([0.0, 17.0, 49.0])
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        ours = net(x, t, torch.eye(N_CLASSES)[labels])
        theirs = plain(x, t, class_labels=labels).sample
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        mixed = net(x, t, torch.tensor([[1.0, 1.0, 0.0]] * 3))
        table = plain.class_embedding.weight
        plain.class_embedding = torch.nn.Identity()
        # A multi-hot row adds the rows of the table; all zeros adds nothing.
        torch.testing.assert_close(mixed, plain(x, t, class_labels=(table[0] + table[1]).expand(3, -1)).sample,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(net(x, t, torch.zeros(3, N_CLASSES)),
                                   plain(x, t, class_labels=torch.zeros(3, table.shape[1])).sample, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, mixed, atol=1e-3)  # the classes matter


@pytest.mark.parametrize(("change", "fragment"), [
    ({"block_out_channels": (10,)}, "divisible by norm_num_groups"),
    ({"attention_levels": (1,)}, "attention_levels"),
    ({"block_out_channels": (8,) * 6}, "divisible by 2**(levels - 1)"),
    ({"layers_per_block": 0}, "layers_per_block"),
    ({"block_out_channels": ()}, "at least one width"),
])
def test_bad_unet_config(change, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        UNet2DConfig(**{**TINY_CONFIG.to_dict(), **change})


def test_config_round_trip_and_registry():
    assert config_from_dict("unet2d", json.loads(json.dumps(TINY_CONFIG.to_dict()))) == TINY_CONFIG
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        build_network("resnet", TINY_CONFIG)
    with pytest.raises(ValueError, match="takes a ModelConfig"):
        build_network("contextunet", TINY_CONFIG)


# --- training ---------------------------------------------------------------------------------


def test_unet2d_run_records_its_architecture(unet_run):
    config = json.loads((unet_run / "config.json").read_text())
    assert config["architecture"] == "unet2d"
    assert config_from_dict("unet2d", config["model"]) == TINY_CONFIG
    loaded = ckpt.load_checkpoint(unet_run)
    assert isinstance(loaded.model, ContextUNet2D) and loaded.step == 4 and not loaded.model.training
    state = ckpt.read_safetensors_config(unet_run / "checkpoint" / "ema.safetensors")
    assert state["architecture"] == "unet2d"


def test_unet2d_resume_is_bit_identical(tmp_path, data_npz):
    """4 steps, then --resume to 8, equals 8 steps in one go (weights, EMA and AdamW moments).

    With 3 warm-up steps the learning rate of steps 0..3 does not depend on the total (the
    cosine starts at step 3), so a 4-step run is the first half of the 8-step one."""
    whole, half = tmp_path / "whole", tmp_path / "half"
    assert invoke(unet_args(data_npz, whole, max_steps=8, checkpoint_every=4)).exit_code == 0
    assert invoke(unet_args(data_npz, half, max_steps=4, checkpoint_every=4)).exit_code == 0
    result = invoke(unet_args(data_npz, half, max_steps=8, checkpoint_every=4, resume=True))
    assert result.exit_code == 0, result.stderr
    assert f"resuming {half} at step 4" in result.stderr
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert_same_tensors(whole / "checkpoint" / name, half / "checkpoint" / name)


def test_unet2d_ddp_with_bf16_autocast(tmp_path, data_npz):
    """Two torchrun processes (gloo) with bf16 autocast train a unet2d: one run, finite loss."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mdx.train",
           *unet_args(data_npz, out, max_steps=2, checkpoint_every=2, amp=True)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2" in proc.stderr
    assert ckpt.load_checkpoint(out).step == 2
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    assert np.isfinite(progress["loss"]) and progress["loss"] > 0


def test_cli_help_states_the_config_defaults():
    """The --unet-* defaults live in UNet2DConfig; the help text (written without torch) must agree."""
    from mdx.train.cli import main

    text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    d = UNet2DConfig()
    for option, value in (("--unet-channels", ",".join(map(str, d.block_out_channels))),
                          ("--unet-layers", d.layers_per_block),
                          ("--unet-attention", ",".join(map(str, d.attention_levels))),
                          ("--unet-norm-groups", d.norm_num_groups), ("--unet-head-dim", d.attention_head_dim)):
        assert f"[default: {value}]" in text.split(option, 2)[-1].split("--", 1)[0], option


def test_resume_with_another_architecture_is_refused(unet_run, data_npz):
    result = invoke(train_args(data_npz, unet_run, resume=True))  # the default contextunet
    assert result.exit_code == 2 and "different architecture" in result.stderr, result.stderr


@pytest.mark.parametrize(("options", "fragment"), [
    ({"--unet-channels": "8,x"}, "--unet-channels"),
    ({"--unet-channels": "8,10"}, "norm_num_groups"),
    ({"--unet-attention": "1"}, "attention_levels"),
    ({"--arch": "resnet"}, "resnet"),
])
def test_bad_unet_options_are_one_line_exit_2(options, fragment, tmp_path, data_npz):
    args = unet_args(data_npz, tmp_path / "run")
    for key, value in options.items():
        args[args.index(key) + 1] = value
    result = invoke(args)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdx-train: error: ") and fragment in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


# --- export and the runtime -------------------------------------------------------------------


def test_unet2d_export_and_runtime_parity(unet_run, tmp_path):
    """mdx-export RUN rebuilds the unet2d from the checkpoint; the runtime's DDIM samples equal the
    torch reference sampler's on the EMA weights."""
    from mdx.export.cli import main as export_main
    from mdx.runtime.pipeline import generate
    from mdx.runtime.session import OnnxDenoiser
    from mdx.train.reference import sample_reference

    path = tmp_path / "unet2d.onnx"
    result = CliRunner().invoke(export_main, [str(unet_run), "-o", str(path), "-q"], prog_name="mdx-export")
    assert result.exit_code == 0, result.output
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    train_config = json.loads(meta["mdx.train_config"])
    assert train_config["architecture"] == "unet2d" and train_config["model"] == TINY_CONFIG.to_dict()
    loaded = ckpt.load_checkpoint(unet_run)
    context = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0, 0, 0]], dtype=np.float32)
    ref = sample_reference(loaded.model, loaded.schedule, sampler="ddim", steps=5, context=context, seed=3,
                           guidance=2.0)
    denoiser = OnnxDenoiser.load(path, provider="CPUExecutionProvider", threads=1)
    ours = generate(denoiser, sampler="ddim", steps=5, context=context, seed=3, guidance=2.0).samples
    assert np.abs(ref).max() > 0.1 and np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()
