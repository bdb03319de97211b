"""mdx-serve: an HTTP service whose clients share every denoiser call (FastAPI on the engine).

    mdx-serve                                   # models/*.onnx on http://127.0.0.1:8000
    mdx-serve --models-dir exported/ --port 9000 --max-batch-rows 128 --max-queue 256
    curl -s localhost:8000/v1/generate -H 'content-type: application/json' \\
         -d '{"model": "emoji16", "classes": ["food"], "n": 4, "seed": 1}' -o food.png

Endpoints: `POST /v1/generate` (a PNG grid or an npz), `GET /v1/models`, `GET /healthz`,
`GET /metrics` (Prometheus, `mdx_` names), OpenAPI docs at `/docs`. Each model of the folder
gets its own `Engine` (mdx.runtime.engine) the first time it is asked for, so concurrent
requests for a model are batched step by step into shared ONNX Runtime calls, and a request's
images equal `mdx-sample`'s for the same settings and seed.

Errors are JSON `{"error": message, "field": name or null}`: a malformed body or an
out-of-range field 422 (the message names the field and the allowed range), an unknown model
404, a full queue 429 with Retry-After, a request past its deadline 504, a model that cannot
be loaded 500. With the environment variable MDX_API_KEY set, every path except /healthz
needs `Authorization: Bearer <key>` (else 401). SIGTERM (uvicorn's handling) stops accepting
connections, finishes the requests in flight, then closes the engines.

FastAPI, uvicorn and prometheus_client are imported inside functions only (the `serve` extra),
so the runtime imports without them. This module has no `from __future__ import annotations`
on purpose: FastAPI reads the endpoint annotations of `create_app`'s local functions at run time.
"""

import asyncio
import hmac
import io
import json
import math
import os
import socket
import threading
from pathlib import Path
from typing import Callable, Optional

import click
import numpy as np
from PIL import Image

from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
from mdx.runtime.contract import (SAMPLERS, ModelError, ModelInfo, max_steps, parse_model_info, read_metadata,
                                  resolve_settings)
from mdx.runtime.engine import (Engine, EngineClosed, EngineConfig, EngineError, QueueFull, RequestTimeout,
                                SampleRequest)
from mdx.runtime.images import grid_columns, make_grid, to_uint8
from mdx.runtime.pipeline import PipelineError, build_context
from mdx.runtime.samplers import SamplerError
from mdx.runtime.schedules import ScheduleError
from mdx.runtime.session import OnnxDenoiser
from mdx.runtime.shipped import DEFAULT_MODEL
from mdx.runtime.shipped import models_dir as shipped_models_dir

PROG = "mdx-serve"
INSTALL_HINT = "pip install 'microdiffusion[serve]'"
API_KEY_ENV = "MDX_API_KEY"
OPEN_PATHS = ("/healthz",)  # answered without the API key
FORMATS = ("png", "npz")
MAX_GUIDANCE = 20.0  # as mdx-ui: far beyond ~10 guidance only saturates the images
MAX_SEED = 2**63 - 1
PNG_SCALE = 4  # nearest-neighbour upscaling of the PNG grid, as mdx-sample's default


