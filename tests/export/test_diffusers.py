"""`mdx-export DIR` of a diffusers folder: the exported file sampled by mdx's runtime equals
diffusers' own loop, and every folder mdx cannot export is refused in one line.

The UNet2DModels are tiny (one 8-channel level, attention in the middle block, T = 50: the
exporter traces diffusers' Python for ~10 s per model even so), built and saved inside the test
with save_pretrained (nothing is downloaded). Two exports are made
once per module: a class-conditional model in a DDPMPipeline folder and an unconditional one
in a DDIMPipeline folder. Noise follows docs/contract.md's random-number convention: one
numpy Generator draws x_T and then, in loop order, every noise tensor diffusers' scheduler
asks for (its `randn_tensor` is patched to draw from that stream).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner, Result

from mdx.export.cli import main as export_main
from mdx.export.diffusers_import import UNCONDITIONAL_CLASS, DiffusersImportError, ScheduleOptions, load_diffusers
from mdx.runtime.pipeline import build_context, generate
from mdx.runtime.session import OnnxDenoiser

T, SIZE, K = 50, 16, 3
# mdx's samplers work in float64 from float64 betas, diffusers' in float32: over 50 DDPM steps
# that alone moves samples by ~1e-4 (tests/train/test_train.py); ONNX Runtime vs torch adds ~1e-6.
PARITY_ATOL = 1e-3


def tiny_unet(conditional: bool, seed: int):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(8,),
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1,
                       norm_num_groups=4,
                       attention_head_dim=8, num_class_embeds=K if conditional else None).eval()


def export(folder: Path, out: Path, *options: str) -> Result:
    return CliRunner().invoke(export_main, [str(folder), "-o", str(out), "-q", *options], prog_name="mdx-export")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("diffusers")


@pytest.fixture(scope="module")
def conditional(work):
    """A class-conditional UNet2DModel in a DDPMPipeline folder, and its export."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = tiny_unet(True, seed=1)
    folder = work / "ddpm-cond"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(folder)
    result = export(folder, work / "cond.onnx")
    assert result.exit_code == 0, result.output
    return unet, folder, work / "cond.onnx"


@pytest.fixture(scope="module")
def unconditional(work):
    """An unconditional UNet2DModel in a DDIMPipeline folder (cosine schedule, v-prediction)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    unet = tiny_unet(False, seed=2)
    folder = work / "ddim-uncond"
    scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    result = export(folder, work / "uncond.onnx")
    assert result.exit_code == 0, result.output
    return unet, folder, work / "uncond.onnx"


def patch_noise(monkeypatch, rng: np.random.Generator) -> list[int]:
    """diffusers' randn_tensor, in the pipelines and schedulers, draws from `rng` (returns a draw counter)."""
    import diffusers.pipelines.ddim.pipeline_ddim as ddim_pipe
    import diffusers.pipelines.ddpm.pipeline_ddpm as ddpm_pipe
    import diffusers.schedulers.scheduling_ddim as ddim_mod
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    draws = [0]

    def numpy_randn(shape, *args, **kwargs) -> torch.Tensor:
        draws[0] += 1
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))

    for mod in (ddim_pipe, ddpm_pipe, ddim_mod, ddpm_mod):
        monkeypatch.setattr(mod, "randn_tensor", numpy_randn)
    return draws


@torch.no_grad()
def diffusers_class_loop(unet, scheduler, steps: int, labels: list[int], seed: int, monkeypatch) -> np.ndarray:
    """diffusers' sampling loop with class_labels (no pipeline takes them for a UNet2DModel)."""
    rng = np.random.default_rng(seed)
    patch_noise(monkeypatch, rng)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(rng.standard_normal((len(labels), 3, SIZE, SIZE), dtype=np.float32))
    for t in scheduler.timesteps:
        out = unet(x, t, class_labels=torch.tensor(labels)).sample
        x = scheduler.step(out, t, x).prev_sample
    return x.clamp(-1, 1).numpy()


