"""`mdx-train`: train a class-conditional ContextUnet or UNet2DModel (also `python -m mdx.train`, torchrun-ready)."""

from __future__ import annotations

import click

from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
from mdx.runtime.contract import PREDICTION_TYPES
from mdx.runtime.fileio import WriteError
from mdx.runtime.schedules import SCHEDULES
from mdx.train.errors import TrainError

TRAIN_EXTRA_HINT = "mdx-train needs the training extra: pip install 'microdiffusion[train]'"
INTERRUPTED = "interrupted; the last checkpoint is intact (resume with --resume)"


def int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """'32,64,128' -> (32, 64, 128); 'none' or '' -> () (e.g. no attention); None stays None
    (the option was not given: TrainConfig's default holds, so it is written down once)."""
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


@click.command(cls=one_line_command("mdx-train", (TrainError, WriteError), interrupted=INTERRUPTED),
               context_settings=CONTEXT_SETTINGS)
@click.option("--data", default="emoji16", show_default=True,
              help="emoji16 (shipped), an .npz (images, labels, class_names), the course's sprites .npy, "
                   "or a folder with one sub-folder per class.")
@click.option("--labels", default=None, help="Labels .npy for a sprites .npy (default: found beside it).")
@click.option("--image-size", default=16, show_default=True, type=int, help="Training resolution (multiple of 4).")
@click.option("--schedule", default="linear", show_default=True,
              type=click.Choice(list(SCHEDULES)), help="Noise schedule.")
@click.option("--timesteps", default=500, show_default=True, type=int, help="Training timesteps T.")
@click.option("--beta-start", default=1e-4, show_default=True, type=float)
@click.option("--beta-end", default=0.02, show_default=True, type=float)
@click.option("--prediction-type", default="epsilon", show_default=True,
              type=click.Choice(list(PREDICTION_TYPES)), help="What the network predicts.")
@click.option("--epochs", default=30, show_default=True, type=int)
@click.option("--max-steps", default=None, type=int, help="Stop after this many optimiser steps (caps --epochs).")
@click.option("--batch-size", default=128, show_default=True, type=int, help="Per process.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak AdamW learning rate.")
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--warmup-steps", default=200, show_default=True, type=int)
@click.option("--grad-clip", default=1.0, show_default=True, type=float, help="Max gradient norm.")
@click.option("--cond-drop", default=0.1, show_default=True, type=float,
              help="Probability of dropping the class (classifier-free guidance training).")
@click.option("--ema-decay", default=0.999, show_default=True, type=float)
@click.option("--arch", default="contextunet", show_default=True, type=click.Choice(["contextunet", "unet2d"]),
              help="The network: the course's ContextUnet (width --n-feat) or diffusers' UNet2DModel (--unet-*).")
@click.option("--n-feat", default=64, show_default=True, type=int, help="contextunet: network width F.")
@click.option("--unet-channels", default=None, callback=int_list, metavar="C1,C2,...",
              help="unet2d: channels per resolution level (the last does not downsample) [default: 32,64,128].")
@click.option("--unet-layers", default=None, type=int, help="unet2d: ResNet layers per down block [default: 1].")
@click.option("--unet-attention", default=None, callback=int_list, metavar="LEVELS|none",
              help="unet2d: levels (0 = full resolution) whose blocks have self-attention [default: 1,2].")
@click.option("--unet-norm-groups", default=None, type=int, help="unet2d: GroupNorm groups [default: 8].")
@click.option("--unet-head-dim", default=None, type=int, help="unet2d: channels per attention head [default: 32].")
@click.option("--hflip/--no-hflip", default=True, show_default=True, help="Random horizontal flips.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", is_flag=True, help="Mixed precision (float16 on CUDA, bfloat16 on CPU).")
@click.option("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice).")
@click.option("--out", default="runs/emoji16", show_default=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--checkpoint-every", default=500, show_default=True, type=int, help="Steps between checkpoints.")
@click.option("--sample-every", default=5, show_default=True, type=int,
              help="Epochs between EMA sample grids (0 = only at the end).")
@click.option("--class-balance", default=0.0, show_default=True, type=float,
              help="Show rare classes more often: an image is drawn with weight (1 / its class's count) ** P; "
                   "0 keeps the data's mix, 1 shows every class equally often.")
@click.option("--init-from", default=None,
              help="Fine-tune: start the network and its EMA from this run folder, checkpoint folder or "
                   "weights file, or from an fp32 ContextUnet .onnx exported by mdx-export (its weights are "
                   "recovered and checked against the file), with a fresh optimiser and LR schedule. Same "
                   "network, schedule and classes.")
@click.option("--min-snr-gamma", default=0.0, show_default=True, type=float,
              help="Min-SNR-gamma loss weighting: each timestep's loss is weighted by min(SNR, gamma) / SNR "
                   "(epsilon) or / (SNR + 1) (v); 0 = plain MSE, 5 is the paper's choice.")
@click.option("--min-lr-ratio", default=0.1, show_default=True, type=float,
              help="The cosine schedule decays the LR to this fraction of --lr at the last step.")
@click.option("--telemetry", is_flag=True, help="Record GPU (NVML) or CPU/RSS figures to telemetry.csv/.png.")
def main(**opts) -> None:
    """Train a class-conditional diffusion model (the course's ContextUnet or diffusers' UNet2DModel).

    Writes config.json, checkpoint/ (safetensors), metrics.jsonl and samples/ in --out.
    Several processes: torchrun --nproc_per_node=N -m mdx.train [OPTIONS].
    """
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        raise TrainError(TRAIN_EXTRA_HINT) from None
    from mdx.train.trainer import TrainConfig, train

    resume = opts.pop("resume")
    opts = {k: v for k, v in opts.items() if v is not None or not k.startswith("unet_")}
    train(TrainConfig(**opts), resume=resume, log=lambda m: click.echo(m, err=True))


if __name__ == "__main__":
    main()
