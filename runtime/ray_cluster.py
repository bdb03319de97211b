"""Connect to Ray for mdx-generate --ray and mdx-serve --ray: join a cluster, or start a local one
on 127.0.0.1 only.

Ray is an optional extra (`pip install 'microdiffusion[ray]'`) and is imported here lazily, so
the runtime's base install stays small (docs/contract.md, layering).

A local Ray cluster takes the machine's network address as its node address by default and
binds its GCS, raylet and agents there. A local cluster should not be reachable from the
network, so before Ray is imported the environment variable RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is
set to 0, which makes Ray use the loopback address for the node (Ray reads it once, at import);
`ray.init(_node_ip_address="127.0.0.1")` alone is turned back into the network address. After the
start, every node's address is checked, and a cluster that is not on loopback is shut down again
with an error.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

LOOPBACK = "127.0.0.1"
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
INSTALL_HINT = "pip install 'microdiffusion[ray]'"


class RayClusterError(ValueError):
    """Ray is missing, or the cluster cannot be reached or started; the message says which."""


def import_ray(local: bool):
    """`import ray`, with the loopback setting first when this process will start a local cluster."""
    if local and "ray" not in sys.modules:
        os.environ[_LOCAL_ONLY_ENV] = "0"
    if local:
        # Ray >= 2.5x turns token authentication on for a new local cluster and warns that it
        # did; asking for it explicitly keeps it on, without the warning.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
    except ImportError:
        raise RayClusterError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def node_addresses(ray) -> list[str]:
    """The address of every live node of the connected cluster."""
    return [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]


def _check_loopback(ray) -> None:
    outside = [a for a in node_addresses(ray) if a != LOOPBACK]
    if outside:
        ray.shutdown()
        raise RayClusterError(f"the local Ray cluster bound {', '.join(outside)} instead of {LOOPBACK} "
                              f"(start this command in a fresh process, or set {_LOCAL_ONLY_ENV}=0 "
                              "before Ray is imported)")


def _init(ray, address: str | None, num_cpus: int | None) -> None:
    kwargs = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, _node_ip_address=LOOPBACK, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayClusterError(f"cannot connect to {where}: {first}") from None


@contextlib.contextmanager
def connect(address: str | None = None, num_cpus: int | None = None) -> Iterator[tuple[object, float]]:
    """Yield (the ray module, seconds it took to connect).

    address None: start a local cluster on 127.0.0.1 with `num_cpus` CPUs (None: all), stopped
    at the end. An address ("auto", "HOST:6379", "ray://HOST:10001"): join that cluster, and only
    disconnect at the end. A connection this process already holds (`ray.is_initialized()`, as
    in the tests' shared cluster) is used as it is and left running.
    """
    ray = import_ray(local=address is None)
    if ray.is_initialized():
        yield ray, 0.0
        return
    start = time.perf_counter()
    _init(ray, address, num_cpus)
    seconds = time.perf_counter() - start
    try:
        if address is None:
            _check_loopback(ray)
        yield ray, seconds
    finally:
        ray.shutdown()


def cluster_cpus(ray) -> int:
    """Whole CPUs the connected cluster has in all."""
    return int(ray.cluster_resources().get("CPU", 0))
