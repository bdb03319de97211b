"""mdx-serve: the API in process (FastAPI's TestClient), then load and fault tests against
uvicorn on a free 127.0.0.1 port (64 concurrent clients, malformed requests among good ones,
a client that disconnects mid-request, graceful shutdown), auth, metrics and the command line.

Every server here binds 127.0.0.1, serves a tiny model and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import runtime_helpers as h  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from mdx.runtime import serve  # noqa: E402
from mdx.runtime.engine import Engine, EngineConfig  # noqa: E402
from mdx.runtime.pipeline import build_context, generate  # noqa: E402
from mdx.runtime.session import OnnxDenoiser  # noqa: E402

CPU = "CPUExecutionProvider"
FAST = {"sampler": "ddim", "steps": 4}  # keep each request short


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """tiny.onnx (a contract model), broken.onnx (not ONNX) and other.onnx (valid ONNX without
    mdx metadata, left out of the list)."""
    root = tmp_path_factory.mktemp("serve") / "models"
    root.mkdir()
    shutil.copy(h.cached_tiny()[1], root / "tiny.onnx")
    (root / "broken.onnx").write_text("not a model")
    h.write_wrong_signature_model(root / "other.onnx")
    return root


@pytest.fixture
def registry(models_dir):
    reg = serve.ModelRegistry(models_dir, provider=CPU, threads=1,
                              config=EngineConfig(max_rows=16, max_queue=64, max_images=8))
    yield reg
    reg.close()


@pytest.fixture
def client(registry):
    with TestClient(serve.create_app(registry, api_key="")) as c:
        yield c


class SlowBinding:
    """A binding whose run() first waits for a gate and sleeps: requests that take a while."""

    def __init__(self, inner, owner) -> None:
        self.inner, self.owner = inner, owner
        self.sample, self.timestep, self.context = inner.sample, inner.timestep, inner.context

    def run(self):
        self.owner.gate.wait(30)
        time.sleep(self.owner.delay)
        return self.inner.run()


class SlowDenoiser:
    def __init__(self, denoiser, delay: float) -> None:
        self.inner, self.delay, self.gate = denoiser, delay, threading.Event()
        self.gate.set()
        self.info, self.provider = denoiser.info, denoiser.provider

    def binding(self, batch: int):
        return SlowBinding(self.inner.binding(batch), self)


def slow_engine(delay: float = 0.02, **config) -> tuple[Engine, SlowDenoiser]:
    slow = SlowDenoiser(OnnxDenoiser.load(h.cached_tiny()[1], provider=CPU, threads=1), delay)
    return Engine(slow, EngineConfig(**{"max_rows": 16, "max_images": 8, **config}), name="tiny"), slow


@contextlib.contextmanager
def running_server(app, graceful_s: float | None = 10):
    """uvicorn in a thread on a free 127.0.0.1 port; yields (base URL, server)."""
    sock = serve.bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_s))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


# --- the API in process ----------------------------------------------------------------


def test_npz_equals_generate_alone(client, models_dir):
    reference = OnnxDenoiser.load(models_dir / "tiny.onnx", provider=CPU, threads=1)
    names = reference.info.class_names
    cases = [
        ({"classes": ["ball"], "n": 3, "sampler": "dpmpp", "steps": 6, "guidance": 5.0, "seed": 9},
         dict(context=build_context(names, ["ball"], False, 3)[0], sampler="dpmpp", steps=6, guidance=5.0, seed=9)),
        ({"classes": ["apple", "cat"], "n": 2, "sampler": "ddim", "steps": 5, "eta": 0.5, "seed": 3},
         dict(context=build_context(names, ["apple", "cat"], False, 2)[0], sampler="ddim", steps=5, eta=0.5,
              seed=3, guidance=1.0)),
        # unconditional at guidance 5 is served at guidance 1: the same images, half the rows
        ({"n": 2, "sampler": "ddpm", "steps": 5, "guidance": 5.0, "seed": 4},
         dict(context=build_context(names, None, True, 2)[0], sampler="ddpm", steps=5, guidance=5.0, seed=4)),
    ]
    for body, settings in cases:
        r = client.post("/v1/generate", json={**body, "format": "npz"})
        assert r.status_code == 200, r.text
        z = np.load(io.BytesIO(r.content))
        assert sorted(z.files) == ["images", "labels", "samples"]
        alone = generate(reference, **settings)
        assert np.abs(z["samples"] - alone.samples).max() <= 1e-5
        assert z["images"].dtype == np.uint8 and z["images"].shape == (body["n"], 16, 16, 3)
        used = json.loads(r.headers["x-mdx-settings"])
        assert used["model"] == "tiny" and used["seed"] == body["seed"]


def test_png_grid_and_defaults(client):
    from PIL import Image

    r = client.post("/v1/generate", json={"classes": ["cat"], "n": 4, **FAST})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    assert image.size == ((2 * 17 + 1) * serve.PNG_SCALE,) * 2  # 2x2 grid of 16 px with 1 px padding
    r = client.post("/v1/generate")  # no body at all: one unconditional image at the fallback settings
    assert r.status_code == 200
    used = json.loads(r.headers["x-mdx-settings"])
    assert used == {"model": "tiny", "sampler": "ddim", "steps": 25, "guidance": 1.0, "eta": 0.0, "seed": 0,
                    "n": 1, "classes": []}


def test_models_health_docs(client):
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["broken", "tiny"]  # other.onnx has no mdx metadata
    tiny = models[1]
    assert tiny["classes"] == list(h.TINY_CLASSES) and tiny["image_size"] == 16
    assert tiny["schedule"]["num_train_timesteps"] == 50
    assert tiny["recommended"]["sampler"] == "ddim" and tiny["recommended"]["steps"] == 25
    assert "error" in models[0]
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/v1/generate" in schema["paths"]
    body = schema["components"]["schemas"]["GenerateBody"]["properties"]
    assert {"model", "classes", "n", "sampler", "steps", "guidance", "eta", "seed", "format"} == set(body)


@pytest.mark.parametrize("body, field, words", [
    ({"n": 0}, "n", "n must be an integer in 1..8, got 0"),
    ({"n": 9}, "n", "1..8"),
    ({"n": "2"}, "n", "an integer"),
    ({"n": 2.5}, "n", "an integer"),
    ({"n": True}, "n", "an integer"),
    ({"steps": 0}, "steps", "an integer in 1..T"),
    ({"steps": 51, "sampler": "ddim"}, "steps", "1..50 for ddim on this model (T = 50)"),
    ({"steps": 50, "sampler": "dpmpp"}, "steps", "1..49 for dpmpp"),
    ({"guidance": -1}, "guidance", "a number in 0..20"),
    ({"guidance": 21}, "guidance", "a number in 0..20"),
    ({"guidance": "high"}, "guidance", "a number in 0..20"),
    ({"eta": 1.5, "sampler": "ddim"}, "eta", "a number in 0..1"),
    ({"eta": 0.5, "sampler": "ddpm"}, "eta", "ddim sampler only"),
    ({"seed": -1}, "seed", "an integer in 0.."),
    ({"seed": 2**64}, "seed", "an integer in 0.."),
    ({"sampler": "euler"}, "sampler", "one of ddpm, ddim, dpmpp"),
    ({"format": "gif"}, "format", "one of png, npz"),
    ({"classes": "cat"}, "classes", "a list of class names"),
    ({"classes": [1]}, "classes", "a list of class names"),
    ({"classes": ["dog"]}, "classes", "unknown class 'dog'"),
    ({"colour": "red"}, "colour", "unknown field 'colour'"),
    ({"model": 3}, "model", "a model name"),
])
def test_bad_fields_are_422_naming_the_field_and_range(client, body, field, words):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["error"]


@pytest.mark.parametrize("content, words", [
    (b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"), (b"3", "must be a JSON object"),
])
def test_malformed_bodies_are_422(client, content, words):
    r = client.post("/v1/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422 and words in r.json()["error"]


def test_unknown_and_unloadable_models(client):
    r = client.post("/v1/generate", json={"model": "nope"})
    assert r.status_code == 404 and r.json() == {"error": "unknown model 'nope'; the models are broken, tiny",
                                                 "field": "model"}
    r = client.post("/v1/generate", json={"model": "broken"})
    assert r.status_code == 500 and "model broken cannot be loaded" in r.json()["error"]
    assert client.post("/v1/generate", json={"model": "tiny.onnx", **FAST}).status_code == 200


def test_full_queue_is_429_with_retry_after():
    engine, slow = slow_engine(delay=0.0, max_rows=1, max_queue=1)
    slow.gate.clear()
    with TestClient(serve.create_app(engine, api_key="")) as c:
        first = engine.submit(serve.sample_request(engine.info, {"n": 1, **FAST})[0])
        wait_until(lambda: engine.stats().active_requests == 1)
        second = engine.submit(serve.sample_request(engine.info, {"n": 1, **FAST})[0])
        r = c.post("/v1/generate", json={"n": 1, **FAST})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "max_queue 1" in r.json()["error"]
        slow.gate.set()
        first.result(30), second.result(30)
        assert c.post("/v1/generate", json={"n": 1, **FAST}).status_code == 200


def test_request_past_its_deadline_is_504():
    engine, _ = slow_engine(delay=0.05, timeout_s=0.2)
    with TestClient(serve.create_app(engine, api_key="")) as c:
        r = c.post("/v1/generate", json={"n": 1, "sampler": "ddim", "steps": 20})
        assert r.status_code == 504 and "timed out after 0.2 s" in r.json()["error"]


def test_api_key(registry, monkeypatch):
    monkeypatch.setenv(serve.API_KEY_ENV, "s3cret")
    with TestClient(serve.create_app(registry)) as c:
        assert c.get("/healthz").status_code == 200  # open without the key
        for path in ("/v1/models", "/metrics", "/docs"):
            r = c.get(path)
            assert r.status_code == 401 and "API key" in r.json()["error"]
        assert c.post("/v1/generate", json=FAST).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "s3cret"}).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post("/v1/generate", json=FAST, headers=good).status_code == 200


def test_metrics(client):
    assert client.post("/v1/generate", json={"classes": ["cat"], "n": 2, **FAST}).status_code == 200
    text = client.get("/metrics").text
    for name in ("mdx_queue_depth", "mdx_active_rows", "mdx_denoiser_calls_total", "mdx_rows_per_call_bucket",
                 "mdx_request_latency_seconds_count", "mdx_requests_total", "mdx_http_responses_total"):
        assert name in text
    assert 'mdx_request_latency_seconds_count{model="tiny"} 1.0' in text
    assert 'mdx_denoiser_calls_total{model="tiny"} 4.0' in text
    assert 'mdx_rows_per_call_sum{model="tiny"} 8.0' in text
    assert 'mdx_http_responses_total{code="200",path="/v1/generate"} 1.0' in text


# --- load and faults on a real socket ----------------------------------------------------


async def _client_run(c, client_id: int, requests: int) -> list[int]:
    """One client's requests in turn (on its own connection of the shared pool)."""
    codes = []
    for i in range(requests):
        if (client_id + i) % 4 == 0:  # malformed requests among the good ones
            bad = [{"content": b"{oops"}, {"json": {"n": 0}}, {"json": {"classes": ["dog"]}}][client_id % 3]
            r = await c.post("/v1/generate", headers={"content-type": "application/json"}, **bad)
            assert r.status_code == 422, r.text
            codes.append(-422)
            continue
        r = await c.post("/v1/generate", json={"classes": ["apple"], "n": 1 + client_id % 2, "seed": client_id,
                                               **FAST})
        codes.append(r.status_code)
    return codes


