"""mdx-ui: sample an mdx model in the browser, a gradio app on ONNX Runtime and numpy (no torch).

    mdx-ui                                        # models/*.onnx on http://127.0.0.1:7860
    mdx-ui --models-dir exported/ --port 8000 --max-batch 16 --concurrency 8

The page: a model picker over `<models-dir>/*.onnx` (diffusion models only: files without
`mdx.format` metadata, such as a classifier, are left out), one checkbox per class (tick
several to mix them, multi-hot, as `mdx-sample --class a --class b`; none cycles through all
classes), the sampler, steps, guidance, eta, seed, batch size and provider. Generate shows the
grid, the denoising animation (the predicted x_0 at each step) and the timings.

Requests go to one batching engine per model and provider (mdx.runtime.engine), so concurrent
browser users share every denoiser call; each user's images equal `mdx-sample`'s for the same
settings and seed. `--concurrency` is how many requests the engine takes at once (the rest wait
in gradio's queue).

Every value is bounded twice: by its component in the page, and again by the handler
(`Studio.generate`), since a client can post anything to the API. Errors a user can cause
(a bad value, a missing or corrupt model, a provider that does not start) become a
`gr.Error` in the page; the server keeps serving.

gradio is imported inside functions only, so that the runtime imports without it
(`pip install 'microdiffusion[ui]'` adds it).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import click
import numpy as np
import onnxruntime as ort

from mdx.runtime import shipped
from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
from mdx.runtime.contract import FALLBACK, FORMAT, ModelInfo, max_steps, read_metadata, resolve_settings
from mdx.runtime.images import OutputError, grid_columns, make_grid, save_gif, to_uint8
from mdx.runtime.engine import EngineClosed, EngineConfig, EngineError, RequestTimeout
from mdx.runtime.pipeline import PipelineError, build_context
from mdx.runtime.samplers import SAMPLERS, SamplerError
from mdx.runtime.schedules import ScheduleError
from mdx.runtime.serve import ModelRegistry
from mdx.runtime.session import ModelError

PROG = "mdx-ui"
INSTALL_HINT = "pip install 'microdiffusion[ui]'"
MAX_GUIDANCE = 20.0  # the slider's top; guidance far beyond ~10 only saturates the images
MAX_SEED = 2**32 - 1
GRID_PIXELS = 96  # each image is upscaled (nearest) to about this many pixels a side
GIF_SCALE = 4
KEEP_FILES_SECONDS = 15 * 60  # animations older than this are removed from the work folder
USER_ERRORS = (ModelError, PipelineError, SamplerError, ScheduleError, OutputError, EngineError, RequestTimeout,
               EngineClosed)
ENGINE_ROWS = 64  # rows per denoiser call; a larger request spreads its steps over several calls
REQUEST_TIMEOUT_S = 600.0


class UiError(ValueError):
    """A request value out of range, or a model name that is not in the models folder."""


# --- the models folder ----------------------------------------------------------------


def default_models_dir() -> Path:
    """./models when it exists, else the shipped models (mdx.runtime.shipped: a wheel or the checkout)."""
    local = Path.cwd() / "models"
    return local if local.is_dir() else shipped.models_dir()


def list_models(models_dir: Path) -> list[str]:
    """File names of the diffusion models in `models_dir`, sorted.

    A file that parses as ONNX but has no `mdx.format` metadata (a classifier, a foreign model)
    is left out; a file that does not parse stays in, so picking it shows why it cannot load.
    """
    names = []
    for path in sorted(Path(models_dir).glob("*.onnx")):
        if not path.is_file():
            continue
        try:
            meta = read_metadata(path)
        except (OSError, ValueError):
            names.append(path.name)
            continue
        if FORMAT in meta:
            names.append(path.name)
    return names


def provider_choices() -> list[str]:
    """"auto", what onnxruntime lists, and OpenVINO where its plugin is installed (a listed
    provider may still fail to start: the handler reports that, and the timings name the
    provider that really ran and what it computed in)."""
    from mdx.runtime.providers import OPENVINO, openvino_installed

    # Once the plugin is registered onnxruntime lists it too, with per-device names such as
    # "OpenVINOExecutionProvider.AUTO" that a session is not opened by: those are left out, and
    # each name appears once.
    names = [p for p in ort.get_available_providers() if "." not in p]
    return list(dict.fromkeys(["auto", *names, *([OPENVINO] if openvino_installed() else [])]))


# --- checks on request values ---------------------------------------------------------


def _int_in(name: str, value, lo: int, hi: int) -> int:
    """An integer in lo..hi (an integral float, as JSON clients send, is accepted)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and math.isfinite(value) and float(value).is_integer() and lo <= value <= hi:
        return int(value)
    raise UiError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


