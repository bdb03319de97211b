"""mdx-sample: sample images from an exported model with ONNX Runtime and numpy.

    mdx-sample                                     # the shipped model, one grid of every class
    mdx-sample --class food --guidance 3 -n 16 --out food.png
    mdx-sample --sampler ddpm --steps 500 --gif denoise.gif
    mdx-sample --model emoji16-int8 -n 64          # a shipped model by name (or a path to any .onnx)
    mdx-sample --model foreign.onnx --timesteps 1000 --classes 10 --out samples.npz

A thin layer over the Python API (`mdx.runtime.Pipeline`): the same settings give the same
images from the command line and from Python.

Errors a user can cause (bad options, a missing or unusable model, an unwritable output)
end in one line `mdx-sample: error: ...` and exit code 2, with nothing written.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import click

from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command

from mdx.runtime import shipped
from mdx.runtime.api import Output, Pipeline, Request
from mdx.runtime.contract import PREDICTION_TYPES
from mdx.runtime.images import OutputError, WriteError, check_writable, output_kind
from mdx.runtime.providers import COMPUTE_PRECISIONS
from mdx.runtime.pipeline import PipelineError
from mdx.runtime.samplers import SAMPLERS, SamplerError
from mdx.runtime.schedules import SCHEDULES, ScheduleError
from mdx.runtime.session import ModelError

PROG = "mdx-sample"
MAX_DEFAULT_N = 64  # as mdx.runtime.api: 2 images per class, at most this many
USER_ERRORS = (ModelError, PipelineError, OutputError, WriteError, SamplerError, ScheduleError)


class UsageError(ValueError):
    """A bad command-line value."""


# --- small parts ----------------------------------------------------------------------


def default_model_candidates() -> list[tuple[str, Path]]:
    """Where the default model is looked for, in order: $MDX_MODEL, ./models, the shipped emoji16."""
    return shipped.default_model_candidates()


def find_model(model: str | None) -> Path:
    """The model file for --model: a path, a shipped model's name, or (None) the default."""
    return shipped.resolve_model(model)


def parse_classes_option(text: str | None):
    """--classes: a count ("10") or comma-separated names ("cat,dog")."""
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise UsageError(f"--classes {text}: need at least one class")
        return count
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise UsageError(f"--classes {text!r}: give comma-separated names without empty entries, or a count")
    return names


