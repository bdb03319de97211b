"""mdx-generate --ray and mdx-serve --ray on ONE local Ray cluster: 2 CPUs, 127.0.0.1 only.

The cluster is started once for this module (start-up takes 10-50 s on a busy 2-core machine)
and shut down at its end; every test here is bounded in time. Without Ray installed, or where
a local cluster cannot start, the module is skipped with the reason.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import runtime_helpers as h
from mdx.runtime import generate as gen
from mdx.runtime import ray_cluster

pytestmark = pytest.mark.slow
LOOPBACK_HOSTS = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
FAST = ["--steps", "3"]


@pytest.fixture(scope="module")
def ray():
    """The module's local Ray cluster (2 CPUs, loopback), shut down after the last test."""
    try:
        ray_module = ray_cluster.import_ray(local=True)
    except ray_cluster.RayClusterError as e:
        pytest.skip(str(e))
    if ray_module.is_initialized():
        pytest.skip("a Ray connection is already open in this process; these tests start their own cluster")
    session = ray_cluster.connect(None, num_cpus=2)
    try:
        ray_module, _ = session.__enter__()
    except ray_cluster.RayClusterError as e:
        if "instead of 127.0.0.1" in str(e):
            raise  # it started, but not on loopback: a failure, not a skip
        pytest.skip(f"a local Ray cluster cannot start here: {e}")
    try:
        yield ray_module
    finally:
        try:
            import sys

            if "ray.serve" in sys.modules:
                sys.modules["ray.serve"].shutdown()
        finally:
            session.__exit__(None, None, None)


@pytest.fixture(scope="module")
def model_path():
    return h.cached_tiny()[1]