def test_64_concurrent_clients_every_request_answered(registry):
    clients, per_client = 64, 2
    registry.config = EngineConfig(max_rows=16, max_queue=16, max_images=8)  # small queue: some 429s
    with running_server(serve.create_app(registry, api_key="")) as (base, _):
        async def everyone():
            limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
            async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
                return await asyncio.gather(*(_client_run(c, k, per_client) for k in range(clients)))

        start = time.monotonic()
        codes = [c for run in asyncio.run(everyone()) for c in run]
        elapsed = time.monotonic() - start
        assert len(codes) == clients * per_client  # none lost
        good = [c for c in codes if c != -422]
        assert set(good) <= {200, 429} and 200 in good
        health = httpx.get(f"{base}/healthz", timeout=10)  # still answering afterwards
        assert health.status_code == 200
        after = httpx.post(f"{base}/v1/generate", json={"n": 2, **FAST}, timeout=30)
        assert after.status_code == 200
        stats = registry.engine("tiny").stats()
    print(f"64 clients x {per_client}: {good.count(200)} x 200, {good.count(429)} x 429, "
          f"{codes.count(-422)} x 422 in {elapsed:.1f} s; mean rows per call {stats.mean_rows_per_call:.1f}")
    assert stats.queue_depth == 0 and stats.active_rows == 0
    assert stats.requests["ok"] == good.count(200) + 1


