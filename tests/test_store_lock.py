"""rnnimg.store_lock and storage.create_if_absent: one writer per output location, locally and on S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from rnnimg import storage
from rnnimg.storage import create_if_absent
from rnnimg.store_lock import LockHeld, LockLost, StoreLock


def test_create_if_absent_has_exactly_one_winner(tmp_path):
    target = str(tmp_path / "lock" / "x.json")
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        results.append(create_if_absent(target, f"writer {i}".encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert storage.read_bytes(target).startswith(b"writer ")
    assert [n for n in os.listdir(tmp_path / "lock")] == ["x.json"]  # no temporary left behind


def test_lock_excludes_a_second_run_until_released(tmp_path):
    base = str(tmp_path / "base")
    first = StoreLock(base, "run one", stale_after_s=60).acquire()
    try:
        with pytest.raises(LockHeld, match=r"is being written by run one .*wait for it"):
            StoreLock(base, "run two", stale_after_s=60).acquire()
        first.check()
    finally:
        first.release()
    with StoreLock(base, "run two", stale_after_s=60) as second:
        assert second.holder()[1]["owner"] == "run two"
        assert second.generation == 2
    assert StoreLock(base, "anyone").holder() is None
    assert os.listdir(os.path.join(base, "_lock")) == ["lock-00000002.json"]  # older generations are removed


def test_heartbeat_keeps_a_long_run_locked_and_a_stale_lock_is_taken_over(tmp_path):
    base = str(tmp_path / "base")
    holder = StoreLock(base, "long run", stale_after_s=1.0, heartbeat_s=0.2).acquire()
    time.sleep(1.5)  # longer than stale_after_s: only the heartbeat keeps it
    with pytest.raises(LockHeld):
        StoreLock(base, "newcomer", stale_after_s=1.0).acquire()
    holder._stop.set()  # the holder "crashes": no more heartbeats
    holder._thread.join()
    time.sleep(1.3)
    newcomer = StoreLock(base, "newcomer", stale_after_s=1.0, heartbeat_s=0.2).acquire()
    try:
        with pytest.raises(LockLost, match="taken over by another run; its results are not recorded"):
            holder.check()
        newcomer.check()
        holder.release()  # must not release the newcomer's lock
        assert newcomer.holder()[1]["owner"] == "newcomer"
    finally:
        newcomer.release()


@pytest.mark.s3
def test_lock_on_s3_uses_a_conditional_put(s3_bucket):
    base = f"{s3_bucket}/labels"
    assert create_if_absent(f"{base}/x.json", b"1") is True
    assert create_if_absent(f"{base}/x.json", b"2") is False
    assert storage.read_bytes(f"{base}/x.json") == b"1"
    with StoreLock(base, "s3 run", stale_after_s=60):
        with pytest.raises(LockHeld, match="s3 run"):
            StoreLock(base, "other", stale_after_s=60).acquire()
    with StoreLock(base, "other", stale_after_s=60) as lock:
        assert lock.generation == 2


def test_a_killed_holder_on_this_host_frees_the_lock_at_once(tmp_path):
    base = str(tmp_path / "out")
    code = ("import sys, time; from rnnimg.store_lock import StoreLock; "
            f"StoreLock({base!r}, 'the killed run').acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match="being written by the killed run"):
            StoreLock(base, "second", stale_after_s=3600).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # Its pid is gone on this host: free now, not after stale_after_s.
    assert StoreLock(base, "probe", stale_after_s=3600).holder() is None
    lock = StoreLock(base, "rerun", stale_after_s=3600).acquire()
    try:
        lock.check()
    finally:
        lock.release()


def _skew_host_clock(monkeypatch, seconds: float) -> None:
    """Every ``time.time()`` of this process (the lock's host clock) runs ``seconds`` ahead."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


def _age_lock_file(base: str, generation: int, seconds: float) -> None:
    """Set a local lock file's modification time ``seconds`` back: what the store says of a dead holder's file."""
    path = os.path.join(base, "_lock", f"lock-{generation:08d}.json")
    old = os.stat(path).st_mtime - seconds
    os.utime(path, (old, old))


@pytest.mark.parametrize("skew_s", [61.0, 3600.0])
def test_a_skewed_host_clock_never_takes_a_live_lock(tmp_path, monkeypatch, skew_s):
    base = str(tmp_path / "base")
    holder = StoreLock(base, "run on a host with the right time", stale_after_s=60, heartbeat_s=30).acquire()
    try:
        _skew_host_clock(monkeypatch, skew_s)  # B's clock is ahead: by its clock, A's heartbeat_at is old
        with pytest.raises(LockHeld, match="is being written by run on a host with the right time"):
            StoreLock(base, "run on a skewed host", stale_after_s=60).acquire()
        assert StoreLock(base, "probe", stale_after_s=60).holder()[0] == 1
        monkeypatch.undo()
        holder.check()
        assert not holder.lost
    finally:
        holder.release()
    assert [n for n in os.listdir(os.path.join(base, "_lock")) if n.startswith("clock-")] == []  # probes are removed


def test_a_lock_old_by_the_stores_clock_is_taken_over_and_the_old_holder_is_fenced(tmp_path, monkeypatch):
    base = str(tmp_path / "base")
    first = StoreLock(base, "first", stale_after_s=60, heartbeat_s=1.0).acquire()
    second = None
    try:
        assert first.generation == 1
        _age_lock_file(base, 1, 120)  # its holder stopped refreshing two minutes ago, says the store
        _skew_host_clock(monkeypatch, -3600.0)  # B's clock is an hour behind: irrelevant, the store's clock decides
        assert StoreLock(base, "probe", stale_after_s=60).holder() is None
        second = StoreLock(base, "second", stale_after_s=60, heartbeat_s=1.0).acquire()
        monkeypatch.undo()
        assert second.generation == 2  # the fencing token went up
        with pytest.raises(LockLost, match="taken over by another run"):
            first.check()
        deadline = time.monotonic() + 10
        while not first.lost and time.monotonic() < deadline:  # A's next heartbeat finds generation 2
            time.sleep(0.1)
        assert first.lost
        second.check()
        first.release()  # must leave generation 2 alone
        assert StoreLock(base, "probe", stale_after_s=60).holder()[1]["owner"] == "second"
    finally:
        first.release()
        if second is not None:
            second.release()


def test_check_reads_one_listing_and_one_file(tmp_path, monkeypatch):
    base = str(tmp_path / "base")
    with StoreLock(base, "committer", stale_after_s=60, heartbeat_s=60) as lock:
        calls: list[str] = []
        for name in ("list_files", "read_bytes", "write_bytes", "create_if_absent", "delete", "stat", "modified_at", "exists"):
            real = getattr(storage, name)
            monkeypatch.setattr(storage, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
        lock.check()
        monkeypatch.undo()
        assert sorted(calls) == ["list_files", "read_bytes"]


@pytest.mark.s3
def test_lock_staleness_on_s3_uses_the_stores_clock(s3_bucket, monkeypatch):
    base = f"{s3_bucket}/labels"
    holder = StoreLock(base, "s3 holder", stale_after_s=2.0, heartbeat_s=0.3).acquire()
    try:
        time.sleep(3.0)  # longer than stale_after_s: only the heartbeat keeps it
        _skew_host_clock(monkeypatch, 3600.0)
        with pytest.raises(LockHeld, match="s3 holder"):
            StoreLock(base, "skewed newcomer", stale_after_s=2.0).acquire()
        monkeypatch.undo()
        holder._stop.set()  # the holder "crashes": no more heartbeats
        holder._thread.join()
        time.sleep(4.0)  # LastModified has whole seconds: wait well past stale_after_s
        newcomer = StoreLock(base, "newcomer", stale_after_s=2.0, heartbeat_s=0.3).acquire()
        try:
            assert newcomer.generation == 2
            with pytest.raises(LockLost):
                holder.check()
            newcomer.check()
        finally:
            newcomer.release()
    finally:
        holder.release()
    assert [f.uri for f in storage.list_files(f"{base}/_lock") if "/clock-" in f.uri] == []


@pytest.mark.s3
def test_create_if_absent_on_s3_has_exactly_one_winner_among_threads(s3_bucket):
    for round_ in range(5):
        target = f"{s3_bucket}/lock/round-{round_}.json"
        results: list[tuple[bool, int]] = []
        barrier = threading.Barrier(8)

        def race(i: int) -> None:
            barrier.wait()
            results.append((create_if_absent(target, f"writer {i}".encode()), i))

        threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for won, i in results if won]
        assert len(results) == 8 and len(winners) == 1, results
        assert storage.read_bytes(target) == f"writer {winners[0]}".encode()  # the winner's bytes, whole


FORKED_RACE = """
import json, multiprocessing, sys
from rnnimg.storage import create_if_absent

def race(target, writer):
    return create_if_absent(target, f"writer {writer}".encode())

bucket = sys.argv[1]
assert create_if_absent(f"{bucket}/lock/warm.json", b"parent")  # the parent's client now exists
with multiprocessing.get_context("fork").Pool(4) as pool:
    results = pool.starmap_async(race, [(f"{bucket}/lock/forked.json", i) for i in range(8)]).get(timeout=120)
assert create_if_absent(f"{bucket}/lock/after.json", b"parent")  # and the parent's still works
print(json.dumps(results))
"""


@pytest.mark.s3
def test_create_if_absent_on_s3_has_exactly_one_winner_among_forked_processes(s3_bucket):
    """The parent used S3 before forking: each child must make its own s3fs client and event loop.

    In a fresh interpreter: the test process may hold Ray's threads by now, and a child forked from a
    process with threads can inherit a lock some other thread held (a pool worker hung in this suite once).
    """
    import json

    done = subprocess.run([sys.executable, "-c", FORKED_RACE, s3_bucket], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(results) == [False] * 7 + [True]
    assert storage.read_bytes(f"{s3_bucket}/lock/forked.json") == f"writer {results.index(True)}".encode()
