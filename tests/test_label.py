"""The labelling job on a real local Ray: tables, failed rows, resume without duplicates."""

import json
import os
import shutil

import duckdb
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
    (videos / "broken" / "random.mkv").write_bytes(os.urandom(4096))
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
        assert name in row.error and row.error_type in ("open", "empty")
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

    third = label(videos, untrained_model, out, LabelConfig(videos_per_shard=2, batch_size=4))
    assert third.shards_done == 0 and third.clips == first.clips


def test_rerun_with_another_model_into_the_same_output_is_refused(ray_local, archive_with_broken, untrained_model, tmp_path):
    from tests.media import export_untrained_model

    videos, _ = archive_with_broken
    out = str(tmp_path / "labels")
    label(os.path.join(videos, "unlabelled"), untrained_model, out)
    other = export_untrained_model(str(tmp_path / "other"), rnn_type="gru")
    with pytest.raises(LabelError, match="already holds a run"):
        label(os.path.join(videos, "unlabelled"), other, out)


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

    def rows(out, table, key):
        frame = pads.dataset(os.path.join(out, table)).to_table().to_pandas().drop(columns=["run_id"])
        return frame.sort_values(key).reset_index(drop=True)

    pd.testing.assert_frame_equal(rows(str(tmp_path / "whole"), "clips", ["video_uri", "clip_index"]), rows(str(tmp_path / "split"), "clips", ["video_uri", "clip_index"]))
    pd.testing.assert_frame_equal(rows(str(tmp_path / "whole"), "videos", ["video_uri"]), rows(str(tmp_path / "split"), "videos", ["video_uri"]))
    segments = rows(str(tmp_path / "split"), "segments", ["video_uri", "start_s"])
    assert segments.clips.sum() == split.clips
    assert split.segments == len(segments)
