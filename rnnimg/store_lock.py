"""One writer at a time per output location: a lease kept in the store itself.

    with StoreLock(base, owner="flow run abc") as lock:
        ...             # write under base
        lock.check()    # before recording results: raises LockLost if another run took over

The lock of ``BASE`` is ``BASE/_lock/lock-NNNNNNNN.json``, created with
``rnnimg.storage.create_if_absent`` (an atomic hard link locally; on S3 s3fs's exclusive create,
a ``PutObject`` with ``If-None-Match: *`` that the store decides). ``NNNNNNNN``, the generation,
is the fencing token: ``lock.generation`` while held, and ``lock.check()`` fails once a newer
generation exists. Ages are measured with the store's clock (the lock file's modification time
against that of a probe written now), never a host's clock.
Taken by every labelling run (``rnnimg.label.label``, so ``rnnimg label`` and the flows) on its
output, and by the ``label-videos`` flow on its base; needs neither Prefect nor Ray.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from rnnimg import storage

log = logging.getLogger("rnnimg.store_lock")


class LockHeld(RuntimeError):
    """Another run holds the lock of this output."""


class LockLost(RuntimeError):
    """This run's lock was taken over (it had gone stale); its results are not recorded."""


def _unreadable() -> dict:
    """What an unreadable lock file stands for: a lock held by someone unknown (judged by its age alone)."""
    return {"owner": "unknown (unreadable lock file)"}


def _dead_here(record: dict) -> bool:
    """Whether a lock's holder was a process of this machine that no longer exists.

    Such a lock (a run killed with ``kill -9``) is free at once, so that rerunning the command
    resumes without waiting ``stale_after_s``. A holder on another host is judged by its age only.
    """
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


@dataclass(frozen=True)
class Fence:
    """The fencing token of a held lock, small and picklable: a worker writing on the holder's
    behalf checks it before each commit, as the holder's ``StoreLock.check`` does."""

    base: str
    generation: int
    token: str

    def check(self) -> None:
        """Raise LockLost unless ``generation`` is still the newest lock of ``base`` and carries ``token``.

        Raises:
            LockLost: another run took the lock over.
        """
        folder = storage.join(self.base, "_lock")
        try:
            names = [storage.basename(f.uri) for f in storage.list_files(folder, (".json",))]
        except FileNotFoundError:
            names = []
        generations = sorted(int(n[5:-5]) for n in names if n.startswith("lock-") and n[5:-5].isdigit())
        record = None
        if generations and generations[-1] == self.generation:
            try:
                record = storage.read_json(storage.join(folder, f"lock-{self.generation:08d}.json"))
            except (FileNotFoundError, ValueError):
                record = None
        if not record or record.get("token") != self.token:
            raise LockLost(f"{self.base}: this run's lock was taken over by another run; its results are not recorded")


