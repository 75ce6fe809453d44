"""Where the work runs: an existing Ray cluster (``RAY_ADDRESS``) or an in-process local Ray."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("rnnimg")


class ClusterUnreachable(RuntimeError):
    """``RAY_ADDRESS`` (or the address given) names a cluster that cannot be reached."""


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds when ``address`` (default ``RAY_ADDRESS``) names a cluster that does not answer.

    ``ray.init`` keeps retrying an unreachable cluster for minutes (Ray 2.60); one TCP connect
    tells at once. ``auto``/``local`` and no address at all are left to ``ray.init``.

    Raises:
        ClusterUnreachable: nothing answers there, or the address is not host:port / ray://host:port.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"cannot reach the Ray cluster at {address!r}: expected host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterUnreachable(f"cannot reach the Ray cluster at {address!r}: {err}") from err


def ensure_ray(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Connect to Ray once per process.

    Args:
        address: a cluster address (``ray://host:10001``, ``host:6379`` or ``auto``); default
            ``RAY_ADDRESS``; with neither, a local Ray starts inside this process.
        num_cpus: CPUs of a local Ray (default: all of this machine's).
        object_store_memory: bytes of a local Ray's object store (default: Ray's choice).

    Raises:
        ClusterUnreachable: the named cluster did not answer.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_ray_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            raise ClusterUnreachable(f"cannot reach the Ray cluster at {address!r}: {err}") from err
        log.info("connected to Ray cluster at %s", address)
        return
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
