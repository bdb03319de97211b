"""`mdx-export`: a training checkpoint -> one validated, self-describing ONNX file.

Exit codes: 0 written; 2 bad input (checkpoint, config, opset, output path, options: one
line `mdx-export: error: ...`); 1 the export or a conversion failed, or the model failed
validation (the numbers are printed); 130 interrupted. No output file is left behind
unless it validated.
"""

from __future__ import annotations

from pathlib import Path

import click

from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
from mdx.runtime.contract import PRECISIONS
from mdx.runtime.fileio import WriteError

from mdx.export.onnx_export import DEFAULT_OPSET, MIN_OPSET, ExportError, ExportFailure, export_checkpoint, max_opset
from mdx.export.validate import ValidationError


@click.command(cls=one_line_command("mdx-export", (ExportError, WriteError), interrupted="interrupted (no file written)",
                                    failures=(ExportFailure, ValidationError)),
               context_settings=CONTEXT_SETTINGS)
@click.argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", type=click.Path(path_type=Path))
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
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def main(checkpoint: Path, output: Path | None, opset: int, precision: str, weights: str, no_simplify: bool,
         recommended: str | None, calibration_data: str | None, int8_activations: str, quiet: bool) -> None:
    """Export a checkpoint to one self-contained ONNX file and validate it.

    RUN_DIR_OR_CHECKPOINT is a run folder, its checkpoint/ folder or a .safetensors file.
    The file is validated (onnx checker, shape inference, static graph, the model contract,
    ONNX Runtime parity with torch at batch 1, 7 and 64) before it is written.
    """
    export_checkpoint(checkpoint, output, opset=opset, precision=precision, weights=weights,
                      simplify=not no_simplify, recommended=recommended, calibration_data=calibration_data,
                      verbose=not quiet, int8_activations=int8_activations)

if __name__ == "__main__":
    main()
