"""The one module that imports Ray: finding it, joining or starting a cluster, and a local multi-node
cluster for tests and benchmarks.

Ray is optional (``pip install 'mmsearch[ray]'``); without it every ``--ray`` feature raises
:class:`MissingDependencyError` saying what to install. The indexing pipeline (:mod:`mmsearch.ray_ingest`)
and the sharded search (:mod:`mmsearch.shards`) ask this module for the ``ray`` module instead of importing
it themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from mmsearch.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

#: ``--ray auto``: join the cluster this machine is part of (``ray start`` ran here, or RAY_ADDRESS).
AUTO = "auto"
#: ``--ray local``: start a Ray instance on this machine for the run (the CLI's ``--ray`` with no address).
LOCAL = "local"
#: How long an address is given to answer before ``connect`` says it cannot be reached.
REACH_TIMEOUT_SECONDS = 5.0
_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
# Ray picks the machine's routable address for a node by default; a cluster started here for a test or a
# benchmark stays on the loopback interface (this environment variable makes Ray use 127.0.0.1).
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _token_auth() -> None:
    """Make a cluster started by this process accept only processes holding a token made for it (Ray's token
    authentication), unless the user chose an authentication mode. Without one, any user of this machine
    could connect to its ports on 127.0.0.1 and run code as this user. The processes Ray starts, and those
    this one starts (a re-run of a driver in a test), inherit the token through the environment (readable
    only by this user and root)."""
    if os.environ.get(_AUTH_MODE_ENV):
        return
    os.environ[_AUTH_MODE_ENV] = "token"
    os.environ[_AUTH_TOKEN_ENV] = secrets.token_hex(32)
    if "ray" in sys.modules:  # Ray read its configuration at import: read it again
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def ray_module() -> ModuleType:
    """The ``ray`` module, or :class:`MissingDependencyError` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("ray", "distributed indexing and search (--ray)", extra="ray") from None
    return ray


def ray_data() -> ModuleType:
    """``ray.data`` (it needs pandas and pyarrow, which ``mmsearch[ray]`` brings)."""
    ray_module()
    try:
        import ray.data
    except ImportError as e:
        raise MissingDependencyError(
            e.name or "ray[data]", "distributed indexing (--ray)", extra="ray"
        ) from None
    return ray.data


def connect(address: str | None = LOCAL) -> ModuleType:
    """Join (``AUTO`` or an address such as ``ray://host:10001`` / ``host:6379``) or start (``LOCAL`` or
    None) a Ray cluster for this process, once: a process already connected keeps its cluster.

    Raises :class:`ConfigError` when the address cannot be reached."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    try:
        if address in (None, LOCAL):
            os.environ.setdefault(_LOOPBACK_ENV, "0")
            _use_loopback(ray)
            _token_auth()
            ray.init(**kwargs)
        else:
            if address != AUTO:
                _check_reachable(address)
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r}: {e}") from None
    return ray


def spans_machines() -> bool:
    """Whether the connected cluster has a live node on another machine than this process's."""
    ray = ray_module()
    here = ray.util.get_node_ip_address()
    return any(n["Alive"] and n["NodeManagerAddress"] != here for n in ray.nodes())


def _check_reachable(address: str, timeout: float = REACH_TIMEOUT_SECONDS) -> None:
    """Fail fast on an address nothing listens at: Ray itself retries for minutes before giving up."""
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"not a Ray cluster address: {address!r} (expected HOST:PORT, ray://HOST:PORT or auto)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r}: {e.strerror or e}") from None


def _use_loopback(ray: ModuleType) -> None:
    """Make the nodes this process starts announce 127.0.0.1: Ray reads the switch once, at import, so the
    already imported constant is set too (the processes it starts read the environment variable)."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def resources() -> dict[str, float]:
    """What the connected cluster holds: CPU, GPU, memory... (``ray.cluster_resources()``)."""
    return dict(ray_module().cluster_resources())


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1, *, connect_driver: bool = True) -> Iterator[Any]:
    """A cluster of ``nodes`` raylets on this machine, on loopback addresses only (Ray's own
    ``ray.cluster_utils.Cluster``), connected to this process: for tests and benchmarks. Yields the
    ``Cluster`` (``add_node`` / ``remove_node`` / ``address``); shuts it down on leaving."""
    ray = ray_module()
    from ray.cluster_utils import Cluster

    previous = {k: os.environ.get(k) for k in (_LOOPBACK_ENV, _AUTH_MODE_ENV, _AUTH_TOKEN_ENV)}
    os.environ[_LOOPBACK_ENV] = "0"  # inherited by every raylet and worker started below
    _use_loopback(ray)
    _token_auth()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False},
    )
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        if connect_driver:
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