def test_a_client_that_disconnects_mid_request_frees_its_rows():
    engine, _ = slow_engine(delay=0.05)  # 40 steps: about 2 s
    with running_server(serve.create_app(engine, api_key="")) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"n": 4, "sampler": "ddim", "steps": 40}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: engine.stats().active_rows == 4)
        sock.close()  # the client goes away
        wait_until(lambda: engine.stats().requests["cancelled"] == 1, timeout=5)
        stats = engine.stats()
        assert stats.active_rows == 0 and stats.calls < 40
        r = httpx.post(f"{base}/v1/generate", json={"n": 1, **FAST}, timeout=30)  # still serving
        assert r.status_code == 200


def test_shutdown_finishes_requests_in_flight():
    engine, _ = slow_engine(delay=0.03)  # 20 steps: about 0.6 s
    with running_server(serve.create_app(engine, api_key="")) as (base, server):
        result = {}

        def slow_client():
            result["r"] = httpx.post(f"{base}/v1/generate", json={"n": 2, "sampler": "ddim", "steps": 20}, timeout=30)

        t = threading.Thread(target=slow_client)
        t.start()
        wait_until(lambda: engine.stats().active_requests == 1)
        server.should_exit = True  # what uvicorn's SIGTERM handler does
        t.join(30)
        assert result["r"].status_code == 200
    assert engine.closed  # the app's shutdown closed the engine after the request finished
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)


