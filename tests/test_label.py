"""The labelling job on a real local Ray: tables, failed rows, resume without duplicates."""

import json
import os
import shutil
import time

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from rnnimg import storage
from rnnimg.label import LabelConfig, LabelError, clip_accuracy, label
from rnnimg.tables import CLIPS, VIDEOS

pytestmark = [pytest.mark.ray]


@pytest.fixture
def archive_with_broken(tiny_archive, tmp_path):
    """The tiny archive's test + unlabelled videos, plus three that cannot be decoded."""
    root, manifest = tiny_archive
    videos = tmp_path / "videos"
    shutil.copytree(os.path.join(root, "videos", "test"), videos / "test")
    shutil.copytree(os.path.join(root, "videos", "unlabelled"), videos / "unlabelled")
    (videos / "broken").mkdir()
    (videos / "broken" / "empty.mp4").write_bytes(b"")
    (videos / "broken" / "text.mp4").write_text("not a video at all\n")
    # Fixed bytes: some random 4 KiB parse as a container with a subtitle stream (no_video_stream), some do not open.
    (videos / "broken" / "random.mkv").write_bytes(np.random.default_rng(0).bytes(4096))
    return str(videos), manifest


def test_label_writes_clip_and_video_tables(ray_local, archive_with_broken, untrained_model, tmp_path):
    videos, manifest = archive_with_broken
    out = str(tmp_path / "labels")
    result = label(videos, untrained_model, out, LabelConfig(videos_per_shard=2, batch_size=4))

    n_good = len(storage.list_files(os.path.join(videos, "test"))) + len(storage.list_files(os.path.join(videos, "unlabelled")))
    assert (result.videos, result.ok, result.failed, result.partial) == (n_good + 3, n_good, 3, 0)
    # 4-second videos, 2-second clips every 2 seconds: two clips each.
    assert result.clips == 2 * n_good

    clips = pads.dataset(os.path.join(out, "clips")).to_table()
    videos_table = pads.dataset(os.path.join(out, "videos")).to_table()
    assert clips.schema.remove_metadata() == CLIPS.remove_metadata()
    assert videos_table.schema.remove_metadata() == VIDEOS.remove_metadata()

    frame = videos_table.to_pandas().set_index("video_uri")
    for name in ("empty.mp4", "text.mp4", "random.mkv"):
        row = frame.loc[os.path.join(videos, "broken", name)]
        assert row.status == "failed" and row.clips == 0
        assert name in row.error and row.error_type in ("open", "empty", "no_video_stream")
    assert (frame[frame.status == "ok"].clips == 2).all()

    clip_frame = clips.to_pandas()
    assert not clip_frame.duplicated(["video_uri", "clip_index"]).any()
    assert set(clip_frame.label) <= {"left", "right"}
    assert ((clip_frame.score >= 0.5) & (clip_frame.score <= 1.0)).all()  # max of 2 softmax scores
    assert (clip_frame.run_id == result.run_id).all() and (clip_frame.model_id == result.model_id).all()

    # The tables open as they are with pandas and DuckDB.
    assert len(pd.read_parquet(os.path.join(out, "clips"))) == result.clips
    assert duckdb.execute(f"select count(*) from '{out}/videos/*.parquet'").fetchall()[0][0] == result.videos
    summary = json.load(open(os.path.join(out, "run.json")))
    assert summary["failed"] == 3 and summary["run_id"] == result.run_id