def invoke(main, *args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def shard_arrays(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    return h.shard_arrays(folder)


# --- the cluster ----------------------------------------------------------------------


def listening_sockets() -> list[tuple[str, object]]:
    """(process name, address) of every socket that Ray's processes (children of this one: GCS,
    raylet, workers, agents, Serve's proxy) listen on."""
    psutil = pytest.importorskip("psutil")
    listening = []
    for child in psutil.Process().children(recursive=True):
        try:
            listening += [(child.name(), c.laddr) for c in child.net_connections("inet") if c.status == "LISTEN"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return listening


def assert_loopback_only() -> list[tuple[str, object]]:
    listening = listening_sockets()
    assert listening, "found no listening socket of Ray's processes"
    outside = [(name, addr) for name, addr in listening if addr.ip not in LOOPBACK_HOSTS]
    assert not outside, f"Ray listens beyond loopback: {outside}"
    return listening


@pytest.mark.timeout(120)
def test_the_cluster_is_on_loopback_only(ray):
    assert ray_cluster.node_addresses(ray) == ["127.0.0.1"]
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray_cluster.cluster_cpus(ray) == 2
    assert_loopback_only()


# --- mdx-generate --ray ---------------------------------------------------------------


@pytest.mark.timeout(150)
def test_two_ray_workers_give_the_local_images_and_resume(ray, model_path, tmp_path):
    common = ("--model", model_path, *FAST, "-n", 10, "--shard-size", 2, "--seed", 4)
    local = invoke(gen.main, *common, "--threads", 1, "--out", tmp_path / "local")
    assert local.exit_code == 0, local.output
    # A partial Ray run (stopped after 2 shards), then the rest on Ray after one shard was lost.
    first = invoke(gen.main, *common, "--ray", "--workers", 2, "--max-shards", 2, "--out", tmp_path / "ray")
    assert first.exit_code == 0, first.output
    assert "wrote 2 shards" in first.stdout and "Ray: 2 workers" in first.stdout
    (tmp_path / "ray" / "shard-00000.npz").unlink()
    rest = invoke(gen.main, *common, "--ray", "--workers", 2, "--out", tmp_path / "ray")
    assert rest.exit_code == 0, rest.output
    assert "wrote 4 shards (8 images)" in rest.stdout and "1 already complete" in rest.stdout
    expected, got = shard_arrays(tmp_path / "local"), shard_arrays(tmp_path / "ray")
    assert list(got) == [f"shard-{k:05d}.npz" for k in range(5)] and got.keys() == expected.keys()
    for name in expected:
        for key in ("images", "labels", "samples"):
            assert got[name][key].dtype == expected[name][key].dtype
            assert got[name][key].tobytes() == expected[name][key].tobytes(), (name, key)
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    local_manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert manifest == local_manifest and all(s["done"] for s in manifest["shards"])


@pytest.mark.timeout(60)
def test_a_pool_larger_than_the_cluster_is_refused(ray, model_path, tmp_path):
    result = invoke(gen.main, "--model", model_path, *FAST, "-n", 2, "--ray", "--workers", 3,
                    "--out", tmp_path / "gen")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "mdx-generate: error: --workers 3 x --worker-cpus 1 needs 3 CPUs; the Ray cluster has 2")


@pytest.mark.timeout(90)
def test_the_generate_benchmark_runs_its_sides(ray, model_path):
    # benchmarks/generate.py needs a Ray cluster; it joins this module's (tiny settings: a check).
    from mdx.bench import generate as bench

    info = gen.OnnxDenoiser.load(model_path, threads=1).info
    settings, _ = gen.resolve_settings(info, n=4, per_class=None, classes=None, unconditional=False, sampler=None,
                                       steps=2, guidance=None, eta=0.0, seed=0, shard_size=2)
    results = bench.measure(model_path, settings, [0, 1], worker_cpus=1, repeats=1)
    assert [r["side"] for r in results["rows"]] == ["local", "ray-1"]
    assert all(r["images"] == 4 and r["images_per_s"] > 0 and r["first_shard_s"] <= r["median_s"]
               for r in results["rows"])
    assert results["rows"][0]["speedup_vs_local"] == 1.0
    text = bench.table(results)
    assert "| ray-1 | 1 x 1 |" in text and "Ray start-up" in text


# --- mdx-serve --ray ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replica_names(ray) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::mdx#mdx-engine#")}


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {seconds} s waiting for {what}")
        time.sleep(0.25)


def npz_samples(content: bytes) -> np.ndarray:
    with np.load(io.BytesIO(content)) as data:
        return data["samples"]


@pytest.mark.timeout(180)
def test_two_replicas_answer_on_loopback_and_a_killed_replica_loses_nothing(ray, model_path, tmp_path):
    httpx = pytest.importorskip("httpx")
    from mdx.runtime import ray_serve
    from mdx.runtime.engine import EngineConfig

    (tmp_path / "models").mkdir()
    shutil.copy(model_path, tmp_path / "models" / "tiny.onnx")
    port, stop, log = free_port(), threading.Event(), []
    config = EngineConfig(max_rows=32, max_queue=64, max_images=64)
    service = threading.Thread(target=ray_serve.serve_on_ray, args=(tmp_path / "models",), kwargs=dict(
        use_ray=True, host="127.0.0.1", port=port, provider="auto", threads=None, config=config, api_key="k3y",
        address=None, replicas=2, autoscale=None, replica_cpus=1, log=log.append, stop=stop), daemon=True)
    service.start()
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k3y"}
    try:
        wait_for(lambda: any("serving on" in line for line in log) or not service.is_alive(), 120, "the deployment")
        assert service.is_alive(), log
        assert "2 replicas x 1 CPU" in log[0] and f"http://127.0.0.1:{port}" in log[0]
        assert any(addr.port == port and addr.ip in LOOPBACK_HOSTS for _, addr in assert_loopback_only())
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/healthz").json()["status"] == "ok"
            assert client.get("/v1/models").status_code == 401  # the driver's key reached the replicas
            assert [m["name"] for m in client.get("/v1/models", headers=auth).json()["models"]] == ["tiny"]
        killed, responses = kill_a_replica_under_load(ray, url, auth, httpx)
        assert [r.status_code for r in responses] == [200] * len(responses), [r.text[:200] for r in responses]
        tries = [int(r.headers["x-mdx-tries"]) for r in responses]
        retried = [r for r, t in zip(responses, tries) if t > 1]
        assert retried, f"no request was held by the killed replica (tries {tries})"
        assert all(r.headers["x-mdx-replica"] != killed for r in retried)
        # Ray replaces the replica; a retried request gives the images it would have given at once.
        wait_for(lambda: len(replica_names(ray)) == 2 and not any(n.endswith(killed) for n in replica_names(ray))
                 and ray_serve.running_replicas() == 2, 90, "Ray Serve to replace the killed replica")
        with httpx.Client(base_url=url, timeout=60, headers=auth) as client:
            again = client.post("/v1/generate", json=json.loads(retried[0].request.content))
            assert again.status_code == 200 and int(again.headers["x-mdx-tries"]) == 1
            assert npz_samples(again.content).tobytes() == npz_samples(retried[0].content).tobytes()
    finally:
        stop.set()
        service.join(60)
    assert not service.is_alive() and log[-1] == "stopped; the deployment was removed"


def kill_a_replica_under_load(ray, url: str, auth: dict, httpx) -> tuple[str, list]:
    """8 concurrent requests (each fills max_rows 32 alone: 16 guided images, so its denoiser calls
    do not depend on the others, and each replica works through its share one after another);
    one replica is killed as soon as the first response is back, while both still hold some.
    Returns (the killed replica's id, the responses)."""
    before = sorted(replica_names(ray))
    bodies = [{"n": 16, "steps": 40, "classes": ["apple"], "guidance": 2.0, "seed": seed, "format": "npz"}
              for seed in range(8)]
    with httpx.Client(base_url=url, timeout=120, headers=auth) as client, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.post, "/v1/generate", json=body) for body in bodies]
        wait(futures, timeout=90, return_when=FIRST_COMPLETED)
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        assert not all(f.done() for f in futures), "the requests finished before the kill; make them longer"
        responses = [f.result() for f in futures]
    return before[0].rsplit("#", 1)[1], responses


@pytest.mark.parametrize("args, fragment", [
    (["--replicas", "2"], "--replicas apply to --ray only"),
    (["--ray", "--replicas", "2", "--autoscale", "1:2"], "not both"),
    (["--ray", "--autoscale", "3:1"], "need 0 <= MIN <= MAX"),
    (["--ray", "--autoscale", "many"], "give MIN:MAX replicas"),
    (["--ray", "--threads", "2"], "each replica runs --replica-cpus threads"),
    (["--ray", "--replica-cpus", "0"], "--replica-cpus 0: must be at least 1"),
    (["--ray", "--replicas", "0"], "--replicas 0: must be at least 1"),
])
def test_mdx_serve_ray_options_are_checked_before_ray_starts(tmp_path, args, fragment):
    pytest.importorskip("fastapi")
    from mdx.runtime import serve

    (tmp_path / "models").mkdir()
    result = CliRunner().invoke(serve.main, ["--models-dir", str(tmp_path / "models"), *args])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("mdx-serve: error: ") and fragment in line and "Traceback" not in result.output
