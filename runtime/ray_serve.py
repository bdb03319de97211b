"""mdx-serve --ray: the same HTTP API as mdx-serve, served by Ray Serve replicas.

    mdx-serve --ray                                  # a local Ray cluster on 127.0.0.1, 1 replica per CPU
    mdx-serve --ray --replicas 2 --replica-cpus 1
    mdx-serve --ray --autoscale 1:8 --address auto --host 0.0.0.0   # join a running cluster

Two deployments make the application. `mdx-engine`: each replica one Ray actor holding the app
of mdx.runtime.serve (`create_app`) over its own `ModelRegistry`, i.e. one batching engine (one
ONNX Runtime session) per model, whose intra-op threads are the replica's CPUs
(`--replica-cpus`; ONNX Runtime does not read OMP_NUM_THREADS). `mdx-router`: the HTTP ingress
(`serve.ingress`, 0 CPUs), which hands each request whole to an engine replica through a
deployment handle (Ray Serve picks the less busy of two) and, when that replica dies while it
holds the request, sends it to another: a request's response depends only on its body (its
seed), so the retry is exact. The Serve controller replaces the dead replica meanwhile.
Ray Serve alone would answer those requests with a bare "500 Internal Server Error".
/metrics reports the engine replica that answered it.

The models' bytes are read here and travel with the deployment, so cluster nodes need no shared
folder (the replicas serve the files as they were at start; restart to serve new ones).

Without --address a local cluster starts on 127.0.0.1 only (mdx.runtime.ray_cluster) and stops
with this command; with it, the deployment joins that cluster and is deleted again when this
command stops (Ctrl+C or SIGTERM). Serve's HTTP proxy listens on --host:--port (127.0.0.1 by
default; a Serve instance that already runs on the joined cluster keeps its own address).
Ray is imported lazily: `pip install 'microdiffusion[ray]'`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from mdx.runtime.contract import read_metadata
from mdx.runtime.ray_cluster import LOOPBACK
from mdx.runtime.engine import EngineConfig
from mdx.runtime.serve import ServeError  # serve.py imports FastAPI lazily too

APP_NAME = "mdx"  # the Serve application
ENGINE_NAME, ROUTER_NAME = "mdx-engine", "mdx-router"  # its deployments


class RayServeError(ServeError):
    """A bad --ray option, a models folder without models, or a cluster that cannot be reached;
    mdx-serve reports it in one line."""


# --- options --------------------------------------------------------------------------


def parse_autoscale(text: str) -> tuple[int, int]:
    """--autoscale "MIN:MAX" -> (MIN, MAX) with 0 <= MIN <= MAX and MAX >= 1."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise RayServeError(f"--autoscale {text!r}: give MIN:MAX replicas, e.g. 1:4")
    low, high = int(parts[0]), int(parts[1])
    if high < 1 or low > high:
        raise RayServeError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def model_files(models_dir: Path) -> dict[str, bytes]:
    """file name -> bytes of every mdx model (mdx.format metadata) in the folder."""
    found = {}
    for path in sorted(Path(models_dir).glob("*.onnx")):
        try:
            if "mdx.format" not in read_metadata(path):
                continue  # e.g. mdx-eval's classifier
            found[path.name] = path.read_bytes()
        except (OSError, ValueError) as e:
            raise RayServeError(f"cannot read the model {path}: {e}") from None
    if not found:
        raise RayServeError(f"no mdx models in {models_dir}: export one there with mdx-export")
    return found


# --- the replicas ---------------------------------------------------------------------


def _replica_grpc_on_loopback() -> None:
    """On a local cluster, make this replica's inter-deployment gRPC server listen on 127.0.0.1.

    Ray Serve 2.60 replicas open that server on "[::]:0", every interface, whatever the node's
    address (ray/serve/_private/replica.py, `_on_initialized`, after the user's constructor). On
    a node whose address is 127.0.0.1 nothing outside can use it anyway, so this rewrites the
    address the replica module passes to `add_port_to_grpc_server`. On a real cluster (another
    node address) other nodes must reach it, and Ray's choice stays. Other Ray versions without
    that name are left alone; tests/runtime/test_ray.py checks every listening socket.
    """
    import ray
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "mdx_loopback", False):
        return
    if ray.util.get_node_ip_address() != LOOPBACK:
        return

    def on_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = f"{LOOPBACK}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    on_loopback.mdx_loopback = True
    replica.add_port_to_grpc_server = on_loopback