def _float_in(name: str, value, lo: float, hi: float) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and math.isfinite(value) and lo <= value <= hi:
        return float(value)
    raise UiError(f"{name} must be a number in {lo:g}..{hi:g}, got {value!r}")


# --- what the page shows ----------------------------------------------------------


@dataclass(frozen=True)
class Result:
    grid: np.ndarray  # (H', W', C) uint8, upscaled
    animation: Path  # a GIF of the predicted x_0 per step, then the samples
    timings: str
    labels: np.ndarray  # (n,) int64, -1 for a mix


@dataclass(frozen=True)
class ModelView:
    """What the page shows for a picked model: its classes and the defaults for the controls."""

    info: ModelInfo
    settings: dict  # sampler, steps, guidance
    notes: tuple[str, ...]  # recommended values that could not be used


def recommended_settings(info: ModelInfo) -> tuple[dict, list[str]]:
    """sampler, steps, guidance: the model's mdx.recommended where it gives usable values, else
    mdx-sample's fallback; plus a note for each recommended value that could not be used."""
    settings = resolve_settings(info, max_guidance=MAX_GUIDANCE)
    return settings.as_dict(), list(settings.notes)


def describe(view: ModelView) -> str:
    """The model card shown under the picker (Markdown)."""
    info, s = view.info, view.info.schedule
    card = (f"**{info.path.name}**: {info.image_size}×{info.image_size}, {info.channels} channels, "
            f"{info.num_classes} classes, {s.kind} schedule with T = {s.num_train_timesteps}, "
            f"{info.prediction_type}, {info.precision}")
    return "\n\n".join([card, *(f"⚠️ {note}" for note in view.notes)])


def _seconds(t: float) -> str:
    return f"{t:.2f} s" if t >= 1 else f"{t * 1000:.1f} ms"


def timings_text(n: int, info: ModelInfo, what: str, wall: float, sampling: float, model: float,
                 provider: str, notes: Sequence[str]) -> str:
    """What was sampled, the wall time, the model's share of the sampling loop, the rate, and the
    provider that really ran (onnxruntime may fall back from the one asked for)."""
    share = model / sampling if sampling > 0 else 1.0
    rate = n / sampling if sampling > 0 else float("inf")
    lines = [f"{n} images of {info.image_size}×{info.image_size} ({what})",
             f"wall time {_seconds(wall)} (sampling {_seconds(sampling)}, {share:.0%} of it in the model)",
             f"{rate:.1f} images/s on {provider}",
             *notes]
    return "\n".join(lines)


# --- what a request does, without gradio ----------------------------------------------


