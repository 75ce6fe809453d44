"""rnnimg.label_runs: the incremental-labelling base (state, deltas, plan and record of a run), without Prefect."""

from __future__ import annotations

import pytest

from rnnimg import storage
from rnnimg.label_runs import (
    MAX_ATTEMPTS,
    NoCompletedRun,
    Seen,
    completed_runs,
    labelled_before,
    plan_delta,
    plan_run,
    read_state,
    record_run,
    run_out,
    write_delta,
    write_state,
)
from rnnimg.manifest import VideoRow
from rnnimg.store_lock import LockLost, StoreLock


def _row(name: str, size: int = 100, version: str = "v1") -> VideoRow:
    return VideoRow(video_uri=f"/archive/{name}.mp4", size=size, version=version)


def test_plan_delta_labels_new_and_changed_videos_only():
    known = {"/archive/a.mp4": Seen(100, "v1"), "/archive/b.mp4": Seen(100, "v1"), "/archive/c.mp4": Seen(100, "v1"),
             "/archive/gone.mp4": Seen(5, "v1")}
    listing = [_row("a"), _row("b", size=101), _row("c", version="v2"), _row("new")]
    delta = plan_delta(listing, known, "r2", "m1")
    assert (delta.listed, delta.new, delta.changed, delta.unchanged, delta.removed) == (4, 1, 2, 1, 1)
    assert sorted(r.video_uri for r in delta.rows) == ["/archive/b.mp4", "/archive/c.mp4", "/archive/new.mp4"]
    assert plan_delta(listing, known, "r2", "m1", full=True).todo == 4
    assert plan_delta(listing, {}, "r2", "other-model").new == 4  # a new model relabels everything


def test_transient_failures_are_retried_a_bounded_number_of_times_and_permanent_ones_wait_for_a_change():
    known = {
        "/archive/flaky.mp4": Seen(100, "v1", "failed", "storage", 1),
        "/archive/gone-briefly.mp4": Seen(100, "v1", "failed", "not_found", MAX_ATTEMPTS - 1),
        "/archive/given-up.mp4": Seen(100, "v1", "failed", "storage", MAX_ATTEMPTS),
        "/archive/broken.mp4": Seen(100, "v1", "failed", "decode", 1),
        "/archive/broken-fixed.mp4": Seen(100, "v1", "failed", "decode", 1),
        "/archive/fine.mp4": Seen(100, "v1", "ok", "", 1),
    }
    listing = [_row("flaky"), _row("gone-briefly"), _row("given-up"), _row("broken"), _row("broken-fixed", version="v2"), _row("fine")]
    delta = plan_delta(listing, known, "r2", "m1")
    assert (delta.new, delta.changed, delta.retried, delta.unchanged) == (0, 1, 2, 3)
    attempts = {r.video_uri.rsplit("/", 1)[1]: r.attempt for r in delta.rows}
    assert attempts == {"broken-fixed.mp4": 1, "flaky.mp4": 2, "gone-briefly.mp4": MAX_ATTEMPTS}


def _completed_run(base: str, run_id: str, model_id: str, rows: list[VideoRow]) -> dict:
    """What a finished run leaves behind, as far as the delta is concerned: its input listing."""
    import pyarrow as pa

    table = pa.Table.from_pylist([{"video_uri": r.video_uri, "size": r.size, "version": r.version, "label": None, "split": None} for r in rows])
    storage.write_table(table, storage.join(base, "runs", run_id, "_run", "manifest.parquet"))
    return {"run_id": run_id, "model_id": model_id, "status": "completed"}


def test_labelled_before_takes_each_videos_latest_completed_run_of_the_model(tmp_path):
    base = str(tmp_path / "base")
    assert read_state(base) == {"version": 1, "runs": [], "last_success": {}, "pending": None}
    runs = [
        _completed_run(base, "r1", "m1", [_row("a"), _row("b")]),
        _completed_run(base, "r2", "m1", [_row("b", size=200)]),
        _completed_run(base, "r3", "m2", [_row("c")]),
        {**_completed_run(base, "r4", "m1", [_row("d")]), "status": "abandoned"},
    ]
    state = {"version": 1, "runs": runs, "last_success": {}, "pending": None}
    def sizes(model_id):
        return {uri: (seen.size, seen.version) for uri, seen in labelled_before(base, state, model_id).items()}

    assert sizes("m1") == {"/archive/a.mp4": (100, "v1"), "/archive/b.mp4": (200, "v1")}
    assert sizes("m2") == {"/archive/c.mp4": (100, "v1")}
    storage.write_json(storage.join(base, "state.json"), {**state, "version": 99})
    with pytest.raises(ValueError, match="state version 99; this flow reads version 1"):
        read_state(base)


def test_delta_manifest_is_read_back_by_the_label_job_with_size_and_version(tmp_path):
    from rnnimg.manifest import resolve_videos

    delta = plan_delta([_row("a", size=7, version="123"), _row("b")], {}, "r1", "m1")
    uri = write_delta(str(tmp_path), delta)
    assert uri == str(tmp_path / "runs" / "r1" / "_delta.parquet")
    rows = resolve_videos(uri)
    assert [(r.video_uri, r.size, r.version) for r in rows] == [("/archive/a.mp4", 7, "123"), ("/archive/b.mp4", 100, "v1")]


