"""Where the work runs: an existing Ray cluster (``RAY_ADDRESS``) or an in-process local Ray.

Also how much of Ray's own output reaches the terminal. By default (quiet) Ray's info lines and
warnings are kept off it: the driver's ``ray`` loggers show errors only; Ray Data draws no
progress bars and its console shows errors only (its log file in the Ray session folder keeps
everything); Ray Train logs at WARNING and its workers' consoles show warnings and errors (no
per-rank "Reporting training result" dictionaries; Ray Train's log files keep everything).
Errors are always shown, and so are the workers' own warnings (``log_to_driver`` stays on).
``set_verbose(True)`` (``rnnimg -v``, ``RNNIMG_VERBOSE=1``) brings Ray's output back.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

log = logging.getLogger("rnnimg")

VERBOSE_ENV = "RNNIMG_VERBOSE"  # "1": Ray's own logs, warnings and progress bars are shown (inherited by child processes)


def set_verbose(verbose: bool) -> None:
    """Show Ray's own logs, warnings and progress bars (``rnnimg -v``) or keep them out of the output (default).

    Call it before Ray starts: ``ensure_ray`` applies it to ``ray.init``.
    """
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


def verbose() -> bool:
    """Whether Ray's own output is shown (``set_verbose``, or ``RNNIMG_VERBOSE=1`` in the environment)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def ray_train_log_level() -> str:
    """Ray Train's ``LoggingConfig`` level: INFO when verbose, else WARNING (its INFO lines are per-rank reports)."""
    return "INFO" if verbose() else "WARNING"


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """A logger's handlers that write to a terminal stream, not to a log file."""
    return [h for h in logger.handlers if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler"]


def quiet_worker_console(verbose_: bool, logger: logging.Logger | None = None) -> None:
    """In a Ray Train worker: its console (what ``log_to_driver`` shows on the driver) at WARNING unless verbose.

    Ray Train gives a worker's root logger (``logger``'s default) a console handler at INFO. Ray
    2.60's per-rank "Reporting training result ... metrics={...}" line goes there: its logger is
    named after its file, outside ``ray.train``, so ``LoggingConfig`` does not reach it. Ray Train's
    log files (``logs/train/`` of the Ray session) keep every level.
    """
    for handler in _console_handlers(logger or logging.getLogger()):
        handler.setLevel(logging.NOTSET if verbose_ else logging.WARNING)


class _ErrorsOnly(logging.Filter):
    """On Ray Data's console handler while quiet: its errors pass, its info lines and warnings stay in its log file.

    Only Ray Data's records are held back: a console handler can be shared with other loggers (a
    test runner's capture handler, an application's root handler), and their records pass untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not (record.name == "ray.data" or record.name.startswith("ray.data."))


def quiet_ray_data() -> None:
    """Apply ``verbose()`` to Ray Data, if imported: its progress bars, and what its console handler shows.

    Ray Data's ``ray.data`` logger does not propagate to ``ray``'s and has a console handler of
    its own (INFO); its file handler keeps everything either way. ``RAY_DATA_DISABLE_PROGRESS_BARS``
    in the environment wins over ``verbose()`` for the bars.
    """
    if "ray.data" not in sys.modules:
        return
    import ray.data

    if "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ:
        ray.data.DataContext.get_current().enable_progress_bars = verbose()
    for handler in _console_handlers(logging.getLogger("ray.data")):
        for existing in [f for f in handler.filters if isinstance(f, _ErrorsOnly)]:
            handler.removeFilter(existing)
        if not verbose():
            handler.addFilter(_ErrorsOnly())


# Lines Ray's worker processes print on stderr that are notices about Ray itself, not errors of the
# job. A quiet run keeps them off the driver's console (the workers' log files keep them).
WORKER_NOTICES = (
    # Ray core, logged at ERROR by the process that creates Ray Data's actor pool (the label job's
    # coordinator actor) for each replica: restarting an actor whose constructor arguments are in
    # the object store may fail if they are lost. Ray Data replaces lost replicas itself.
    r"has constructor arguments in the object store and max_restarts > 0",
)


def quiet_worker_notices() -> None:
    """Keep ``WORKER_NOTICES`` out of what the driver prints of its workers' output, unless verbose.

    Ray's driver passes every forwarded worker line through its log deduplicator, whose skip
    pattern (``RAY_DEDUP_LOGS_SKIP_REGEX``, read when Ray is imported) drops lines. A pattern the
    user set is left alone; with ``RAY_DEDUP_LOGS=0`` nothing is filtered.
    """
    import re

    try:
        from ray._private import ray_logging
    except ImportError:  # a Ray without it: its output stays as it is
        return
    dedup = getattr(ray_logging, "stderr_deduplicator", None)
    if dedup is None or not hasattr(dedup, "skip_re"):
        return
    ours = re.compile("|".join(WORKER_NOTICES))
    if verbose():
        if dedup.skip_re is not None and dedup.skip_re.pattern == ours.pattern:
            dedup.skip_re = None
    elif dedup.skip_re is None:
        dedup.skip_re = ours


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

    quiet_ray_data()
    quiet_worker_notices()
    if ray.is_initialized():
        return
    # The driver's own ``ray`` loggers; a quiet run shows errors only (e.g. no "token authentication" notice).
    logging_level = logging.INFO if verbose() else logging.ERROR
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_ray_address(address)
        try:
            ray.init(address=address, log_to_driver=True, logging_level=logging_level)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            raise ClusterUnreachable(f"cannot reach the Ray cluster at {address!r}: {err}") from err
        log.info("connected to Ray cluster at %s", address)
        return
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging_level,
    )