class Studio:
    """The app's handlers as plain methods: tests and the gradio wiring call the same code."""

    def __init__(self, models_dir: str | Path, max_batch: int = 64, work_dir: Path | None = None,
                 engines: ModelRegistry | None = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise UiError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.models_dir = Path(models_dir)
        self.max_batch = max_batch
        # One engine per (model file, provider), loaded on first use and shared by every request.
        self.engines = engines or ModelRegistry(self.models_dir, config=EngineConfig(
            max_rows=ENGINE_ROWS, max_queue=256, timeout_s=REQUEST_TIMEOUT_S, max_images=max_batch))
        if work_dir is None:
            work_dir = Path(tempfile.mkdtemp(prefix="mdx-ui-"))
            atexit.register(shutil.rmtree, work_dir, True)
        self.work_dir = Path(work_dir)

    def models(self) -> list[str]:
        return list_models(self.models_dir)

    def model_path(self, name) -> Path:
        """The file for a picker value; only names listed in the models folder are accepted."""
        models = self.models()
        if not models:
            raise UiError(f"no models in {self.models_dir}: export one there with mdx-export (see the README)")
        if not isinstance(name, str) or name not in models:
            raise UiError(f"model {name!r} is not in {self.models_dir}; choose one of {', '.join(models)}")
        return self.models_dir / name

    def check_provider(self, provider) -> str:
        choices = provider_choices()
        if provider not in choices:
            raise UiError(f"provider {provider!r} is not one of {', '.join(choices)}")
        return provider

    def view(self, name, provider="auto") -> ModelView:
        path = self.model_path(name)
        info = self.engines.engine_for(path, self.check_provider(provider)).info
        settings, notes = recommended_settings(info)
        return ModelView(info, settings, tuple(notes))

    def _prune(self) -> None:
        cutoff = time.time() - KEEP_FILES_SECONDS
        for old in self.work_dir.glob("*.gif"):
            with contextlib.suppress(FileNotFoundError):
                if old.stat().st_mtime < cutoff:
                    old.unlink()

    def generate(self, model, classes, sampler, steps, guidance, eta, seed, batch, provider="auto",
                 progress: Callable[[int, int], None] | None = None) -> Result:
        """One request: check every value, sample, and render the grid and the animation.

        eta applies to DDIM only and is ignored for the other samplers (the page disables it).
        """
        start = time.perf_counter()
        if sampler not in SAMPLERS:
            raise UiError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
        n = _int_in("batch size", batch, 1, self.max_batch)
        guidance = _float_in("guidance", guidance, 0.0, MAX_GUIDANCE)
        eta = _float_in("eta", eta, 0.0, 1.0)
        seed = _int_in("seed", seed, 0, MAX_SEED)
        if classes is None:
            classes = []
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise UiError(f"classes must be a list of class names, got {classes!r}")
        path = self.model_path(model)
        provider = self.check_provider(provider)

        engine = self.engines.engine_for(path, provider)
        info, denoiser = engine.info, engine.denoiser
        T = info.schedule.num_train_timesteps
        steps = _int_in(f"steps (for {sampler} on this model with T = {T})", steps, 1, max_steps(sampler, T))
        context, labels = build_context(info.class_names, list(classes), False, n)
        result = engine.generate(context=context, sampler=sampler, steps=steps, guidance=guidance,
                                 eta=eta if sampler == "ddim" else 0.0, seed=seed, record_x0=True, progress=progress)
        running, notes = f"{denoiser.provider} ({denoiser.compute_precision})", list(denoiser.notes)

        columns = grid_columns(n, None if classes else info.num_classes)
        scale = max(1, GRID_PIXELS // info.image_size)
        grid = make_grid(to_uint8(result.samples), columns, scale)
        self._prune()
        animation = save_gif(result.x0_frames, result.samples, self.work_dir / f"{uuid.uuid4().hex}.gif",
                             columns, scale=GIF_SCALE)
        wall = time.perf_counter() - start
        what = (f"{'+'.join(classes) if classes else 'all classes'}, {sampler} {steps} steps, "
                f"guidance {guidance:g}{f', eta {eta:g}' if sampler == 'ddim' and eta else ''}, seed {seed}")
        text = timings_text(n, info, what, wall, result.total_seconds, result.model_seconds, running, notes)
        return Result(grid=grid, animation=animation, timings=text, labels=labels)


# --- the page -------------------------------------------------------------------------


def _initial_view(studio: Studio) -> tuple[str | None, ModelView | None, str | None]:
    """The page's initial state: the first model that loads and its view, or why none does."""
    models = studio.models()
    first, problem = (models[0] if models else None), None
    if not models:
        problem = f"⚠️ No models in `{studio.models_dir}`: export one there with `mdx-export` (see the README)."
    for name in models:
        try:
            return name, studio.view(name), None
        except (UiError, *USER_ERRORS) as e:
            problem = problem or f"⚠️ {e}"
    return first, None, problem


def _handlers(gr, studio: Studio) -> dict[str, Callable]:
    """The page's event handlers. A user error becomes a warning or a gr.Error in the page (the
    server keeps serving); anything else is a bug and propagates."""

    def pick_model(name, provider):
        """New classes, defaults and bounds for the picked model; an unusable model shows why."""
        try:
            v = studio.view(name, provider)
        except (UiError, *USER_ERRORS) as e:
            gr.Warning(str(e))
            return (gr.update(choices=[], value=[]), f"⚠️ {e}", gr.update(), gr.update(), gr.update(),
                    gr.update())
        s, t = v.settings, v.info.schedule.num_train_timesteps
        return (gr.update(choices=list(v.info.class_names), value=[]), describe(v),
                gr.update(value=s["sampler"]), gr.update(value=s["steps"], maximum=max_steps(s["sampler"], t)),
                gr.update(value=s["guidance"]), gr.update(interactive=s["sampler"] == "ddim"))

    def pick_sampler(sampler, steps, name, provider):
        """DPM-Solver++ allows one step fewer; eta belongs to DDIM."""
        eta = gr.update(interactive=sampler == "ddim")
        try:
            t = studio.view(name, provider).info.schedule.num_train_timesteps
        except (UiError, *USER_ERRORS):
            return gr.update(), eta  # the model itself is unusable: pick_model has said why
        top = max_steps(sampler, t)
        return gr.update(maximum=top, value=min(steps, top)), eta

    def rescan(name):
        """Models added to the folder since the app started appear on the next page load."""
        names = studio.models()
        return gr.update(choices=names, value=name if name in names else (names[0] if names else None))

    def run(model, classes, sampler, steps, guidance, eta, seed, batch, provider, progress=gr.Progress()):
        def report(done, total):
            progress((done, total), desc="sampling")

        try:
            r = studio.generate(model, classes, sampler, steps, guidance, eta, seed, batch, provider,
                                progress=report)
        except (UiError, *USER_ERRORS) as e:
            raise gr.Error(str(e), print_exception=False) from e
        return r.grid, str(r.animation), r.timings

    return {"pick_model": pick_model, "pick_sampler": pick_sampler, "rescan": rescan, "run": run}


def _controls(gr, studio: Studio, first: str | None, view: ModelView | None, problem: str | None) -> dict:
    """The left column: the model picker and card, the classes and the sampling controls."""
    settings = view.settings if view else dict(FALLBACK)
    T = view.info.schedule.num_train_timesteps if view else 1000
    class_names = list(view.info.class_names) if view else []
    c = {}
    c["model"] = gr.Dropdown(studio.models(), value=first, label="Model", elem_id="model")
    c["card"] = gr.Markdown(describe(view) if view else problem, elem_id="model-card")
    c["classes"] = gr.CheckboxGroup(class_names, value=[], label="Classes", elem_id="classes",
                                    info="Tick one, or several to mix them; none cycles through all.")
    c["sampler"] = gr.Radio(list(SAMPLERS), value=settings["sampler"], label="Sampler", elem_id="sampler")
    c["steps"] = gr.Slider(1, max_steps(settings["sampler"], T), value=settings["steps"], step=1,
                           label="Steps", elem_id="steps")
    c["guidance"] = gr.Slider(0.0, MAX_GUIDANCE, value=settings["guidance"], step=0.1, label="Guidance",
                              info="1 = the conditional model alone; 0 = unconditional", elem_id="guidance")
    c["eta"] = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="eta (DDIM noise)",
                         interactive=settings["sampler"] == "ddim", elem_id="eta")
    with gr.Row():
        c["seed"] = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
        c["batch"] = gr.Slider(1, studio.max_batch, value=min(2 * max(len(class_names), 1), studio.max_batch),
                               step=1, label="Batch size", elem_id="batch")
    c["provider"] = gr.Dropdown(provider_choices(), value="auto", label="Provider", elem_id="provider")
    c["button"] = gr.Button("Generate", variant="primary", elem_id="generate")
    return c


def _outputs(gr) -> dict:
    """The right column: the grid, the animation and the timings."""
    return {
        "grid": gr.Image(label="Samples", type="numpy", format="png", interactive=False,
                         buttons=["download", "fullscreen"], elem_id="grid"),
        "animation": gr.Image(label="Denoising (predicted x0 at each step)", type="filepath",
                              interactive=False, buttons=["download", "fullscreen"], elem_id="animation"),
        "timings": gr.Textbox(label="Timings", lines=4, interactive=False, elem_id="timings"),
    }


def _api_inputs(gr) -> dict:
    """The API's model-dependent inputs as plain values (see build_app), in a hidden column."""
    with gr.Column(visible=False):
        return {"model": gr.Textbox(label="model"),
                "classes": gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, label="classes"),
                "steps": gr.Number(label="steps", precision=0, minimum=1),
                "button": gr.Button("generate")}