async def call_asgi(app, request: dict) -> tuple[int, list, bytes]:
    """Run one whole HTTP request (method, path, query_string, headers, body, client) through an
    ASGI app in this process; returns (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
             "method": request["method"], "path": request["path"], "raw_path": request["path"].encode(),
             "query_string": request["query_string"], "root_path": "", "headers": request["headers"],
             "client": request.get("client"), "server": None}
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        # After the body the client stays connected (the app polls for a disconnect); when the
        # client does leave, Ray cancels this call, which ends the wait.
        await asyncio.Event().wait()

    response: dict = {"status": 500, "headers": [], "body": []}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            response["status"], response["headers"] = message["status"], list(message.get("headers") or [])
        elif message["type"] == "http.response.body":
            response["body"].append(message.get("body", b""))

    await app(scope, receive, send)
    return response["status"], response["headers"], b"".join(response["body"])


class MdxReplica:
    """One engine replica: the models in a private folder, an engine per model (ModelRegistry), and
    mdx-serve's app (create_app), which `handle` runs for each request the router forwards."""

    def __init__(self, models: dict[str, bytes], provider: str, threads: int, config: EngineConfig,
                 api_key: str | None) -> None:
        from mdx.runtime.serve import ModelRegistry, create_app

        _replica_grpc_on_loopback()
        self._folder = Path(tempfile.mkdtemp(prefix="mdx-serve-replica-"))
        for name, data in models.items():
            (self._folder / name).write_bytes(data)
        self.registry = ModelRegistry(self._folder, provider=provider, config=config, threads=threads)
        # api_key "" rather than None: the key was read where mdx-serve runs; replicas (on other
        # nodes, perhaps) do not read MDX_API_KEY themselves.
        self.app = create_app(self.registry, api_key=api_key or "")
        self.replica_id = _replica_id()

    async def handle(self, request: dict) -> tuple[int, list, bytes]:
        """One forwarded request; the response says which replica answered (X-MDX-Replica)."""
        status, headers, body = await call_asgi(self.app, request)
        return status, [*headers, (b"x-mdx-replica", self.replica_id.encode())], body

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose folder is gone cannot load models."""
        if not self._folder.is_dir():
            raise RuntimeError(f"the replica's model folder {self._folder} is gone")

    def __del__(self) -> None:
        # Serve tears the replica down after its requests finished (graceful shutdown).
        registry = getattr(self, "registry", None)
        if registry is not None:
            registry.close(drain=False, timeout=0)
        shutil.rmtree(getattr(self, "_folder", ""), ignore_errors=True)


def _replica_id() -> str:
    """This replica's id (the end of its actor name, SERVE_REPLICA::app#deployment#id)."""
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message, "field": None}).encode()


class MdxRouter:
    """The HTTP ingress (0 CPUs): forwards each request whole to an engine replica, and retries it
    on another when the replica dies under it. A request's images depend only on its body (its
    seed), so a retried request gives the same response; after RETRIES failed tries the client
    gets a JSON 503 that says why. X-MDX-Tries in the response counts the tries."""

    RETRIES = 2

    def __init__(self, engine) -> None:
        _replica_grpc_on_loopback()
        self.engine = engine  # a DeploymentHandle to the MdxReplica deployment

    def __serve_build_asgi_app__(self):
        return _AsgiApp(self.asgi)

    async def asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, headers, body = await self.forward(scope, await _read_body(receive))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def forward(self, scope, body: bytes) -> tuple[int, list, bytes]:
        from ray.exceptions import RayActorError

        request = {"method": scope["method"], "path": scope["path"], "query_string": scope.get("query_string", b""),
                   "headers": list(scope.get("headers") or []), "body": body, "client": scope.get("client")}
        for attempt in range(1, self.RETRIES + 2):
            try:
                status, headers, body = await self.engine.handle.remote(request)
                return status, [*headers, (b"x-mdx-tries", str(attempt).encode())], body
            except RayActorError as e:  # the replica died (or became unreachable) while it held the request
                reason = type(e).__name__
        message = (f"the request failed {self.RETRIES + 1} times because the replica serving it died ({reason}); "
                   "Ray Serve is replacing it: retry shortly (the same body gives the same images)")
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"2"),
                   (b"x-mdx-tries", str(self.RETRIES + 1).encode())]
        return 503, headers, _error_body(message)


class _AsgiApp:
    """An ASGI 3 app around a coroutine (uvicorn, under Ray Serve, takes a bound method for ASGI 2)."""

    def __init__(self, handler) -> None:
        self.handler = handler

    async def __call__(self, scope, receive, send) -> None:
        await self.handler(scope, receive, send)


