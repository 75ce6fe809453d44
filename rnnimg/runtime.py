"""Where the work runs: an existing Ray cluster (``RAY_ADDRESS``) or an in-process local Ray."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("rnnimg")


class ClusterUnreachable(RuntimeError):
    """``RAY_ADDRESS`` (or the address given) names a cluster that cannot be reached."""


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
