"""What the rnnimg flows share: location parameters, retry policy, Ray connection, artifact helpers.

Not a flow. ``flows/*.py`` import it as a sibling module (Prefect puts the flow file's folder on
``sys.path`` while it loads an entrypoint; ``python flows/x.py`` does the same).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Annotated

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from pydantic import AfterValidator, Field

from rnnimg import storage
from rnnimg.runtime import ClusterUnreachable


def _location(value: str) -> str:
    """A local path, file:// or s3://bucket/prefix, with no unresolved prefect.yaml placeholder."""
    if "{{" in value or "}}" in value:
        raise ValueError(
            f"{value!r} holds an unresolved prefect.yaml placeholder: set the environment variable it names "
            "(e.g. RNNIMG_STORE) before `prefect deploy`, or pass the location when starting the run"
        )
    storage.normalize(value)  # ValueError: "unsupported location ...: use a local path, file:// or s3://bucket/prefix"
    return value


Location = Annotated[str, Field(min_length=1), AfterValidator(_location)]
"""A flow parameter naming a location: validated when the run starts, before any work."""


# Errors a retry cannot fix: bad input, a missing file, no permission, no cluster.
PERMANENT: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, ClusterUnreachable)


def transient(task, task_run, state) -> bool:
    """``retry_condition_fn`` of I/O tasks: retry storage hiccups and lost workers, not bad input nor another writer."""
    from rnnimg.label import LabelError
    from rnnimg.store_lock import LockHeld, LockLost

    try:
        state.result()
    except (*PERMANENT, LabelError, LockHeld, LockLost):
        return False
    except Exception:  # noqa: BLE001 - anything else (storage, a lost Ray node) may pass on retry
        return True
    return False


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run; a plain logger when a task's ``.fn`` is called directly."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rnnimg.flows")


@task(name="connect-ray")
def connect_ray(address: str | None) -> str:
    """Connect this flow run to the cluster (``address``, else ``RAY_ADDRESS``) or start a local Ray.

    Returns:
        What it connected to (the address, or ``local``).

    Raises:
        ClusterUnreachable: the named cluster does not answer (within seconds).
    """
    from rnnimg.runtime import ensure_ray

    ensure_ray(address)  # checks that a named cluster answers, within seconds
    return address or os.environ.get("RAY_ADDRESS") or "local"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from free text."""
    text = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    return re.sub(r"-+", "-", text)[-100:].strip("-") or "rnnimg"


def location_link(location: str) -> str:
    """A link for a link artifact: ``s3://...`` as is, a local folder as ``file://``."""
    return location if storage.is_s3(location) else "file://" + storage.normalize(location)


def markdown_table(rows: list[dict], columns: list[str], formats: dict[str, str] | None = None) -> str:
    """A Markdown table of ``rows`` (missing values left blank)."""
    formats = formats or {}

    def cell(value, column):
        if value is None:
            return ""
        return formats.get(column, "{}").format(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