def test_rerun_skips_committed_shards_and_redoes_the_rest_without_duplicates(ray_local, archive_with_broken, untrained_model, tmp_path):
    videos, _ = archive_with_broken
    out = str(tmp_path / "labels")
    first = label(videos, untrained_model, out, LabelConfig(videos_per_shard=2, batch_size=4))
    before = pads.dataset(os.path.join(out, "clips")).to_table().to_pandas().sort_values(["video_uri", "clip_index"]).reset_index(drop=True)

    # Simulate a crash after some shards: drop the commit record of two shards (one also loses its tables).
    commits = sorted(os.listdir(os.path.join(out, "_commits")))
    os.remove(os.path.join(out, "_commits", commits[0]))
    os.remove(os.path.join(out, "_commits", commits[-1]))
    os.remove(os.path.join(out, "clips", commits[-1].replace(".json", ".parquet")))

    second = label(videos, untrained_model, out, LabelConfig(videos_per_shard=2, batch_size=4))
    assert second.run_id == first.run_id
    assert (second.shards_done, second.shards_skipped) == (2, len(commits) - 2)
    after = pads.dataset(os.path.join(out, "clips")).to_table().to_pandas().sort_values(["video_uri", "clip_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)

    # Parts written after their shard committed (a batch Ray retried late, a committer lost between
    # its record and removing the parts): never read, and swept by the next run that ends.
    from rnnimg.label import parts_folder

    for shard in (0, len(commits) - 1):
        os.makedirs(parts_folder(out, shard), exist_ok=True)
        with open(os.path.join(parts_folder(out, shard), "late.parquet"), "wb") as stray:
            stray.write(b"PAR1 not a table")
    third = label(videos, untrained_model, out, LabelConfig(videos_per_shard=2, batch_size=4))
    assert third.shards_done == 0 and third.clips == first.clips
    assert not any(files for _, _, files in os.walk(os.path.join(out, "_parts")))
    after = pads.dataset(os.path.join(out, "clips")).to_table().to_pandas().sort_values(["video_uri", "clip_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)


def test_rerun_with_another_model_into_the_same_output_is_refused(ray_local, archive_with_broken, untrained_model, tmp_path):
    from tests.media import export_untrained_model

    videos, _ = archive_with_broken
    out = str(tmp_path / "labels")
    label(os.path.join(videos, "unlabelled"), untrained_model, out)
    other = export_untrained_model(str(tmp_path / "other"), rnn_type="gru")
    with pytest.raises(LabelError, match="already holds a run"):
        label(os.path.join(videos, "unlabelled"), other, out)



def test_rerun_with_other_inputs_splits_smoothing_or_precision_is_refused_naming_what_differs(ray_local, tiny_archive, untrained_model, tmp_path):
    root, manifest = tiny_archive
    out = str(tmp_path / "labels")
    label(manifest, untrained_model, out, splits=["unlabelled"])
    refused = [
        (dict(videos=os.path.join(root, "videos", "unlabelled")), "videos"),
        (dict(videos=manifest, splits=["test"]), "splits"),
        (dict(videos=manifest, splits=["unlabelled"], config=LabelConfig(min_segment_seconds=4.0)), "min_segment_seconds"),
        (dict(videos=manifest, splits=["unlabelled"], config=LabelConfig(precision="bf16")), "precision"),
    ]
    for kwargs, what in refused:
        videos = kwargs.pop("videos")
        with pytest.raises(LabelError, match=f"already holds a run with other settings \\({what} "):
            label(videos, untrained_model, out, **kwargs)
    assert label(manifest, untrained_model, out, splits=["unlabelled"]).shards_done == 0  # the same run: resumed, nothing to do


def _predicted_batches(videos: list[str], spec: dict, batch_size: int, range_seconds: float) -> list[dict]:
    """What the Predictor hands the driver for ``videos`` (fake predictions), one batch per decode batch."""

    from rnnimg.label import decode_pack, plan_videos

    packs = plan_videos({"shard": np.zeros(len(videos), np.int64), "video_uri": np.array(videos, dtype=object),
                         "refused": np.array([""] * len(videos), dtype=object)}, spec, range_seconds)["pack"]
    batches = []
    for pack in packs:
        for batch in decode_pack({"pack": np.array([pack], dtype=object)}, spec, 16, batch_size):
            batch.pop("frames")
            n = len(batch["video_uri"])
            batch["label"] = np.array(["left"] * n, dtype=object)
            batch["score"] = np.full(n, 0.75, np.float32)
            batches.append(batch)
    return batches


def _split_rows(batch: dict, keep) -> dict:
    return {k: v[keep] for k, v in batch.items()}


def test_commit_waits_for_every_clip_row_whatever_the_block_order(tiny_archive, untrained_model, tmp_path):
    """Status rows first, clip batches after, shuffled, with duplicates: every clip stored once."""

    from rnnimg import tasks
    from rnnimg.label import commit_shard, commit_stream, parts_folder, stage_parts
    from rnnimg.manifest import VideoRow
    from rnnimg.store_lock import StoreLock
    from rnnimg.video.clips import ClipSpec

    root, _ = tiny_archive
    videos = sorted(f.uri for f in storage.list_files(os.path.join(root, "videos", "train")))[:4]
    spec = ClipSpec().to_dict()
    batches = _predicted_batches(videos, spec, batch_size=1, range_seconds=2.0)  # a range per clip
    out = str(tmp_path / "out")
    status = [stage_parts(_split_rows(b, b["is_status"]), out, ["label", "score"]) for b in batches]
    clip_batches = [_split_rows(b, ~b["is_status"]) for b in batches]
    clip_records = [stage_parts(b, out, ["label", "score"]) for b in clip_batches]
    assert all(not r["is_status"].any() and len(r["video_uri"]) <= 1 for r in clip_records)  # small records, not rows
    assert not any(k in r for r in clip_records for k in ("label", "score", "frames"))
    rng = np.random.default_rng(0)
    clip_records = [clip_records[i] for i in rng.permutation(len(clip_records))]
    retried = [stage_parts(b, out, ["label", "score"]) for b in clip_batches[:3]]  # a retried task writes its part again
    stream = status + clip_records + retried  # every status row overtakes every clip, then the retries' records
    expected = int(sum((~b["is_status"]).sum() for b in batches))
    assert expected == 2 * len(videos)

    run = {"run_id": "r", "model_id": "m"}
    with StoreLock(out, "test") as lock:
        committed = commit_stream(stream, out, run, tasks.get("classify"), [[VideoRow(v) for v in videos]], [0], 0.0, lock)
    assert [c["clips"] for c in committed] == [expected]
    stored = pads.dataset(os.path.join(out, "clips")).to_table().to_pandas()
    assert len(stored) == expected and not stored.duplicated(["video_uri", "clip_index"]).any()
    assert set(stored["label"]) == {"left"} and (stored["score"] == np.float32(0.75)).all()
    assert (pads.dataset(os.path.join(out, "videos")).to_table().to_pandas().clips == 2).all()
    assert not os.path.exists(parts_folder(out, 0))  # the parts go once the shard is committed

    # A committer lost after its completion record and before removing the parts: its retry finds
    # the record, returns it, and removes the parts it left.
    left = [stage_parts(b, out, ["label", "score"]) for b in clip_batches[:2]]
    assert os.listdir(parts_folder(out, 0))
    again = commit_shard(out, 0, run, "classify", sorted({str(p) for r in left for p in r["part"]}), [], 0.0)
    assert again == storage.read_json(os.path.join(out, "_commits", "shard-00000.json"))
    assert not os.path.exists(parts_folder(out, 0))
    assert len(pads.dataset(os.path.join(out, "clips")).to_table()) == expected

    # A stream that lost a clip record never commits the shard: the job fails loudly instead of dropping it.
    lossy = str(tmp_path / "lossy")
    records = [stage_parts(b, lossy, ["label", "score"]) for b in batches]
    first_clip = next(i for i, r in enumerate(records) if not r["is_status"].all())
    records[first_clip] = _split_rows(records[first_clip], records[first_clip]["is_status"])
    with StoreLock(lossy, "test") as lock:
        with pytest.raises(RuntimeError, match=r"shards \[0\] incomplete"):
            commit_stream(records, lossy, run, tasks.get("classify"), [[VideoRow(v) for v in videos]], [0], 0.0, lock)
    assert not os.path.exists(os.path.join(lossy, "_commits"))


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    """Six 20-second videos: ten clips each, several model batches per video."""
    from rnnimg.synth import SynthConfig, make_archive

    out = tmp_path_factory.mktemp("long")
    make_archive(str(out), SynthConfig(videos=3, unlabelled=3, seed=5, seconds=20.0))
    return str(out / "videos")


@pytest.mark.slow
def test_two_model_replicas_and_small_batches_give_the_rows_of_one(ray_local, long_videos, untrained_model, tmp_path):
    one = label(long_videos, untrained_model, str(tmp_path / "one"), LabelConfig(actors=1, batch_size=3, videos_per_shard=2))
    two = label(long_videos, untrained_model, str(tmp_path / "two"), LabelConfig(actors=2, batch_size=3, videos_per_shard=2, range_seconds=8.0))
    # Two pipelines, each in its coordinator actor with one replica and every other shard.
    split = label(long_videos, untrained_model, str(tmp_path / "split"), LabelConfig(actors=2, coordinators=2, batch_size=3, videos_per_shard=2))
    assert one.clips == two.clips == split.clips == 6 * 10 and one.ok == two.ok == split.ok == 6
    assert split.shards_done == 3 and split.coordinator_cpu_s > 0 and split.coordinators_restarted == 0
    for table, key in (("clips", ["video_uri", "clip_index"]), ("videos", ["video_uri"]), ("segments", ["video_uri", "start_s"])):
        pd.testing.assert_frame_equal(_rows(str(tmp_path / "one"), table, key), _rows(str(tmp_path / "two"), table, key))
        pd.testing.assert_frame_equal(_rows(str(tmp_path / "one"), table, key), _rows(str(tmp_path / "split"), table, key))


def test_more_coordinators_than_replicas_is_refused():
    with pytest.raises(ValueError, match=r"coordinators \(3\) must be at most actors \(2\)"):
        LabelConfig(actors=2, coordinators=3)


def test_a_coordinator_killed_mid_run_is_restarted_and_finishes_its_shards(ray_local, tiny_archive, untrained_model, tmp_path):
    import threading

    from rnnimg.label import coordinator_name

    root, _ = tiny_archive
    videos = os.path.join(root, "videos")
    config = LabelConfig(videos_per_shard=1, batch_size=4)
    whole = label(videos, untrained_model, str(tmp_path / "whole"), config)
    out = str(tmp_path / "killed")
    result, errors = [], []
    job = threading.Thread(target=lambda: _catch(errors, lambda: result.append(label(videos, untrained_model, out, config, run_id="k"))))
    job.start()
    commits = os.path.join(out, "_commits")
    deadline = time.monotonic() + 120
    while job.is_alive() and time.monotonic() < deadline and not (os.path.isdir(commits) and len(os.listdir(commits)) >= 2):
        time.sleep(0.05)
    assert job.is_alive(), "the run ended before its coordinator could be killed"
    committed_before = len(os.listdir(commits))
    ray_local.kill(ray_local.get_actor(coordinator_name("k", 0)), no_restart=False)  # as if its node had gone
    job.join(timeout=300)
    assert not errors, errors
    assert committed_before < whole.shards_done
    assert (result[0].videos, result[0].ok, result[0].clips) == (whole.videos, whole.ok, whole.clips)
    assert result[0].coordinators_restarted == 1 and whole.coordinators_restarted == 0
    for table, key in (("clips", ["video_uri", "clip_index"]), ("videos", ["video_uri"])):
        killed = _rows(out, table, key)
        assert not killed.duplicated(key).any()
        pd.testing.assert_frame_equal(_rows(str(tmp_path / "whole"), table, key), killed)


def _rows(out: str, table: str, key: list[str]) -> pd.DataFrame:
    frame = pads.dataset(os.path.join(out, table)).to_table().to_pandas().drop(columns=["run_id"])
    return frame.sort_values(key).reset_index(drop=True)


def test_a_run_whose_lock_is_taken_over_stops_with_lock_lost_from_its_coordinator(ray_local, tiny_archive, untrained_model, tmp_path):
    """The coordinator checks the driver's fence before each commit: another run's newer lock stops it, and
    the driver raises the coordinator's LockLost (not a Ray wrapper of it)."""
    import threading

    from rnnimg.store_lock import LockLost

    root, _ = tiny_archive
    out = str(tmp_path / "labels")
    errors, results = [], []
    job = threading.Thread(target=lambda: _catch(errors, lambda: results.append(
        label(os.path.join(root, "videos"), untrained_model, out, LabelConfig(videos_per_shard=1, batch_size=1)))))
    job.start()
    commits = os.path.join(out, "_commits")
    deadline = time.monotonic() + 120
    while job.is_alive() and time.monotonic() < deadline and not (os.path.isdir(commits) and os.listdir(commits)):
        time.sleep(0.05)
    assert job.is_alive(), "the run ended before its lock could be taken"
    generations = sorted(int(n[5:-5]) for n in os.listdir(os.path.join(out, "_lock")) if n.startswith("lock-"))
    storage.write_json(os.path.join(out, "_lock", f"lock-{generations[-1] + 1:08d}.json"), {"owner": "another run", "token": "theirs"})
    job.join(timeout=300)
    assert not results and len(errors) == 1 and type(errors[0]) is LockLost, errors
    assert len(os.listdir(commits)) < 14  # 14 videos, one per shard: the run stopped short


def _catch(errors: list, fn) -> None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - reported by the test
        errors.append(err)


def test_manifest_input_with_split_filter_and_accuracy(ray_local, tiny_archive, untrained_model, tmp_path):
    _, manifest = tiny_archive
    out = str(tmp_path / "labels")
    result = label(manifest, untrained_model, out, splits=["test", "unlabelled"])
    n_test = sum(1 for r in pads.dataset(manifest).to_table().to_pylist() if r["split"] == "test")
    assert result.videos == n_test + 2 and result.ok == n_test + 2
    accuracy, compared = clip_accuracy(out, manifest)
    assert compared == 2 * n_test
    truth = {r["video_uri"]: r["label"] for r in pads.dataset(manifest).to_table().to_pylist()}
    clips = pads.dataset(os.path.join(out, "clips")).to_table().to_pylist()
    expected = sum(truth[c["video_uri"]] == c["label"] for c in clips if truth.get(c["video_uri"])) / compared
    assert accuracy == pytest.approx(expected)


def test_long_videos_split_into_ranges_give_the_same_rows(ray_local, tiny_archive, untrained_model, tmp_path):
    root, _ = tiny_archive
    videos = os.path.join(root, "videos", "test")
    whole = label(videos, untrained_model, str(tmp_path / "whole"), LabelConfig(range_seconds=600))
    split = label(videos, untrained_model, str(tmp_path / "split"), LabelConfig(range_seconds=2.0))  # one clip per range
    assert (split.videos, split.ok, split.clips) == (whole.videos, whole.ok, whole.clips)

    pd.testing.assert_frame_equal(_rows(str(tmp_path / "whole"), "clips", ["video_uri", "clip_index"]), _rows(str(tmp_path / "split"), "clips", ["video_uri", "clip_index"]))
    pd.testing.assert_frame_equal(_rows(str(tmp_path / "whole"), "videos", ["video_uri"]), _rows(str(tmp_path / "split"), "videos", ["video_uri"]))
    segments = _rows(str(tmp_path / "split"), "segments", ["video_uri", "start_s"])
    assert segments.clips.sum() == split.clips
    assert split.tables == {"clips": split.clips, "segments": len(segments)}


def _unit(uri, clips, error_type=""):
    return {"shard": 0, "video_uri": uri, "range_index": 0, "ranges_total": 1, "clip_start": 0, "clip_stop": clips,
            "duration_s": 2.0 * clips, "error_type": error_type, "error": "x" if error_type else ""}


def test_pack_units_groups_short_units_and_keeps_long_ones_alone():
    from rnnimg.label import pack_units

    units = [_unit("a", 10), _unit("b", 10), _unit("bad", 0, "open"), _unit("c", 10), _unit("long", 400), _unit("d", 5)]
    packs = pack_units(units, stride_seconds=2.0, pack_seconds=60.0)
    assert [[u["video_uri"] for u in p] for p in packs] == [["a", "b", "bad", "c"], ["long"], ["d"]]
    # Every unit exactly once, in order.
    assert [u for p in packs for u in p] == units
    assert pack_units([], 2.0, 60.0) == []


def test_plan_videos_then_decode_pack_equals_decoding_each_video(tiny_archive):
    """The probe stage's packs, decoded, give each video's clips and one status row, as the
    single-video path does; a long video (here: short ranges) is cut into ranges."""

    from rnnimg.label import decode_pack, decode_video, plan_videos
    from rnnimg.video.clips import ClipSpec

    root, _ = tiny_archive
    folder = os.path.join(root, "videos", "train")
    uris = sorted(os.path.join(folder, n) for n in os.listdir(folder))[:3] + [os.path.join(folder, "missing.mp4")]
    assert len(uris) == 4
    spec = ClipSpec(2.0, 4, 2.0).to_dict()
    batch = {"video_uri": np.array(uris, dtype=object), "shard": np.array([0, 0, 1, 1]), "refused": np.array([""] * 4, dtype=object)}

    packs = plan_videos(batch, spec, range_seconds=8.0)["pack"]  # 4-second videos: two per pack
    assert [[u["video_uri"] for u in json.loads(p)] for p in packs] == [uris[:2], uris[2:]]

    def rows(batches):
        clips, statuses = {}, {}
        for out in batches:
            for j in range(len(out["video_uri"])):
                key = (str(out["video_uri"][j]), int(out["shard"][j]))
                if out["is_status"][j]:
                    statuses.setdefault(key, []).append((out["status"][j], out["error_type"][j], int(out["clips"][j])))
                else:
                    clips[(*key, int(out["clip_index"][j]))] = out["frames"][j]
        return clips, statuses

    got_clips, got_status = rows(b for p in packs for b in decode_pack({"pack": np.array([p], dtype=object)}, spec, 32, 3))
    want_clips, want_status = rows(b for uri, shard in zip(uris, [0, 0, 1, 1])
                                   for b in decode_video({"video_uri": np.array([uri]), "shard": np.array([shard])}, spec, 32, 3))
    assert got_status == want_status
    assert got_status[(uris[3], 1)] == [("failed", "not_found", 0)]
    assert sorted(got_clips) == sorted(want_clips) and len(got_clips) == 6
    assert all(np.array_equal(got_clips[k], want_clips[k]) for k in got_clips)

    ranges = [json.loads(p) for p in plan_videos(batch, spec, range_seconds=2.0)["pack"]]  # one clip per range
    assert [(u["range_index"], u["ranges_total"]) for p in ranges for u in p if u["video_uri"] == uris[0]] == [(0, 2), (1, 2)]


def test_a_second_writer_of_one_output_fails_at_once_naming_the_holder(ray_local, tiny_archive, untrained_model, tmp_path):
    from rnnimg.store_lock import LockHeld, StoreLock

    root, _ = tiny_archive
    videos = os.path.join(root, "videos", "test")
    out = str(tmp_path / "out")
    holder = StoreLock(out, "the other labelling run").acquire()
    try:
        started = time.perf_counter()
        with pytest.raises(LockHeld, match="being written by the other labelling run"):
            label(videos, untrained_model, out)
        assert time.perf_counter() - started < 10
        assert not os.path.exists(os.path.join(out, "_run"))  # nothing written
    finally:
        holder.release()
    result = label(videos, untrained_model, out)  # released: this run writes, and releases in turn
    assert result.videos == result.ok > 0
    assert StoreLock(out, "probe").holder() is None


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_the_sweep_removes_only_the_parts_of_committed_shards(where, tmp_path, request):
    from rnnimg.label import parts_folder, sweep_parts

    out = f"{request.getfixturevalue('s3_bucket')}/labels" if where == "s3" else str(tmp_path / "labels")
    assert sweep_parts(out, {0}) == 0  # no parts at all
    for shard, names in ((0, ["a", "b"]), (1, ["c"]), (12, ["d"])):
        for name in names:
            storage.write_bytes(storage.join(parts_folder(out, shard), f"{name}.parquet"), b"part")
    assert sweep_parts(out, {0, 12, 40}) == 3
    left = sorted(storage.basename(f.uri) for f in storage.list_files(storage.join(out, "_parts")))
    assert left == ["c.parquet"]  # shard 1 has not committed: its parts are kept for its commit
    assert sweep_parts(out, {0, 12}) == 0