def _wire(app, h: dict, c: dict, out: dict, api: dict) -> None:
    """Connect the components to the handlers; `/generate` and `/pick_model` form the API."""
    page_out = [out["grid"], out["animation"], out["timings"]]
    c["model"].change(h["pick_model"], [c["model"], c["provider"]],
                      [c["classes"], c["card"], c["sampler"], c["steps"], c["guidance"], c["eta"]],
                      api_name="pick_model", api_visibility="undocumented")
    c["sampler"].input(h["pick_sampler"], [c["sampler"], c["steps"], c["model"], c["provider"]],
                       [c["steps"], c["eta"]], api_visibility="private")
    app.load(h["rescan"], [c["model"]], [c["model"]], api_visibility="private")
    shared = [c["guidance"], c["eta"], c["seed"], c["batch"], c["provider"]]
    c["button"].click(h["run"], [c["model"], c["classes"], c["sampler"], c["steps"], *shared], page_out,
                      api_visibility="private")
    api["button"].click(h["run"], [api["model"], api["classes"], c["sampler"], api["steps"], *shared], page_out,
                        api_name="generate")


def build_app(models_dir: str | Path, max_batch: int = 64, concurrency: int = 8, max_queue: int = 32,
              studio: Studio | None = None):
    """The gradio Blocks app, `concurrency` requests at a time in the engine; launch it with
    `app.launch(server_name=..., server_port=...)`.

    API (gradio_client): `/generate` (model file name, list of class names, sampler, steps,
    guidance, eta, seed, batch size, provider) -> (grid PNG, animation GIF, timings text), and
    `/pick_model` (model, provider) -> the page's updates for that model. `/generate` takes the
    model, its classes and the steps as plain values, since their allowed values depend on the
    model: the handler checks them; the other values go through the page's bounded components.
    """
    import gradio as gr

    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise UiError(f"concurrency must be a positive integer, got {concurrency!r}")
    studio = studio or Studio(models_dir, max_batch=max_batch)
    first, view, problem = _initial_view(studio)
    with gr.Blocks(title="Microdiffusion", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("# Microdiffusion\nSample a class-conditional diffusion model with ONNX Runtime.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                controls = _controls(gr, studio, first, view, problem)
            with gr.Column(scale=2):
                outputs = _outputs(gr)
        api = _api_inputs(gr)
        _wire(app, _handlers(gr, studio), controls, outputs, api)
    app.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    return app


# --- the command ----------------------------------------------------------------------


@click.command(cls=one_line_command(PROG, (UiError, *USER_ERRORS)), context_settings=CONTEXT_SETTINGS)
@click.option("--models-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of .onnx models (default: ./models if it exists, else the repository's models/).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 makes the app reachable from other machines.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port to bind.")
@click.option("--share", is_flag=True, help="Also open a public *.gradio.live link (off unless given).")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Largest batch size a request may ask for.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Requests sampled at the same time (they share batched denoiser calls); the rest wait "
                   "in the queue.")
def main(models_dir: Path | None, host: str, port: int, share: bool, max_batch: int, concurrency: int) -> None:
    """Sample mdx models in the browser (gradio on ONNX Runtime, no torch)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UiError(f"gradio is not installed; {INSTALL_HINT}") from None
    models_dir = models_dir if models_dir is not None else default_models_dir()
    if not models_dir.is_dir():
        raise UiError(f"models folder {models_dir} does not exist; pass --models-dir DIR")
    app = build_app(models_dir, max_batch=max_batch, concurrency=concurrency)
    try:
        _, local_url, share_url = app.launch(server_name=host, server_port=port, share=share, quiet=True,
                                             prevent_thread_lock=True)
    except OSError as e:  # the port is taken, the address cannot be bound
        raise UiError(f"cannot serve on {host}:{port}: {e}") from None
    names = list_models(models_dir)
    click.echo(f"{PROG}: {len(names)} model(s) in {models_dir}; serving on {local_url}"
               + (f" and publicly on {share_url}" if share_url else "") + " (Ctrl+C stops)", err=True)
    try:
        app.block_thread()
    finally:
        app.close()


if __name__ == "__main__":
    main()