# --- the command line -------------------------------------------------------------------


def test_cli_without_the_extra_names_it(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    r = CliRunner().invoke(serve.main, ["--models-dir", str(tmp_path)])
    assert r.exit_code == 2
    assert r.output.strip() == ("mdx-serve: error: fastapi not installed; mdx-serve needs the serve extra: "
                                "pip install 'microdiffusion[serve]'")


def test_cli_bad_values(tmp_path):
    r = CliRunner().invoke(serve.main, ["--models-dir", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "models folder" in r.output and "does not exist" in r.output
    r = CliRunner().invoke(serve.main, ["--max-batch-rows", "0"])
    assert r.exit_code == 2 and "--max-batch-rows" in r.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(serve.main, ["--models-dir", str(tmp_path), "--port", str(port)])
    assert r.exit_code == 2 and f"cannot serve on 127.0.0.1:{port}" in r.output
    assert "Traceback" not in r.output


def test_mdx_serve_process_answers_and_stops_on_sigterm(models_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, serve.API_KEY_ENV: "k"}
    proc = subprocess.Popen([sys.executable, "-m", "mdx.runtime.serve", "--models-dir", str(models_dir), "--port",
                             str(port), "--provider", CPU, "--threads", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.poll() else "no start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        r = httpx.post(f"{base}/v1/generate", json={"classes": ["ball"], "n": 2, **FAST}, headers=auth, timeout=60)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err = proc.stderr.read()
    assert code == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down gracefully
    assert "serving on http://127.0.0.1" in err and "stopped; the requests in flight were answered" in err
    assert "Traceback" not in err


def test_importing_serve_loads_no_web_stack():
    """FastAPI, uvicorn, pydantic and prometheus_client load only when an app is built (the serve extra)."""
    code = ("import sys, mdx.runtime.serve, mdx.runtime.engine; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'uvicorn', 'pydantic', 'starlette', 'prometheus_client', 'httpx')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