class Progress:
    """A one-line progress bar on a terminal (stderr); silent when stderr is not a terminal."""

    def __init__(self, label: str, stream=None, enabled: bool | None = None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label, self.width = label, width
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        filled = self.width * done // total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {elapsed:5.1f} s")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def summary_line(n: int, total_seconds: float, model_seconds: float, provider: str) -> str:
    rate = n / total_seconds if total_seconds > 0 else float("inf")
    share = model_seconds / total_seconds if total_seconds > 0 else 1.0
    return (f"{n} images in {total_seconds:.2f} s ({rate:.1f} img/s), "
            f"{share:.0%} in the model, provider {provider}")


def _info(message: str) -> None:
    click.echo(f"{PROG}: {message}", err=True)


# --- the parts of a run -----------------------------------------------------------------


def check_options(*, n, steps, guidance, seed, scale, threads, classes, unconditional, out, gif, telemetry) -> str:
    """Everything that can be checked before the model is loaded; returns the output kind."""
    if n is not None and n < 1:
        raise UsageError(f"-n {n}: the number of images must be at least 1")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: need at least 1 step")
    if guidance is not None and not guidance >= 0:
        raise UsageError(f"--guidance {guidance}: the guidance scale must be >= 0")
    if seed < 0:
        raise UsageError(f"--seed {seed}: the seed must be >= 0")
    if scale < 1:
        raise UsageError(f"--scale {scale}: the scale must be at least 1")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: need at least 1 thread")
    if classes and unconditional:
        raise UsageError("--class and --unconditional exclude each other")
    kind = output_kind(out)
    check_writable(out, kind)
    if gif is not None:
        if Path(gif).suffix.lower() != ".gif":
            raise UsageError(f"--gif {gif}: the animation file must end in .gif")
        check_writable(gif, "gif")
    if telemetry is not None:
        check_writable(telemetry, "csv")
    return kind


def sample_with_telemetry(pipe: Pipeline, request: Request, telemetry: str | None, **run_args) -> Output:
    """`pipe.run(request)`, with NVML telemetry recorded around it into `telemetry` (a CSV) when asked."""
    recorder = None
    if telemetry is not None:
        from mdx.runtime.telemetry import start_telemetry

        recorder, why_not = start_telemetry(telemetry)
        if recorder is None:
            _info(f"{why_not}; {telemetry} not written")
    try:
        output = pipe.run(request, **run_args)
    finally:
        if recorder is not None:
            recorder.stop()  # writes the CSV atomically (WriteError if it cannot)
    if recorder is not None:
        _info(f"telemetry: {recorder.summary()}; wrote {telemetry}")
    return output


def write_outputs(output: Output, *, kind: str, out: str, gif: str | None, scale: int) -> None:
    """The samples to `out` (a grid, an npz or a folder) and the animation to `gif`, each atomically.

    When a later write fails, the outputs this run created are removed again, so a failed run
    leaves no new files behind (WriteError names the path that failed and why).
    """
    n = len(output.labels)
    created = [Path(p) for p in (out, gif) if p is not None and not Path(p).exists()]
    try:
        output.save(out, scale=scale)
        if kind == "png":
            _info(f"wrote {out} ({n} images, {output.columns} per row, scale {scale})")
        elif kind == "npz":
            _info(f"wrote {out} (images, labels, samples for {n} images)")
        else:
            _info(f"wrote {n} PNGs to {out}")
        if gif is not None:
            output.save_gif(gif, scale=scale)
            _info(f"wrote {gif} ({len(output.x0_frames)} steps)")
    except BaseException:
        for path in created:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        raise


# --- the command ----------------------------------------------------------------------


@click.command(cls=one_line_command(PROG, (UsageError, *USER_ERRORS)), context_settings=CONTEXT_SETTINGS)
@click.option("--model", metavar="FILE|NAME", default=None,
              help="An mdx ONNX file, or a shipped model's name (emoji16, emoji16-int8, emoji16-fp16); default: "
                   "$MDX_MODEL, ./models/emoji16.onnx, then the shipped emoji16.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="Sampler (default: the model's recommendation, else ddim).")
@click.option("--steps", type=int, default=None, help="Sampling steps, 1..T (default: the model's recommendation, else 25).")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM noise scale in [0, 1] (ddim only).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale s >= 0; 1 is the conditional model alone (default: the model's "
                   "recommendation, else 1).")
@click.option("--class", "classes", multiple=True, metavar="NAME|INDEX",
              help="Condition on this class; repeat to mix classes (multi-hot). Default: cycle through all classes.")
@click.option("--unconditional", is_flag=True, help="Sample without a class (all-zero context).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (x_T and the sampler's noise).")
@click.option("-n", "--num-images", "n", type=int, default=None,
              help=f"Number of images (default: 2 per class, at most {MAX_DEFAULT_N}).")
@click.option("--provider", default="auto", show_default=True,
              help="auto (CUDA when it really works, then OpenVINO where it is the faster CPU path, else CPU), "
                   "cpu, cuda, openvino, or an onnxruntime provider name.")
@click.option("--compute-precision", type=click.Choice(COMPUTE_PRECISIONS), default="auto", show_default=True,
              help="What OpenVINO computes in (not the file's precision): auto = bf16 where the CPU has native "
                   "bf16 (AMX/AVX512-BF16), else fp32.")
@click.option("--threads", type=int, default=None, help="CPU threads for onnxruntime (default: its choice).")
@click.option("--cuda-graph", is_flag=True, help="Replay the model as a CUDA graph (CUDA provider, fixed batch).")
@click.option("--out", default="samples.png", show_default=True, metavar="PATH",
              help="A .png grid, an .npz (images, labels, samples) or a folder (one PNG per image).")
@click.option("--gif", default=None, metavar="PATH", help="Also write a .gif of the predicted x_0 at each step.")
@click.option("--scale", type=int, default=4, show_default=True, help="Nearest-neighbour upscaling of PNG/GIF images.")
@click.option("--telemetry", default=None, metavar="FILE.csv",
              help="Record GPU utilisation, memory and power (NVML) while sampling.")
@click.option("--timesteps", type=int, default=None, help="Foreign models: training timesteps T.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None, help="Foreign models: beta schedule [linear].")
@click.option("--beta-start", type=float, default=None, help="Foreign models: first beta [1e-4].")
@click.option("--beta-end", type=float, default=None, help="Foreign models: last beta [0.02].")
@click.option("--classes", "class_list", default=None, metavar="NAMES|COUNT",
              help="Foreign models: comma-separated class names, or their number.")
@click.option("--image-size", type=int, default=None, help="Foreign models: image height = width.")
@click.option("--channels", type=int, default=None, help="Foreign models: image channels.")
@click.option("--prediction-type", type=click.Choice(PREDICTION_TYPES), default=None,
              help="Foreign models: what the network predicts [epsilon].")
def main(model, sampler, steps, eta, guidance, classes, unconditional, seed, n, provider, compute_precision,
         threads, cuda_graph,
         out, gif, scale, telemetry, timesteps, schedule, beta_start, beta_end, class_list, image_size, channels,
         prediction_type):
    """Sample images from an mdx ONNX model with ONNX Runtime (no torch)."""
    kind = check_options(n=n, steps=steps, guidance=guidance, seed=seed, scale=scale, threads=threads,
                         classes=classes, unconditional=unconditional, out=out, gif=gif, telemetry=telemetry)
    overrides = {"timesteps": timesteps, "schedule": schedule, "beta_start": beta_start, "beta_end": beta_end,
                 "classes": parse_classes_option(class_list), "image_size": image_size, "channels": channels,
                 "prediction_type": prediction_type}
    pipe = Pipeline.load(model, provider=provider, threads=threads, cuda_graph=cuda_graph,
                         compute_precision=compute_precision, overrides=overrides)
    T = pipe.info.schedule.num_train_timesteps
    if steps is not None and steps > T:
        raise UsageError(f"--steps {steps} is more than the model's {T} training timesteps")
    # The command line, else the model's recommendation, else the fallback; checked before sampling.
    request = pipe.request(list(classes), n=n, steps=steps, guidance=guidance, seed=seed, sampler=sampler, eta=eta,
                           unconditional=unconditional)
    s = request.settings
    _info(f"{pipe.path.name}: {s.n} images, {s.classes}, {s.sampler} {s.steps} steps, guidance {s.guidance:g}, "
          f"seed {seed}, on {pipe.provider} ({pipe.compute_precision}, loaded in {pipe.load_seconds:.2f} s)"
          + "".join(f"; {note}" for note in (*pipe.notes, *s.notes)))
    progress = Progress("sampling")
    output = sample_with_telemetry(pipe, request, telemetry, record_x0=gif is not None,
                                   callback=lambda done, total, _x0: progress(done, total))
    write_outputs(output, kind=kind, out=out, gif=gif, scale=scale)
    click.echo(summary_line(s.n, output.timings.total_seconds, output.timings.model_seconds, pipe.provider))


if __name__ == "__main__":
    main()