class ServeError(ValueError):
    """A request the service answers with an error status; `status` and `field` say how."""

    status = 400

    def __init__(self, message: str, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.field = field


class BadField(ServeError):
    status = 422


class UnknownModel(ServeError, ModelError):
    """No such model in the folder (a ModelError too, for callers such as mdx-ui)."""

    status = 404


class ModelUnavailable(ServeError, ModelError):
    """The model file is there but cannot be loaded; the message says why."""

    status = 500


# --- the models folder and one engine per model ---------------------------------------


def default_models_dir() -> Path:
    """./models when it exists, else the shipped models (the package mdx.models)."""
    local = Path.cwd() / "models"
    return local if local.is_dir() else shipped_models_dir()


class ModelRegistry:
    """The diffusion models of a folder by name (file stem), each with its engine, loaded on the
    first request for it. A file that changed on disk (mtime, size) gets a fresh engine; the old
    one finishes its requests and stops."""

    def __init__(self, models_dir, provider: str = "auto", config: Optional[EngineConfig] = None,
                 threads: Optional[int] = None) -> None:
        self.models_dir = Path(models_dir)
        self.provider = provider
        self.config = config or EngineConfig()
        self.threads = threads
        self._lock = threading.Lock()
        self._loading: dict = {}  # key -> lock, so that a model loads once however many ask
        self._engines: dict = {}  # (path, provider) -> (stat key, Engine)

    def _scan(self) -> list:
        """(name, readable) per model file, sorted: files with mdx.format metadata (a classifier
        is left out) and files that do not parse (asking for one says why it cannot load)."""
        found = []
        for path in sorted(self.models_dir.glob("*.onnx")):
            try:
                if "mdx.format" in read_metadata(path):
                    found.append((path.stem, True))
            except (OSError, ValueError):
                found.append((path.stem, False))
        return found

    def names(self) -> list:
        return [name for name, _ in self._scan()]

    def path(self, name) -> Path:
        """The file of a model name ("emoji16" or "emoji16.onnx"); UnknownModel otherwise."""
        names = self.names()
        stem = name[:-5] if isinstance(name, str) and name.endswith(".onnx") else name
        if stem not in names:
            known = ", ".join(names) if names else f"none: export one into {self.models_dir}"
            raise UnknownModel(f"unknown model {name!r}; the models are {known}", "model")
        return self.models_dir / f"{stem}.onnx"

    def default_name(self) -> str:
        """emoji16 when the folder has it, else the first model whose metadata reads."""
        found = self._scan()
        if not found:
            raise UnknownModel(f"no models in {self.models_dir}: export one there with mdx-export", "model")
        readable = [name for name, ok in found if ok]
        return DEFAULT_MODEL if DEFAULT_MODEL in readable else (readable or [found[0][0]])[0]

    def engine(self, name, provider: Optional[str] = None) -> Engine:
        """The model's engine (loading the model the first time; ModelUnavailable if it cannot)."""
        return self.engine_for(self.path(name), provider or self.provider)

    def engine_for(self, path: Path, provider: str) -> Engine:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise UnknownModel(f"model file {path} does not exist", "model") from None
        key, version = (str(path.resolve()), provider), (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            held = self._engines.get(key)
            if held is not None and held[0] == version and not held[1].closed:
                return held[1]
            if held is not None:
                held[1].close(timeout=0)  # finishes what it holds, in its own thread
            try:
                denoiser = OnnxDenoiser.load(path, provider=provider, threads=self.threads)
            except ModelError as e:
                raise ModelUnavailable(f"model {path.stem} cannot be loaded: {e}", "model") from None
            engine = Engine(denoiser, self.config, name=path.stem)
            with self._lock:
                self._engines[key] = (version, engine)
            return engine

    def loaded(self) -> dict:
        """name -> engine of every loaded model (what /metrics reports)."""
        with self._lock:
            return {engine.name: engine for _, engine in self._engines.values() if not engine.closed}

    def describe(self, name: str) -> dict:
        """What GET /v1/models says of a model, from its metadata (no session is started)."""
        path = self.path(name)
        try:
            info = parse_model_info(read_metadata(path), path)
        except (OSError, ValueError) as e:
            return {"name": name, "file": path.name, "error": f"cannot read the model: {e}"}
        return describe_info(name, info, loaded=name in self.loaded())

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        with self._lock:
            engines = [engine for _, engine in self._engines.values()]
            self._engines.clear()
        for engine in engines:
            engine.close(drain=drain, timeout=timeout)


class StaticModels:
    """Engines given by the caller (name -> Engine), in place of a models folder: for embedding
    the app (tests, a Ray Serve replica) around engines that already run."""

    def __init__(self, engines: dict) -> None:
        if not engines:
            raise ServeError("StaticModels needs at least one engine")
        self._engines = dict(engines)

    def names(self) -> list:
        return sorted(self._engines)

    def default_name(self) -> str:
        return DEFAULT_MODEL if DEFAULT_MODEL in self._engines else self.names()[0]

    def engine(self, name) -> Engine:
        stem = name[:-5] if isinstance(name, str) and name.endswith(".onnx") else name
        if stem not in self._engines:
            raise UnknownModel(f"unknown model {name!r}; the models are {', '.join(self.names())}", "model")
        return self._engines[stem]

    def loaded(self) -> dict:
        return {name: e for name, e in self._engines.items() if not e.closed}

    def describe(self, name: str) -> dict:
        return describe_info(name, self.engine(name).info, loaded=True)

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        for engine in self._engines.values():
            engine.close(drain=drain, timeout=timeout)


def describe_info(name: str, info: ModelInfo, loaded: bool) -> dict:
    """GET /v1/models' entry for a model."""
    settings = resolve_settings(info, max_guidance=MAX_GUIDANCE)
    return {"name": name, "file": info.path.name, "classes": list(info.class_names), "image_size": info.image_size,
            "channels": info.channels, "schedule": info.schedule.to_dict(), "prediction_type": info.prediction_type,
            "precision": info.precision, "recommended": {**settings.as_dict(), "sampler_options": settings.sampler_options},
            "notes": list(settings.notes), "loaded": loaded}


# --- one request: its settings, its images --------------------------------------------


def sample_request(info: ModelInfo, body: dict) -> tuple:
    """(SampleRequest, labels, the settings used) for a checked body; BadField names a value that
    this model does not allow (steps beyond its T, an unknown class, eta without ddim)."""
    settings = resolve_settings(info, sampler=body.get("sampler"), steps=body.get("steps"),
                                guidance=body.get("guidance"), max_guidance=MAX_GUIDANCE)
    T = info.schedule.num_train_timesteps
    top = max_steps(settings.sampler, T)
    if not 1 <= settings.steps <= top:
        raise BadField(f"steps must be an integer in 1..{top} for {settings.sampler} on this model "
                       f"(T = {T}), got {settings.steps}", "steps")
    eta = float(body.get("eta") or 0.0)
    if eta and settings.sampler != "ddim":
        raise BadField(f"eta applies to the ddim sampler only, not {settings.sampler} (got eta={eta:g})", "eta")
    classes = list(body.get("classes") or [])
    n = int(body.get("n") or 1)
    try:
        context, labels = build_context(info.class_names, classes, not classes, n)
    except PipelineError as e:
        raise BadField(str(e), "classes") from None
    # Unconditional: both halves of a guided batch are the same rows, so eps_u + s (eps_c - eps_u)
    # is exactly eps_u; sampling at guidance 1 gives the same images with half the rows.
    guidance = settings.guidance if classes else 1.0
    request = SampleRequest(context=context, sampler=settings.sampler, steps=settings.steps, guidance=guidance,
                            eta=eta, seed=int(body.get("seed") or 0), sampler_options=settings.sampler_options)
    used = {"sampler": settings.sampler, "steps": settings.steps, "guidance": settings.guidance, "eta": eta,
            "seed": request.seed, "n": n, "classes": classes}
    return request, labels, used


def _image(grid: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> PIL (1 channel as greyscale)."""
    return Image.fromarray(grid[..., 0], mode="L") if grid.shape[-1] == 1 else Image.fromarray(grid)


def encode_png(samples: np.ndarray) -> bytes:
    """The samples as one PNG grid, about square, upscaled PNG_SCALE times (as mdx-sample's .png)."""
    grid = make_grid(to_uint8(samples), grid_columns(len(samples)), PNG_SCALE)
    buf = io.BytesIO()
    _image(grid).save(buf, format="PNG")
    return buf.getvalue()


def encode_npz(samples: np.ndarray, labels: np.ndarray) -> bytes:
    """mdx-sample's npz: `images` uint8 (N, H, W, C), `labels` int64 (N,), `samples` float32 (N, C, H, W)."""
    buf = io.BytesIO()
    np.savez(buf, images=to_uint8(samples), labels=np.asarray(labels, dtype=np.int64),
             samples=np.asarray(samples, dtype=np.float32))
    return buf.getvalue()


# --- request validation (pydantic, built lazily) --------------------------------------


def field_rules(max_images: int) -> dict:
    """What each body field must be, as the 422 messages say it."""
    return {
        "model": "a model name (see GET /v1/models)",
        "classes": "a list of class names (several mix them; empty or omitted: unconditional)",
        "n": f"an integer in 1..{max_images}",
        "sampler": f"one of {', '.join(SAMPLERS)}",
        "steps": "an integer in 1..T (the model's training timesteps; T-1 for dpmpp)",
        "guidance": f"a number in 0..{MAX_GUIDANCE:g}",
        "eta": "a number in 0..1 (ddim only)",
        "seed": f"an integer in 0..{MAX_SEED}",
        "format": f"one of {', '.join(FORMATS)}",
    }


def body_model(max_images: int):
    """The pydantic model of POST /v1/generate's body (what /docs shows)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class GenerateBody(BaseModel):
        """Every field is optional; left out, sampler, steps and guidance are the model's recommended settings."""

        model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
            "model": DEFAULT_MODEL, "classes": ["food"], "n": 4, "sampler": "dpmpp", "steps": 20,
            "guidance": 5.0, "eta": 0.0, "seed": 1, "format": "png"}})

        model: Optional[str] = Field(None, description="model name (GET /v1/models); default emoji16 or the first")
        classes: list[str] = Field(default_factory=list, max_length=1024,
                                   description="class names; several mix them; empty: unconditional")
        n: int = Field(1, ge=1, le=max_images, strict=True, description="number of images")
        sampler: Optional[Literal[SAMPLERS]] = Field(None, description="ddpm, ddim or dpmpp")
        steps: Optional[int] = Field(None, ge=1, strict=True, description="sampling steps, 1..T")
        guidance: Optional[float] = Field(None, ge=0.0, le=MAX_GUIDANCE, strict=True,
                                          description="classifier-free guidance; 1 = conditional model alone")
        eta: float = Field(0.0, ge=0.0, le=1.0, strict=True, description="DDIM noise (ddim only)")
        seed: int = Field(0, ge=0, le=MAX_SEED, strict=True, description="random seed")
        format: Literal[FORMATS] = Field("png", description="png (a grid) or npz (images, labels, samples)")

    return GenerateBody


def validation_error(errors: list, rules: dict) -> tuple:
    """(message, field) for pydantic's first error, in this API's words."""
    error = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    kind, loc = error.get("type", ""), [p for p in error.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", error.get("msg", ""))
        return f"the body is not valid JSON ({reason})", None
    if not loc or not isinstance(loc[0], str) or kind in ("model_attributes_type", "dict_type"):
        return f"the body must be a JSON object with the fields {', '.join(rules)}", None
    field = loc[0]
    if kind == "extra_forbidden":
        return f"unknown field {field!r}; the fields are {', '.join(rules)}", field
    given = json.dumps(error.get("input"), default=str)[:80]
    return f"{field} must be {rules.get(field, 'valid')}, got {given}", field


# --- ASGI middleware (plain ASGI: BaseHTTPMiddleware would hide client disconnects) ----


async def _send_json(send, status: int, payload: dict, headers: tuple = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    """Every HTTP request except OPEN_PATHS needs `Authorization: Bearer <key>`, else 401."""

    def __init__(self, app, key: str) -> None:
        self.app, self._expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            return await self.app(scope, receive, send)
        await _send_json(send, 401, {"error": "missing or wrong API key: send Authorization: Bearer <key>",
                                     "field": None}, ((b"www-authenticate", b"Bearer"),))


class StatusCounter:
    """Counts responses by path and status for mdx_http_responses_total."""

    def __init__(self, app, counts: dict, lock: threading.Lock) -> None:
        self.app, self.counts, self.lock = app, counts, lock

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                key = (scope["path"] if scope["path"] in KNOWN_PATHS else "other", str(message["status"]))
                with self.lock:
                    self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


KNOWN_PATHS = ("/v1/generate", "/v1/models", "/healthz", "/metrics", "/docs", "/openapi.json")


# --- /metrics -------------------------------------------------------------------------


def _histogram(bounds, counts) -> list:
    """Cumulative (le, count) pairs for prometheus_client, ending with +Inf."""
    pairs, total = [], 0
    for bound, count in zip([*bounds, math.inf], counts):
        total += count
        pairs.append(("+Inf" if bound == math.inf else f"{bound:g}", total))
    return pairs


def metric_families(models, http_counts: dict, lock: threading.Lock) -> list:
    """The mdx_ metric families of every loaded engine, read at scrape time."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    from mdx.runtime.engine import LATENCY_BUCKETS

    gauges = {k: GaugeMetricFamily(f"mdx_{k}", doc, labels=["model"]) for k, doc in (
        ("queue_depth", "requests waiting for rows"), ("active_requests", "requests being sampled"),
        ("active_rows", "rows the active requests take per call"))}
    counters = {k: CounterMetricFamily(f"mdx_{k}", doc, labels=["model"]) for k, doc in (
        ("denoiser_calls", "batched denoiser calls"), ("rows", "request rows evaluated"),
        ("pad_rows", "pad rows evaluated (bucket minus rows)"), ("model_seconds", "seconds inside denoiser calls"),
        ("images", "images delivered"))}
    outcomes = CounterMetricFamily("mdx_requests", "engine requests by outcome", labels=["model", "outcome"])
    rows = HistogramMetricFamily("mdx_rows_per_call", "rows per denoiser call (by bucket)", labels=["model"])
    latency = HistogramMetricFamily("mdx_request_latency_seconds", "submission to images", labels=["model"])
    for name, engine in sorted(models.loaded().items()):
        s = engine.stats()
        for k, family in gauges.items():
            family.add_metric([name], getattr(s, k))
        for k, attr in (("denoiser_calls", "calls"), ("rows", "rows_total"), ("pad_rows", "pad_rows_total"),
                        ("model_seconds", "model_seconds_total"), ("images", "images_total")):
            counters[k].add_metric([name], getattr(s, attr))
        for outcome, count in s.requests.items():
            outcomes.add_metric([name, outcome], count)
        per_bucket = [s.rows_per_call.get(b, 0) for b in s.rows_buckets]
        rows.add_metric([name], _histogram(s.rows_buckets, [*per_bucket, 0]), sum_value=s.rows_total)
        latency.add_metric([name], _histogram(LATENCY_BUCKETS, s.latency_counts), sum_value=s.latency_sum)
    http = CounterMetricFamily("mdx_http_responses", "HTTP responses by path and status", labels=["path", "code"])
    with lock:
        for (path, code), count in sorted(http_counts.items()):
            http.add_metric([path, code], count)
    return [*gauges.values(), *counters.values(), outcomes, rows, latency, http]


# --- the app --------------------------------------------------------------------------

ERROR_STATUS = ((QueueFull, 429), (ServeError, None), (EngineError, 422), (PipelineError, 422), (SamplerError, 422),
                (ScheduleError, 422), (RequestTimeout, 504), (EngineClosed, 503))


def error_response(error: Exception):
    """The JSON response for an error a request can cause (see the module docstring)."""
    from fastapi.responses import JSONResponse

    status = next(code for kind, code in ERROR_STATUS if isinstance(error, kind))
    status = error.status if isinstance(error, ServeError) else status
    headers = {"Retry-After": str(math.ceil(error.retry_after))} if isinstance(error, QueueFull) else None
    field = getattr(error, "field", None)
    return JSONResponse({"error": str(error), "field": field}, status_code=status, headers=headers)


async def wait_or_cancel(ticket, request, poll_s: float = 0.1):
    """The ticket's result, or None when the client went away first (its request is cancelled,
    which frees its rows before the engine's next call)."""
    future = asyncio.ensure_future(ticket.wait())
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=poll_s)
            if done:
                return future.result()
            if await request.is_disconnected():
                ticket.cancel()
                return None
    finally:
        if not future.done():  # the handler itself was cancelled (server shutdown, disconnect)
            future.cancel()
            ticket.cancel()


def _add_error_handlers(app, rules: dict) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, field = validation_error(list(exc.errors()), rules)
        return JSONResponse({"error": message, "field": field}, status_code=422)

    for kind, _ in ERROR_STATUS:
        app.add_exception_handler(kind, lambda request, exc: error_response(exc))


async def _encode(result, labels, fmt: str) -> tuple:
    """(payload, media type), encoded off the event loop."""
    if fmt == "npz":
        return await asyncio.to_thread(encode_npz, result.samples, labels), "application/octet-stream"
    return await asyncio.to_thread(encode_png, result.samples), "image/png"


def _add_generate(app, models, Body) -> None:
    from fastapi import Request
    from fastapi.responses import Response

    @app.post("/v1/generate", response_class=Response, summary="Sample images",
              responses={200: {"content": {"image/png": {}, "application/octet-stream": {}},
                               "description": "a PNG grid, or an npz (images, labels, samples)"},
                         404: {"description": "unknown model"}, 422: {"description": "a bad field"},
                         429: {"description": "the queue is full; see Retry-After"}})
    async def generate(request: Request, body: Optional[Body] = None):
        values = body.model_dump() if body is not None else {}
        name = values.get("model") or models.default_name()
        engine = await asyncio.to_thread(models.engine, name)  # the first request loads the model
        sample, labels, used = sample_request(engine.info, values)
        ticket = engine.submit(sample)
        result = await wait_or_cancel(ticket, request)
        if result is None:
            return Response(status_code=499)  # the client has gone; nobody reads this
        payload, media = await _encode(result, labels, values.get("format", "png"))
        headers = {"X-MDX-Settings": json.dumps({"model": engine.name, **used}),
                   "X-MDX-Seconds": f"{result.total_seconds:.4f}",
                   "X-MDX-Provider": str(getattr(getattr(engine, "denoiser", None), "provider", ""))}
        return Response(payload, media_type=media, headers=headers)


def _add_info_routes(app, models, http_counts: dict, lock: threading.Lock) -> None:
    from fastapi.responses import Response

    @app.get("/v1/models", summary="The models, their classes and recommended settings")
    async def list_models():
        return {"models": [models.describe(name) for name in models.names()]}

    @app.get("/healthz", summary="Liveness (no API key needed)")
    async def healthz():
        return {"status": "ok", "models": len(models.names()), "loaded": sorted(models.loaded())}

    @app.get("/metrics", summary="Prometheus metrics (mdx_ names)")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        class Snapshot:
            def collect(self):
                return metric_families(models, http_counts, lock)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Snapshot())
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def create_app(models, *, api_key: Optional[str] = None, max_images: Optional[int] = None,
               close_on_shutdown: bool = True, on_shutdown: Optional[Callable[[], None]] = None):
    """The FastAPI app over `models`: a ModelRegistry, a StaticModels, a single Engine, or any
    object with names(), default_name(), engine(name), describe(name), loaded(), close().

    api_key: None reads MDX_API_KEY (unset or empty: no key needed). max_images: the largest
    n a request may ask for (default: the engines' EngineConfig.max_images). At shutdown the
    engines are closed (unless close_on_shutdown is False), then `on_shutdown()` runs.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    if isinstance(models, Engine):
        models = StaticModels({models.name: models})
    if max_images is None:
        max_images = getattr(getattr(models, "config", None), "max_images", None) or EngineConfig().max_images
    key = os.environ.get(API_KEY_ENV) if api_key is None else api_key

    @asynccontextmanager
    async def lifespan(app):
        yield
        if close_on_shutdown:  # uvicorn has finished the requests in flight by now
            await asyncio.to_thread(models.close)
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="mdx-serve", version="1", lifespan=lifespan,
                  description="Class-conditional diffusion sampling; every client's denoising steps share "
                              "batched ONNX Runtime calls.")
    app.state.models = models
    http_counts, lock = {}, threading.Lock()
    _add_error_handlers(app, field_rules(max_images))
    _add_generate(app, models, body_model(max_images))
    _add_info_routes(app, models, http_counts, lock)
    if key:
        app.add_middleware(BearerAuth, key=key)
    app.add_middleware(StatusCounter, counts=http_counts, lock=lock)  # outermost: counts the 401s too
    return app


# --- the command ----------------------------------------------------------------------


def require_serve_extra() -> None:
    """ServeError naming the extra when FastAPI, uvicorn or prometheus_client is missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeError(f"{', '.join(missing)} not installed; mdx-serve needs the serve extra: {INSTALL_HINT}")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts, so a taken port is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Run uvicorn on `sock` until SIGINT/SIGTERM: it stops accepting, finishes the requests in
    flight, runs the app's shutdown (which closes the engines), then re-raises the signal, so
    the exit status says which signal stopped the service (143 for SIGTERM in a shell)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


USER_ERRORS = (ServeError, EngineError, ModelError)  # ShippedDataError is a ModelError


@click.command(cls=one_line_command(PROG, USER_ERRORS), context_settings=CONTEXT_SETTINGS)
@click.option("--models-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of .onnx models, served by file stem (default: ./models if it exists, else the "
                   "repository's models/).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 makes the service reachable from other machines.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to bind.")
@click.option("--provider", default="auto", show_default=True,
              help="onnxruntime provider of every engine: auto or a provider name.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads per model (default: onnxruntime's).")
@click.option("--max-batch-rows", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Rows per denoiser call (a guided image takes 2); larger requests spread over calls.")
@click.option("--max-queue", type=click.IntRange(0, 100000), default=256, show_default=True,
              help="Requests waiting per model beyond the active ones; more are answered 429.")
@click.option("--max-images", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Largest n one request may ask for.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds a request may take, queue time included (then 504).")
@click.option("--ray", "use_ray", is_flag=True, help="Serve on Ray Serve replicas (mdx.runtime.ray_serve; extra ray).")
@click.option("--replicas", type=int, default=None, help="--ray: engine replicas (default: the cluster's CPUs / --replica-cpus).")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="--ray: autoscale between MIN and MAX replicas.")
@click.option("--address", default=None, help="--ray: join this Ray cluster (auto, HOST:6379); default: a local one.")
@click.option("--replica-cpus", type=int, default=None, help="--ray: CPUs (and ONNX Runtime threads) per replica [1].")
def main(models_dir, host, port, provider, threads, max_batch_rows, max_queue, max_images, timeout_s, use_ray, replicas,
         autoscale, address, replica_cpus) -> None:
    """Serve mdx models over HTTP; concurrent requests share batched denoiser calls (no torch).

    Set MDX_API_KEY to require `Authorization: Bearer <key>` on every path but /healthz.
    """
    require_serve_extra()
    models_dir = models_dir if models_dir is not None else default_models_dir()
    if not models_dir.is_dir():
        raise ServeError(f"models folder {models_dir} does not exist; pass --models-dir DIR")
    config = EngineConfig(max_rows=max_batch_rows, max_queue=max_queue, timeout_s=timeout_s, max_images=max_images)
    if use_ray or any(v is not None for v in (replicas, autoscale, address, replica_cpus)):
        from mdx.runtime.ray_serve import serve_on_ray

        return serve_on_ray(models_dir, use_ray=use_ray, host=host, port=port, provider=provider, threads=threads,
                            config=config, api_key=os.environ.get(API_KEY_ENV), address=address, replicas=replicas,
                            autoscale=autoscale, replica_cpus=replica_cpus,
                            log=lambda message: click.echo(f"{PROG}: {message}", err=True))
    registry = ModelRegistry(models_dir, provider=provider, config=config, threads=threads)
    names = registry.names()
    sock = bind_socket(host, port)
    app = create_app(registry, on_shutdown=lambda: click.echo(f"{PROG}: stopped; the requests in flight were "
                                                              "answered and the engines closed", err=True))
    auth = "API key required" if os.environ.get(API_KEY_ENV) else f"no API key ({API_KEY_ENV} unset)"
    click.echo(f"{PROG}: {len(names)} model(s) in {models_dir} ({', '.join(names) or 'none'}); serving on "
               f"http://{host}:{port} (docs at /docs, {auth}; Ctrl+C stops)", err=True)
    serve(app, sock)


if __name__ == "__main__":
    main()
