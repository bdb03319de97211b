"""mdx-generate --ray and mdx-serve --ray on ONE local Ray cluster: 2 CPUs, 127.0.0.1 only.

The cluster is started once for this module (start-up takes 10-50 s on a busy 2-core machine)
and shut down at its end; every test here is bounded in time. Without Ray installed, or where
a local cluster cannot start, the module is skipped with the reason.
"""

from __future__ import annotations

import json
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
    found = {}
    for path in sorted(folder.glob("shard-*.npz")):
        with np.load(path) as data:
            found[path.name] = {k: data[k] for k in data.files}
    return found


# --- the cluster ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_cluster_is_on_loopback_only(ray):
    assert ray_cluster.node_addresses(ray) == ["127.0.0.1"]
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray_cluster.cluster_cpus(ray) == 2
    psutil = pytest.importorskip("psutil")
    # Every socket that Ray's processes (children of this one: GCS, raylet, workers, agents) listen on.
    listening = []
    for child in psutil.Process().children(recursive=True):
        try:
            listening += [(child.name(), c.laddr) for c in child.net_connections("inet") if c.status == "LISTEN"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert listening, "found no listening socket of Ray's processes"
    outside = [(name, addr) for name, addr in listening if addr.ip not in LOOPBACK_HOSTS]
    assert not outside, f"Ray listens beyond loopback: {outside}"


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