def test_plan_run_resumes_a_crashed_run_and_abandons_another_models(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("a", "b", "c"):
        (archive / f"{name}.mp4").write_bytes(name.encode() * 10)
    base = str(tmp_path / "base")
    videos, model = [str(archive)], str(tmp_path / "model")
    with StoreLock(base, "test", stale_after_s=60) as lock:
        first = plan_run(base, videos, None, "m1", model, False, lock)
        assert (first.new, first.todo, first.resumed) == (3, 3, False)
        pending = read_state(base)["pending"]
        assert pending["run_id"] == first.run_id and storage.exists(pending["delta"])

        # The run crashed before record-run: the next run of m1 resumes it, same id and videos.
        again = plan_run(base, videos, None, "m1", model, False, lock)
        assert again.resumed and again.run_id == first.run_id and again.rows == first.rows

        # A run of another model abandons it and plans everything for the new model.
        other = plan_run(base, videos, None, "m2", model, False, lock)
        state = read_state(base)
        assert (other.todo, other.resumed) == (3, False) and other.run_id != first.run_id
        assert [(r["run_id"], r["status"]) for r in state["runs"]] == [(first.run_id, "abandoned")]
        assert state["pending"]["run_id"] == other.run_id


def _summary(model_id: str, videos: int) -> dict:
    """What ``LabelResult.summary()`` holds, as far as ``record_run`` reads it."""
    return {"model_id": model_id, "videos": videos, "ok": videos, "partial": 0, "failed": 0, "clips": 2 * videos, "seconds": 1.5}


def test_record_run_completes_the_pending_run_once_and_only_for_its_model(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("a", "b"):
        (archive / f"{name}.mp4").write_bytes(name.encode() * 10)
    base, model = str(tmp_path / "base"), str(tmp_path / "model")
    with StoreLock(base, "test", stale_after_s=60) as lock:
        delta = plan_run(base, [str(archive)], None, "m1", model, False, lock, run_id_suffix="flowrun1-xyz")
        assert delta.run_id.endswith("-flowrun1")
        with pytest.raises(ValueError, match=f"the model at {model} changed during the run \\(m1 -> m2\\); rerun"):
            record_run(base, delta, _summary("m2", 2), model, lock)
        run = run_out(base, delta.run_id)  # the label job leaves its input listing in _run/
        storage.write_bytes(storage.join(run, "_run", "manifest.parquet"), storage.read_bytes(storage.join(run, "_delta.parquet")))
        record = record_run(base, delta, _summary("m1", 2), model, lock)
        assert record_run(base, delta, _summary("m1", 2), model, lock) == record  # a retry records nothing twice
    state = read_state(base)
    assert state["pending"] is None and state["last_success"] == {"m1": delta.run_id} and state["runs"] == [record]
    assert (record["status"], record["videos"], record["clips"], record["out"]) == ("completed", 2, 4, run)
    assert completed_runs(base) == ("m1", [record])

    with StoreLock(base, "test", stale_after_s=60) as lock:  # nothing new for m1: no run, state untouched
        assert plan_run(base, [str(archive)], None, "m1", model, False, lock).todo == 0
    assert read_state(base) == state


def test_record_run_refuses_a_run_whose_lock_was_taken_over(tmp_path):
    base = str(tmp_path / "base")
    lock = StoreLock(base, "first", stale_after_s=60).acquire()
    lock.release()
    delta = plan_delta([_row("a")], {}, "r1", "m1")
    with pytest.raises(LockLost):
        record_run(base, delta, _summary("m1", 1), "/model", lock)
    assert read_state(base)["runs"] == []


def test_completed_runs_picks_the_latest_model_and_says_which_models_have_runs(tmp_path):
    base = str(tmp_path / "base")
    with pytest.raises(NoCompletedRun, match="has no completed labelling run yet"):
        completed_runs(base)
    runs = [{"run_id": "r1", "model_id": "m1", "status": "completed"}, {"run_id": "r2", "model_id": "m2", "status": "completed"},
            {"run_id": "r3", "model_id": "m1", "status": "abandoned"}]
    write_state(base, {"version": 1, "runs": runs, "last_success": {}, "pending": None})
    assert completed_runs(base) == ("m2", [runs[1]])
    assert completed_runs(base, "m1") == ("m1", [runs[0]])
    with pytest.raises(NoCompletedRun, match=r"no completed run of model 'm3'; models with runs: \['m1', 'm2'\]"):
        completed_runs(base, "m3")


def test_labelled_before_reads_each_videos_outcome_and_attempt_from_the_runs_videos_table(tmp_path):
    from rnnimg import tables

    base = str(tmp_path / "base")
    runs = [_completed_run(base, "r1", "m1", [_row("a"), _row("b")]), _completed_run(base, "r2", "m1", [_row("b")])]
    rows = [
        ("r1", "/archive/a.mp4", "ok", None, 1),
        ("r1", "/archive/b.mp4", "failed", "storage", 1),
        ("r2", "/archive/b.mp4", "failed", "storage", 2),
    ]
    for run_id in ("r1", "r2"):
        table = tables.table_from_rows([{"video_uri": u, "status": s, "duration_s": None, "clips": 0, "error_type": e, "error": e,
                                         "attempt": a, "model_id": "m1", "run_id": r} for r, u, s, e, a in rows if r == run_id], tables.VIDEOS)
        storage.write_table(table, storage.join(base, "runs", run_id, "videos", "shard-00000.parquet"))
    state = {"version": 1, "runs": runs, "last_success": {}, "pending": None}
    known = labelled_before(base, state, "m1")
    assert known["/archive/a.mp4"] == Seen(100, "v1", "ok", "", 1)
    assert known["/archive/b.mp4"] == Seen(100, "v1", "failed", "storage", 2)  # the latest run's outcome
    delta = plan_delta([_row("a"), _row("b")], known, "r3", "m1")
    assert (delta.retried, delta.unchanged) == (1, 1) and delta.rows[0].attempt == 3