async def _read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def build_app(models: dict[str, bytes], *, provider: str = "auto", replica_cpus: int = 1,
              config: EngineConfig | None = None, api_key: str | None = None, replicas: int | None = 1,
              autoscale: tuple[int, int] | None = None):
    """The Serve application: the router (ingress) bound to the engine replicas, `replicas` of
    them, or autoscaling within `autoscale`.

    An engine replica takes up to max_rows + max_queue requests at once (its engine batches them
    step by step and answers 429 beyond); autoscaling aims at max_rows / 2 per replica.
    """
    from ray import serve

    config = config or EngineConfig()
    options = {"name": ENGINE_NAME, "ray_actor_options": {"num_cpus": replica_cpus},
               "max_ongoing_requests": config.max_rows + config.max_queue}
    if autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "initial_replicas": max(autoscale[0], 1),
                                         "target_ongoing_requests": max(1, config.max_rows // 2)}
    else:
        options["num_replicas"] = replicas
    engine = serve.deployment(MdxReplica, **options).bind(models, provider, replica_cpus, config, api_key)
    router = serve.deployment(serve.ingress()(MdxRouter), name=ROUTER_NAME, num_replicas=1,
                              ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
    return router.bind(engine)


def deploy(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start Serve's HTTP proxy on host:port (if Serve is not running yet) and deploy `app` at /;
    returns when its replicas run."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    # serve.run connects to the Serve just started and logs that new HTTP options would not apply.
    serve_logger = logging.getLogger("ray.serve")
    level = serve_logger.level
    serve_logger.setLevel(logging.WARNING)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    finally:
        serve_logger.setLevel(level)


def running_replicas(deployment: str = ENGINE_NAME, app_name: str = APP_NAME) -> int:
    """How many replicas of the deployment are RUNNING now (Serve's view; it notices a death
    within a few health-check periods)."""
    from ray import serve

    status = serve.status().applications.get(app_name)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


# --- the command's Ray path -----------------------------------------------------------


def _wait_for_signal(stop: threading.Event | None = None) -> None:
    """Block until Ctrl+C or SIGTERM, or until `stop` is set (when given: no signal handler, so
    another thread may run the service)."""
    if stop is not None:
        stop.wait()
        return
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_fits(ray, replicas: int | None, autoscale: tuple[int, int] | None, replica_cpus: int) -> int:
    """The replicas to start; refuses a fixed count the cluster's CPUs cannot hold (Serve would
    wait for them forever). Default (neither given): one replica per replica_cpus CPUs."""
    from mdx.runtime.ray_cluster import cluster_cpus

    cpus = cluster_cpus(ray)
    if replicas is None and autoscale is None:
        replicas = max(1, cpus // replica_cpus)
    wanted = replicas if autoscale is None else max(autoscale[0], 1)
    if wanted * replica_cpus > cpus:
        raise RayServeError(f"{wanted} replicas x --replica-cpus {replica_cpus} need {wanted * replica_cpus} CPUs; "
                            f"the Ray cluster has {cpus}")
    return replicas


def run_ray_serve(models_dir: Path, *, host: str, port: int, provider: str, config: EngineConfig,
                  api_key: str | None, address: str | None, replicas: int | None, autoscale: tuple[int, int] | None,
                  replica_cpus: int, log: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """mdx-serve --ray: deploy, serve until Ctrl+C / SIGTERM (or `stop`), then remove the
    deployment (and stop the local cluster, when this command started it)."""
    from mdx.runtime.ray_cluster import connect

    from mdx.runtime.serve import bind_socket

    models = model_files(models_dir)
    if address is None:
        bind_socket(host, port).close()  # a port taken here is one clear line, before Ray starts
    with connect(address) as (ray, startup):
        replicas = check_fits(ray, replicas, autoscale, replica_cpus)
        from ray import serve

        start = time.perf_counter()
        deploy(build_app(models, provider=provider, replica_cpus=replica_cpus, config=config, api_key=api_key,
                         replicas=replicas, autoscale=autoscale), host, port)
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster on 127.0.0.1"
        scale = (f"{replicas} replica{'s' if replicas != 1 else ''}" if autoscale is None
                 else f"{autoscale[0]}..{autoscale[1]} replicas (autoscaling)")
        log(f"{len(models)} model(s) ({', '.join(Path(m).stem for m in models)}) on {where} (connected in "
            f"{startup:.1f} s), {scale} x {replica_cpus} CPU, deployed in {time.perf_counter() - start:.1f} s; "
            f"serving on http://{host}:{port} (Ctrl+C stops)")
        try:
            _wait_for_signal(stop)
        finally:
            if address is None:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
    log("stopped; the deployment was removed")


def serve_on_ray(models_dir: Path, *, use_ray: bool, host: str, port: int, provider: str, threads: int | None,
                 config: EngineConfig, api_key: str | None, address: str | None, replicas: int | None,
                 autoscale: str | None, replica_cpus: int | None, log: Callable[[str], None],
                 stop: threading.Event | None = None) -> None:
    """mdx-serve's --ray options, checked, then `run_ray_serve`."""
    from mdx.runtime.ray_cluster import RayClusterError

    given = [o for o, v in (("--replicas", replicas), ("--autoscale", autoscale), ("--address", address),
                            ("--replica-cpus", replica_cpus)) if v is not None]
    if not use_ray:
        raise RayServeError(f"{', '.join(given)} apply to --ray only")
    if replicas is not None and autoscale is not None:
        raise RayServeError("give --replicas N or --autoscale MIN:MAX, not both")
    if threads is not None:
        raise RayServeError("--threads does not apply to --ray: each replica runs --replica-cpus threads")
    for option, value in (("--replicas", replicas), ("--replica-cpus", replica_cpus)):
        if value is not None and value < 1:
            raise RayServeError(f"{option} {value}: must be at least 1")
    bounds = parse_autoscale(autoscale) if autoscale is not None else None
    try:
        run_ray_serve(models_dir, host=host, port=port, provider=provider, config=config, api_key=api_key,
                      address=address, replicas=replicas, autoscale=bounds, replica_cpus=replica_cpus or 1, log=log,
                      stop=stop)
    except RayClusterError as e:
        raise RayServeError(str(e)) from None