class StoreLock:
    """One writer at a time under a base location, with a lock object in the store itself.

    The lock is a sequence of files ``BASE/_lock/lock-<generation>.json``; the highest
    generation is the lock. It is free when absent, released, or stale (not refreshed for
    ``stale_after_s``). Taking it means creating the next generation with create-if-absent: two
    runs that saw the same state race for the same name and only one wins, including when both
    take over a stale lock. The holder refreshes its file every ``heartbeat_s`` in a thread, so
    a long run keeps the lock and a crashed one loses it after ``stale_after_s`` (at once when the
    crashed holder was a process of this machine: its pid is gone).

    Staleness is measured with the store's clock only: the age of the lock is the store's
    current time (the modification time of a probe object written now under ``BASE/_lock/``)
    minus the lock file's modification time, both as the store reports them. Machines with
    skewed clocks therefore agree on it. The ``*_at`` times inside the file are for people.

    ``generation`` is the fencing token: the run holding generation N writes only while N is
    the newest generation, which ``check()`` verifies (one listing, one read) before a commit.
    When the heartbeat finds a newer generation, it sets ``lost`` and stops refreshing.
    """

    def __init__(self, base: str, owner: str, stale_after_s: float = 600.0, heartbeat_s: float | None = None):
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        self.base = base
        self.folder = storage.join(base, "_lock")
        self.owner = owner
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else max(1.0, min(60.0, self.stale_after_s / 4))
        self.token = uuid.uuid4().hex
        self.generation: int | None = None
        self.lost = False
        self._acquired_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _uri(self, generation: int) -> str:
        return storage.join(self.folder, f"lock-{generation:08d}.json")

    def _generations(self) -> list[int]:
        try:
            files = storage.list_files(self.folder, (".json",))
        except FileNotFoundError:
            return []
        out = []
        for f in files:
            name = storage.basename(f.uri)
            if name.startswith("lock-") and name[5:-5].isdigit():
                out.append(int(name[5:-5]))
        return sorted(out)

    def _read(self, generation: int) -> dict | None:
        try:
            return storage.read_json(self._uri(generation))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: held by someone unknown, judged by the file's age
            return _unreadable()

    def age_s(self, generation: int) -> float:
        """Seconds since the lock file of ``generation`` was last written, by the store's clock.

        The probe is written before the lock file is stat'ed, so a refresh in between makes the
        age smaller, never larger: a live lock is never judged stale by the order of the reads.

        Raises:
            FileNotFoundError: that lock file is gone.
        """
        now = storage.store_now(self.folder)
        return now - storage.modified_at(self._uri(generation))

    def _record(self, **extra) -> bytes:
        now = time.time()
        record = {"owner": self.owner, "token": self.token, "generation": self.generation, "host": socket.gethostname(),
                  "pid": os.getpid(), "acquired_at": self._acquired_at or now, "heartbeat_at": now,
                  "stale_after_s": self.stale_after_s, **extra}
        return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()

    def holder(self) -> tuple[int, dict] | None:
        """The live lock (generation, record), or None when the lock is free."""
        generations = self._generations()
        if not generations:
            return None
        top = generations[-1]
        record = self._read(top)
        if record is None or record.get("released_at") or _dead_here(record):
            return None
        try:
            if self.age_s(top) > self.stale_after_s:
                return None
        except FileNotFoundError:  # released and removed in between
            return None
        return top, record

    def acquire(self) -> "StoreLock":
        """Take the lock or fail at once.

        Raises:
            LockHeld: another run holds it (the message names it and how to clear a dead one).
        """
        generations = self._generations()
        top = generations[-1] if generations else 0
        if top:
            record = self._read(top)
            if record and not record.get("released_at"):
                if _dead_here(record):
                    log.warning("taking over the lock of %s: its holder %s (pid %s on this host) is gone", self.base,
                                record.get("owner"), record.get("pid"))
                elif (age := self._age_or_gone(top)) <= self.stale_after_s:
                    raise LockHeld(
                        f"{self.base} is being written by {record.get('owner')} on {record.get('host')} "
                        f"(lock {self._uri(top)}, refreshed {age:.0f} s ago); runs never overlap on one output: "
                        f"wait for it, or, if that run is gone, delete the lock file or wait {self.stale_after_s:.0f} s"
                    )
                else:
                    log.warning("taking over a stale lock of %s (%s, not refreshed for %.0f s by the store's clock)",
                                self.base, record.get("owner"), age)
        self.generation = top + 1
        self._acquired_at = time.time()
        if not storage.create_if_absent(self._uri(self.generation), self._record()):
            self.generation = None
            raise LockHeld(f"{self.base}: another run took the lock at the same moment ({self._uri(top + 1)})")
        for old in generations:  # earlier generations are history; the newest decides
            storage.delete(self._uri(old))
        self._thread = threading.Thread(target=self._heartbeat, name="rnnimg-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _age_or_gone(self, generation: int) -> float:
        """``age_s``, or infinity when the file vanished (create-if-absent then decides who takes it)."""
        try:
            return self.age_s(generation)
        except FileNotFoundError:
            return float("inf")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._still_mine():
                    self.lost = True
                    log.error("lost the lock of %s: another run took it over", self.base)
                    return
                storage.write_bytes(self._uri(self.generation), self._record())
            except Exception as err:  # noqa: BLE001 - a failed refresh is retried at the next beat
                log.warning("could not refresh the lock of %s: %s", self.base, err)

    def _still_mine(self) -> bool:
        if self.generation is None:
            return False
        try:
            Fence(self.base, self.generation, self.token).check()
        except LockLost:
            return False
        return True

    def check(self) -> None:
        """Raise LockLost unless this run still holds the lock (called before recording results).

        Cheap enough to call before every commit: one listing of ``BASE/_lock/`` and one read.
        ``generation``, the fencing token, is still the newest one and the file still carries
        this run's token, or this run has been fenced off.

        Raises:
            LockLost: another run took the lock over, or this run never held it.
        """
        if self.generation is None or self.lost or not self._still_mine():
            self.lost = True
            raise LockLost(f"{self.base}: this run's lock was taken over by another run; its results are not recorded")

    def fence(self) -> Fence:
        """This run's fencing token, for workers that commit on its behalf.

        Raises:
            LockLost: this run does not hold the lock.
        """
        if self.generation is None or self.lost:
            raise LockLost(f"{self.base}: this run does not hold the lock")
        return Fence(self.base, self.generation, self.token)

    def release(self) -> None:
        """Stop refreshing and mark the lock released (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.generation is not None and not self.lost and self._still_mine():
            storage.write_bytes(self._uri(self.generation), self._record(released_at=time.time()))
        self.generation = None

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