def mdx_samples(path: Path, sampler: str, steps: int, context: np.ndarray, seed: int, **kw) -> np.ndarray:
    denoiser = OnnxDenoiser.load(path, provider="CPUExecutionProvider", threads=1)
    return generate(denoiser, sampler=sampler, steps=steps, context=context, seed=seed, **kw).samples


# --- parity with diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_conditional_matches_diffusers(conditional, sampler, monkeypatch):
    from diffusers import DDIMScheduler, DDPMScheduler

    unet, folder, path = conditional
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    scheduler = cls.from_pretrained(folder / "scheduler")  # DDIM built on the pipeline's schedule
    labels = [0, 1, 2, 1]
    theirs = diffusers_class_loop(unet, scheduler, 10, labels, seed=5, monkeypatch=monkeypatch)
    context = np.eye(K, dtype=np.float32)[labels]  # one-hot = diffusers' class_labels lookup
    ours = mdx_samples(path, sampler, 10, context, seed=5)
    assert np.abs(theirs).max() > 0.1 and np.abs(ours - theirs).max() <= PARITY_ATOL, np.abs(ours - theirs).max()
    # The classes matter (the class table is really in the graph).
    other = mdx_samples(path, sampler, 10, np.eye(K, dtype=np.float32)[[1, 2, 0, 0]], seed=5)
    assert np.abs(other - ours).max() > 1e-2


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_unconditional_matches_the_diffusers_pipeline(unconditional, sampler, monkeypatch):
    """The pipeline's own __call__: DDIMPipeline on its scheduler, DDPMPipeline on the same config."""
    from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler

    unet, folder, path = unconditional
    rng = np.random.default_rng(9)
    draws = patch_noise(monkeypatch, rng)
    if sampler == "ddim":
        pipe = DDIMPipeline.from_pretrained(folder)
        image = pipe(batch_size=3, num_inference_steps=10, eta=0.0, output_type="np").images
        assert draws[0] == 1  # x_T only: DDIM with eta 0 draws nothing more
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"))
        image = pipe(batch_size=3, num_inference_steps=10, output_type="np").images
        assert draws[0] == 1 + 9  # x_T, then every step with t > 0
    theirs = image.transpose(0, 3, 1, 2) * 2 - 1  # (n, C, H, W) in [-1, 1]
    # The scheduler config's clip_sample=False holds for DDPM too: on diffusers' side through
    # from_pretrained, on mdx's through the model's recommended sampler options.
    ours = mdx_samples(path, sampler, 10, np.zeros((3, 1), np.float32), seed=9)
    assert np.abs(ours - theirs).max() <= PARITY_ATOL, np.abs(ours - theirs).max()
    # The pseudo-class is ignored: one-hot and any guidance scale give the same images.
    one_hot = mdx_samples(path, sampler, 10, np.ones((3, 1), np.float32), seed=9, guidance=3.0)
    np.testing.assert_allclose(one_hot, ours, atol=1e-5)


# --- what the exported files say ----------------------------------------------------------------


def test_exported_metadata(conditional, unconditional):
    meta = {}
    for name, (_, _, path) in (("cond", conditional), ("uncond", unconditional)):
        meta[name] = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["cond"]["mdx.classes"]) == ["0", "1", "2"]
    assert json.loads(meta["uncond"]["mdx.classes"]) == [UNCONDITIONAL_CLASS]
    assert json.loads(meta["cond"]["mdx.schedule"]) == {"kind": "linear", "num_train_timesteps": T,
                                                        "beta_start": 1e-4, "beta_end": 0.02}
    assert json.loads(meta["uncond"]["mdx.schedule"])["kind"] == "cosine"
    assert (meta["cond"]["mdx.prediction_type"], meta["uncond"]["mdx.prediction_type"]) == ("epsilon", "v_prediction")
    rec = json.loads(meta["uncond"]["mdx.recommended"])
    assert (rec["sampler"], rec["steps"], rec["guidance"]) == ("ddim", 50, 1.0)
    assert rec["sampler_options"]["ddim"]["clip_sample"] is False
    assert json.loads(meta["cond"]["mdx.recommended"])["sampler"] == "ddpm"
    for m in meta.values():
        config = json.loads(m["mdx.train_config"])
        assert config["source"] == "diffusers" and config["diffusers_config"]["_class_name"] == "UNet2DModel"


