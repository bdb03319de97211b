"""`mdx-export`: a training checkpoint or a diffusers model folder -> one validated, self-describing ONNX file.

Exit codes: 0 written; 2 bad input (checkpoint, config, opset, output path, options: one
line `mdx-export: error: ...`); 1 the export or a conversion failed, or the model failed
validation (the numbers are printed); 130 interrupted. No output file is left behind
unless it validated.
"""

from __future__ import annotations

from pathlib import Path

import click

from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
from mdx.runtime.contract import PRECISIONS, PREDICTION_TYPES
from mdx.runtime.fileio import WriteError
from mdx.runtime.schedules import SCHEDULES

from mdx.export.diffusers_import import ScheduleOptions
from mdx.export.onnx_export import DEFAULT_OPSET, MIN_OPSET, ExportError, ExportFailure, export_checkpoint, max_opset
from mdx.export.validate import ValidationError


@click.command(cls=one_line_command("mdx-export", (ExportError, WriteError), interrupted="interrupted (no file written)",
                                    failures=(ExportFailure, ValidationError)),
               context_settings=CONTEXT_SETTINGS)
@click.argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT_OR_DIFFUSERS_DIR", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="FILE.onnx",
              help="Output file [default: models/<run-folder-name>[-fp16|-int8].onnx].")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help=f"ONNX opset ({MIN_OPSET}..{max_opset()} with the installed exporter).")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
              help="fp32; fp16 for the CUDA provider (float32 inputs/outputs); int8 QDQ for the CPU.")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True,
              help="Which weights of a run or checkpoint folder.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--recommended", default=None, metavar="JSON",
              help='Sampling defaults for mdx-sample: {"sampler": ddpm|ddim|dpmpp, "steps": N, "guidance": G}.')
@click.option("--calibration-data", default=None, metavar="SPEC",
              help="int8 calibration images (a data spec as for mdx-train --data) [default: the run's data].")
@click.option("--int8-activations", type=click.Choice(["u8", "s8"]), default="u8", show_default=True,
              help="int8 activation type: u8 runs as QLinearConv on x86 CPUs; s8 mostly does not.")
@click.option("--int8-scope", type=click.Choice(["context-free", "all"]), default="context-free", show_default=True,
              help="Which convolutions int8 quantizes: context-free = only those upstream of the class context "
                   "(their errors cancel in classifier-free guidance; FD as fp32), all = every one but the "
                   "x_t-reading and the last (faster, FD 14% worse on emoji16).")
@click.option("--schedule", type=click.Choice(list(SCHEDULES)), default=None,
              help="Bare diffusers UNet2DModel folder: the beta schedule [linear].")
@click.option("--timesteps", type=int, default=None, help="Bare diffusers UNet2DModel folder: training timesteps T [1000].")
@click.option("--beta-start", type=float, default=None, help="Bare diffusers UNet2DModel folder: first beta [1e-4].")
@click.option("--beta-end", type=float, default=None, help="Bare diffusers UNet2DModel folder: last beta [0.02].")
@click.option("--prediction-type", type=click.Choice(list(PREDICTION_TYPES)), default=None,
              help="Bare diffusers UNet2DModel folder: what the network predicts [epsilon].")
@click.option("--classes", "class_list", default=None, metavar="NAME,NAME,...",
              help="Diffusers folder: names of the num_class_embeds classes [default: 0, 1, ...].")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def main(checkpoint: Path, output: Path | None, opset: int, precision: str, weights: str, no_simplify: bool,
         recommended: str | None, calibration_data: str | None, int8_activations: str, int8_scope: str,
         schedule: str | None,
         timesteps: int | None, beta_start: float | None, beta_end: float | None, prediction_type: str | None,
         class_list: str | None, quiet: bool) -> None:
    """Export a checkpoint or a diffusers model to one self-contained ONNX file and validate it.

    RUN_DIR_OR_CHECKPOINT_OR_DIFFUSERS_DIR is a run folder, its checkpoint/ folder, a .safetensors
    file, a diffusers pipeline folder (model_index.json, unet/, scheduler/: the schedule, prediction
    type and sampler settings come from the scheduler config) or a bare diffusers UNet2DModel folder
    (config.json + safetensors weights; the schedule from --schedule, --timesteps, --beta-start,
    --beta-end, --prediction-type, else DDPMScheduler's defaults).
    The file is validated (onnx checker, shape inference, static graph, the model contract,
    ONNX Runtime parity with torch at batch 1, 7 and 64) before it is written.
    """
    options = ScheduleOptions(schedule, timesteps, beta_start, beta_end, prediction_type)
    names = [n.strip() for n in class_list.split(",")] if class_list is not None else None
    export_checkpoint(checkpoint, output, opset=opset, precision=precision, weights=weights,
                      simplify=not no_simplify, recommended=recommended, calibration_data=calibration_data,
                      verbose=not quiet, int8_activations=int8_activations, int8_scope=int8_scope,
                      schedule_options=options,
                      class_names=names)

if __name__ == "__main__":
    main()