def test_mdx_sample_unconditional_on_the_export(unconditional, tmp_path):
    from mdx.runtime.cli import main as sample_main

    _, _, path = unconditional
    out = tmp_path / "uncond.npz"
    result = CliRunner().invoke(sample_main, ["--model", str(path), "--unconditional", "-n", "2", "--steps", "4",
                                              "--out", str(out)], prog_name="mdx-sample")
    assert result.exit_code == 0, result.output
    with np.load(out) as f:
        assert f["images"].shape == (2, SIZE, SIZE, 3) and list(f["labels"]) == [-1, -1]


def test_bare_unet_folder_takes_the_schedule_from_options(conditional, tmp_path):
    """A bare UNet2DModel folder: the schedule from the options, class names from --classes."""
    _, folder, _ = conditional
    model = load_diffusers(folder / "unet")  # DDPMScheduler's defaults
    assert model.schedule.to_dict()["num_train_timesteps"] == 1000 and model.recommended is None
    options = ScheduleOptions(kind="quadratic", timesteps=T, prediction_type="v_prediction")
    model = load_diffusers(folder / "unet", options, class_names=["a", "b", "c"])
    assert (model.schedule.kind, model.schedule.num_train_timesteps, model.prediction_type) == ("quadratic", T,
                                                                                                "v_prediction")
    assert model.class_names == ["a", "b", "c"]
    with pytest.raises(DiffusersImportError, match="3 distinct class names"):
        load_diffusers(folder / "unet", class_names=["a", "b"])


def test_trained_betas_equal_to_a_schedule_are_accepted(conditional, tmp_path):
    from mdx.runtime.schedules import Schedule

    _, folder, _ = conditional
    copy = copy_folder(folder, tmp_path / "betas")
    edit_json(copy / "scheduler" / "scheduler_config.json",
              trained_betas=Schedule("sigmoid", T).betas.astype(np.float32).tolist())
    assert load_diffusers(copy).schedule.kind == "sigmoid"


# --- bad folders: one line, exit 2, nothing written ----------------------------------------------


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _neither(folder: Path) -> Path:
    empty = folder.parent / "plain"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model")
    return empty


def _other_class(folder: Path) -> Path:
    edit_json(folder / "unet" / "config.json", _class_name="UNet2DConditionModel")
    return folder / "unet"


def _other_class_in_index(folder: Path) -> Path:
    edit_json(folder / "model_index.json", unet=["diffusers", "UNet2DConditionModel"])
    return folder


def _latent_pipeline(folder: Path) -> Path:
    edit_json(folder / "model_index.json", vqvae=["diffusers", "VQModel"])
    return folder


def _scheduler(**changes):
    def make(folder: Path) -> Path:
        edit_json(folder / "scheduler" / "scheduler_config.json", **changes)
        return folder
    return make


def _mismatch(folder: Path) -> Path:
    edit_json(folder / "unet" / "config.json", block_out_channels=[16])
    return folder


def _bin_only(folder: Path) -> Path:
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle would be here")
    return folder


def _learned_variance(folder: Path) -> Path:
    edit_json(folder / "unet" / "config.json", out_channels=6)
    return folder


BAD_FOLDERS = {
    "neither mdx run nor diffusers": (_neither, "not a diffusers model folder either"),
    "other model class": (_other_class, "UNet2DConditionModel"),
    "other model class in the pipeline": (_other_class_in_index, "UNet2DConditionModel"),
    "latent pipeline": (_latent_pipeline, "vqvae"),
    "unsupported scheduler": (_scheduler(_class_name="EulerDiscreteScheduler"), "EulerDiscreteScheduler"),
    "unknown beta schedule": (_scheduler(beta_schedule="exp"), "'exp'"),
    "custom trained betas": (_scheduler(trained_betas=list(np.linspace(1e-3, 0.05, T))), "trained_betas"),
    "sample prediction": (_scheduler(prediction_type="sample"), "'sample'"),
    "config does not match the weights": (_mismatch, "does not match the weights"),
    ".bin weights only": (_bin_only, "safetensors only"),
    "learned variance": (_learned_variance, "out_channels 6"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_is_one_line_exit_2(case, conditional, tmp_path):
    make, fragment = BAD_FOLDERS[case]
    _, folder, _ = conditional
    target = make(copy_folder(folder, tmp_path / "model"))
    out_dir = tmp_path / "out"
    result = export(target, out_dir / "m.onnx")
    assert_one_line(result, fragment)
    assert not out_dir.exists()  # nothing written, not even the folder


@pytest.mark.parametrize(("where", "options", "fragment"), [
    ("", ["--schedule", "cosine"], "bare UNet folder only"),
    ("unet", ["--classes", "a,b"], "give 3 distinct class names"),
    ("unet", ["--timesteps", "1"], "timesteps must be an integer >= 2"),
    ("unet", ["--beta-start", "0.5", "--beta-end", "0.1"], "beta_start"),
])
def test_bad_options_for_a_diffusers_folder(conditional, tmp_path, where, options, fragment):
    _, folder, _ = conditional
    result = export(folder / where if where else folder, tmp_path / "m.onnx", *options)
    assert_one_line(result, fragment)
    assert not (tmp_path / "m.onnx").exists()


def test_diffusers_options_on_an_mdx_run_are_refused(tmp_path):
    run = tmp_path / "run" / "checkpoint"
    run.mkdir(parents=True)
    result = export(tmp_path / "run", tmp_path / "m.onnx", "--timesteps", "50")
    assert_one_line(result, "apply to a diffusers model folder only")


def assert_one_line(result: Result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdx-export: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_int8_export_of_a_unet2d(conditional, tmp_path):
    """int8 of a class-conditional UNet2DModel: the class embedding joins the time embedding, so
    few convolutions are upstream of it; x_t's and the last convolution stay float32, and the
    file samples close to fp32."""
    import onnx

    from mdx.export.quantize import context_dependent_nodes

    _, folder, fp32 = conditional
    out = tmp_path / "int8.onnx"
    result = export(folder, out, "--precision", "int8", "--calibration-data", "emoji16")
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    quantized = [n for n in convs if produced_by.get(n.input[1]) == "DequantizeLinear"]
    tainted = context_dependent_nodes(model.graph)
    assert quantized and all(n.name not in tainted for n in quantized)
    assert convs[-1] not in quantized and all(n not in quantized for n in convs if "sample" in n.input)
    assert len(quantized) < len(convs) - 2  # the class context reaches most of the network
    context = np.eye(K, dtype=np.float32)[[0, 1]]
    a = mdx_samples(fp32, "ddim", 5, context, seed=0)
    b = mdx_samples(out, "ddim", 5, context, seed=0)
    assert np.sqrt(np.mean((a - b) ** 2)) < 0.1


def test_int8_scope_of_an_unconditional_unet2d(unconditional):
    """A network that ignores `context`: everything is context-free, so the context-free scope
    is every convolution but x_t's and the last, the same as scope "all"."""
    import onnx

    from mdx.export.quantize import context_dependent_nodes, int8_convs

    model = onnx.load(str(unconditional[2]))
    convs = [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert not context_dependent_nodes(model.graph) & set(convs)
    quantized, kept = int8_convs(model, "context-free")
    assert kept[-1] == convs[-1] and quantized and len(quantized) + len(kept) == len(convs)
    assert (quantized, kept) == int8_convs(model, "all")
