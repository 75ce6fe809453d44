"""Reports of task ``segment``: `rnnimg report` over a masks table (area per video, timeline, overlays
drawn on real decoded frames) and the training report's overlay from a manifest's validation videos."""

from __future__ import annotations

import base64
import json
import os
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from rnnimg import rle, storage, tables, tasks
from rnnimg.report import AREAS_TABLE, MASK_VIDEOS_SUMMARY, ReportConfig, ReportError, build_report, overlay_frames, pick_overlay_rows
from rnnimg.tasks.segment_report import OVERLAY_PNG, REPORT, clip_iou, outline, sample_overlay, tint, write_report
from rnnimg.video.clips import frame_times
from tests.media import frame_index, index_frame, write_video

FPS = 10
SECONDS = 2.0
MASK_SIZE = 16  # the "model's frame size": masks rows are 16 x 16, the videos 32 x 32
FRAMES_PER_CLIP = 4


def _square(k: int) -> np.ndarray:
    """A k x k square at the top left of a MASK_SIZE frame."""
    mask = np.zeros((MASK_SIZE, MASK_SIZE), bool)
    mask[:k, :k] = True
    return mask


def _mask_rows(video: str, sizes: list[int], run_id: str, clip_seconds: float = 1.0) -> list[dict]:
    """Rows of the masks table as the label job writes them: 2 clips of 1 s, 4 sampled frames each."""
    rows = []
    for n, k in enumerate(sizes):
        clip, i = divmod(n, FRAMES_PER_CLIP)
        mask = _square(k)
        rows.append({"video_uri": video, "clip_index": clip, "frame_time_s": frame_times(clip * clip_seconds, clip_seconds, FRAMES_PER_CLIP)[i],
                     "height": MASK_SIZE, "width": MASK_SIZE, "rle": json.dumps(rle.encode(mask)["counts"]),
                     "area_fraction": float(mask.mean()), "model_id": "m1", "run_id": run_id})
    return rows


def _video_row(video: str, clips: int, run_id: str, status: str = "ok") -> dict:
    failed = status == "failed"
    return {"video_uri": video, "status": status, "duration_s": None if failed else SECONDS, "clips": clips,
            "error_type": "open" if failed else None, "error": f"{video}: cannot open" if failed else None,
            "attempt": 1, "model_id": "m1", "run_id": run_id}


def write_masks_run(out: str, videos: dict[str, list[int]], run_id: str, failed: tuple = (), task: str = "segment") -> None:
    """One segmentation labelling output in the store layout of rnnimg.label: masks/, videos/ (one shard per video), _run/config.json."""
    for shard, video in enumerate(sorted([*videos, *failed])):
        name = f"shard-{shard:05d}.parquet"
        masks = [] if video in failed else _mask_rows(video, videos[video], run_id)
        row = _video_row(video, 0, run_id, "failed") if video in failed else _video_row(video, len(videos[video]) // FRAMES_PER_CLIP, run_id)
        storage.write_table(tables.table_from_rows(masks, tables.MASKS), storage.join(out, "masks", name))
        storage.write_table(tables.table_from_rows([row], tables.VIDEOS), storage.join(out, "videos", name))
    storage.write_json(storage.join(out, "_run", "config.json"), {"run_id": run_id, "model_id": "m1", "task": task})


@pytest.fixture(scope="module")
def masks_run(tmp_path_factory):
    """Real 32 x 32 videos whose frames say their index, and masks rows for them (labels at 16 x 16).

    ``c-gone.mp4`` has masks but its file is no video any more (an overlay cannot be drawn);
    ``z-broken.mp4`` failed in labelling (no masks).
    """
    root = tmp_path_factory.mktemp("masks")
    frames = np.stack([index_frame(i, (32, 32)) for i in range(int(SECONDS * FPS))])
    a, b, c = (write_video(str(root / f"{n}.mp4"), frames, fps=FPS) for n in ("a", "b", "c-gone"))
    with open(c, "wb") as f:
        f.write(b"this is not a video any more")
    videos = {a: [0, 2, 4, 6, 8, 10, 12, 16], b: [0, 0, 0, 0, 1, 1, 0, 0], c: [3] * 8}
    failed = (str(root / "z-broken.mp4"),)
    out = str(root / "labels")
    write_masks_run(out, videos, "r1", failed=failed)
    return out, videos, failed


def _expected(videos: dict[str, list[int]]) -> pd.DataFrame:
    rows = pd.DataFrame([r for v, sizes in videos.items() for r in _mask_rows(v, sizes, "r1")])
    return rows.groupby("video_uri").agg(frames=("area_fraction", "size"), mean=("area_fraction", "mean"), max=("area_fraction", "max"),
                                         with_mask=("area_fraction", lambda s: int((s > 0).sum())))


def test_masks_report_numbers_match_the_input_rows(masks_run, tmp_path):
    labels, videos, failed = masks_run
    report = str(tmp_path / "report")
    result = build_report(labels, report, ReportConfig(timeline_videos=3, overlay_videos=3, area_bins=10))
    expected = _expected(videos)

    per_video = pd.read_parquet(storage.join(report, "videos"))
    assert list(per_video.columns) == MASK_VIDEOS_SUMMARY.names
    per_video = per_video.set_index("video_uri")
    assert len(per_video) == len(videos) + len(failed)
    for uri, row in expected.iterrows():
        got = per_video.loc[uri]
        assert (got["status"], got["clips"], got["frames"], got["frames_with_mask"]) == ("ok", 2, row["frames"], row["with_mask"])
        assert got["mean_area_fraction"] == pytest.approx(row["mean"], rel=1e-6)
        assert got["max_area_fraction"] == pytest.approx(row["max"], rel=1e-6)
    broken = per_video.loc[failed[0]]
    assert broken["status"] == "failed" and broken["frames"] == 0 and pd.isna(broken["mean_area_fraction"]) and broken["error_type"] == "open"

    all_areas = np.array([float(_square(k).mean()) for sizes in videos.values() for k in sizes])
    areas = pd.read_parquet(storage.join(report, AREAS_TABLE))
    assert len(areas) == 10 and areas["frames"].sum() == len(all_areas)
    assert areas["frames"].tolist() == np.histogram(np.minimum(all_areas, 0.999), bins=10, range=(0, 1))[0].tolist()

    assert (result.task, result.videos, result.ok, result.failed, result.frames) == ("segment", 4, 3, 1, len(all_areas))
    assert result.frames_with_mask == int((all_areas > 0).sum())
    assert result.mean_area_fraction == pytest.approx(all_areas.mean(), rel=1e-6)
    summary = json.loads(storage.read_bytes(storage.join(report, "summary.json")))
    assert summary["task"] == "segment" and summary["frames"] == len(all_areas) and summary["error_types"] == {"open": 1}
    a, b, c = sorted(videos)
    assert summary["overlays"] == [a, b] and list(summary["overlay_notes"]) == [c]


def test_masks_page_embeds_timeline_and_overlays_and_notes_an_undecodable_video(masks_run, tmp_path):
    labels, videos, failed = masks_run
    a, b, c = sorted(videos)
    result = build_report(labels, str(tmp_path / "report"), ReportConfig(timeline_videos=4, overlay_videos=3, overlay_frames=3))
    page = storage.read_bytes(result.html).decode()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [alt for alt, _ in images] == ["mask area histogram", "mask area timeline per video", f"mask overlay of {a}", f"mask overlay of {b}"]
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for _, data in images)
    assert "http://" not in page and "https://" not in page  # viewable offline
    timeline = page.split("<h2>Timeline</h2>")[1].split("<h2>")[0]
    assert all(uri in timeline for uri in (a, b, c, failed[0]))  # the first 4 videos by URI, the failed one too
    note = re.search(rf'<p class="note">{re.escape(c)}: overlay not drawn: ([^<]+)</p>', page)
    assert note and "c-gone.mp4" in note.group(1)
    assert result.overlay_notes[c].startswith(c)


def test_overlay_frames_are_decoded_at_the_sampled_times_and_the_mask_size(masks_run):
    labels, videos, _ = masks_run
    a = sorted(videos)[0]
    rows = pd.read_parquet(os.path.join(labels, "masks"))
    rows = rows[rows["video_uri"] == a]
    picked = pick_overlay_rows(rows, 3)
    assert picked["frame_time_s"].tolist() == pytest.approx([0.125, 1.125, 1.875])  # first, middle, last of 8 distinct times
    drawn = overlay_frames(a, picked)
    for (time_s, frame, mask, area), (_, row) in zip(drawn, picked.iterrows()):
        assert frame.shape == (MASK_SIZE, MASK_SIZE, 3) and frame.dtype == np.uint8
        assert frame_index(frame) == int(time_s * FPS)  # the frame shown at that time
        np.testing.assert_array_equal(mask, rle.decode({"size": [MASK_SIZE, MASK_SIZE], "counts": json.loads(row["rle"])}))
        assert area == pytest.approx(mask.mean())
    # Overlapping clips sample a time twice: it is drawn once.
    doubled = pd.concat([rows, rows.assign(clip_index=rows["clip_index"] + 10)])
    assert pick_overlay_rows(doubled, 16)["frame_time_s"].is_unique and len(pick_overlay_rows(doubled, 16)) == 8


def test_tint_blends_only_the_mask():
    frame = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True
    out = tint(frame, mask, colour=(200, 0, 0), alpha=0.5)
    assert out[1, 2].tolist() == [150, 50, 50]
    assert (out[~mask] == 100).all()
    with pytest.raises(ValueError, match=r"mask of shape \(2, 2\) does not fit a frame of shape \(4, 4, 3\)"):
        tint(frame, np.zeros((2, 2)))
    square = np.zeros((5, 5), bool)
    square[1:4, 1:4] = True
    ring = square.copy()
    ring[2, 2] = False  # the centre has all four neighbours inside
    np.testing.assert_array_equal(outline(square), ring)
    assert outline(np.ones((2, 2))).all()  # at the frame's edge every pixel is outline


def test_masks_base_keeps_each_videos_latest_run_and_refuses_mixed_tasks(masks_run, tmp_path):
    _, videos, _ = masks_run
    a, b, _ = sorted(videos)
    base = str(tmp_path / "base")
    write_masks_run(storage.join(base, "runs", "r1"), {a: [2] * 8, b: [2] * 8}, "r1")
    write_masks_run(storage.join(base, "runs", "r2"), {b: [4] * 8}, "r2")  # b changed and was relabelled
    runs = [{"run_id": r, "model_id": "m1", "status": "completed"} for r in ("r1", "r2")]
    storage.write_json(storage.join(base, "state.json"), {"version": 1, "runs": runs, "last_success": {"m1": "r2"}, "pending": None})
    result = build_report(base, str(tmp_path / "report"), ReportConfig(overlay_videos=1, overlay_frames=1))
    assert result.task == "segment" and result.runs == ["r1", "r2"] and result.videos == 2 and result.frames == 16
    per_video = pd.read_parquet(str(tmp_path / "report" / "videos")).set_index("video_uri")
    assert per_video.loc[b, "run_id"] == "r2" and per_video.loc[b, "mean_area_fraction"] == pytest.approx(16 / 256)
    assert result.overlays == [a] and not result.overlay_notes

    write_masks_run(storage.join(base, "runs", "r2"), {b: [4] * 8}, "r2", task="classify")
    with pytest.raises(ReportError, match="are of different tasks"):
        build_report(base, str(tmp_path / "report2"))


def test_cli_reports_masks(masks_run, tmp_path, capsys):
    from rnnimg.cli import main

    labels, videos, _ = masks_run
    assert main(["report", labels, "--out", str(tmp_path / "cli"), "--timeline-videos", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "segment" and summary["frames"] == sum(len(s) for s in videos.values())
    assert storage.exists(str(tmp_path / "cli" / "index.html"))


@pytest.mark.s3
def test_masks_report_on_s3(masks_run, s3_bucket):
    """Tables, videos and report all in a bucket: Dask reads the masks there, the overlays decode from there."""
    _, videos, _ = masks_run
    a = sorted(videos)[0]
    video = f"{s3_bucket}/videos/a.mp4"
    with open(a, "rb") as f:
        storage.write_bytes(video, f.read())
    gone = f"{s3_bucket}/videos/gone.mp4"  # labelled, then deleted
    labels, report = f"{s3_bucket}/labels", f"{s3_bucket}/report"
    write_masks_run(labels, {video: videos[a], gone: [1] * 8}, "r1")
    result = build_report(labels, report, ReportConfig(overlay_frames=2))
    assert result.task == "segment" and result.frames == 16 and result.overlays == [video] and list(result.overlay_notes) == [gone]
    assert storage.read_table(f"{report}/videos").num_rows == 2
    page = storage.read_bytes(result.html).decode()
    assert f'alt="mask overlay of {video}"' in page and "overlay not drawn" in page


# ----------------------------------------------------------------------------- training report


@pytest.fixture(scope="module")
def val_archive(tmp_path_factory):
    """A small segment archive (2 s videos, 32 x 32) and an untrained exported segmenter at 32 x 32."""
    from rnnimg.tasks.segment_synth import SegmentSynthConfig, make_archive
    from tests.media import export_untrained_model

    root = tmp_path_factory.mktemp("seg-val")
    manifest = make_archive(str(root / "archive"), SegmentSynthConfig(videos=4, seed=4, size=32, seconds=2.0, val_fraction=0.5), processes=1)
    model = export_untrained_model(str(root / "model"), task="segment", frame_size=32, frames_per_clip=4, channels=[8, 8], hidden=8)
    return manifest, model


def test_training_report_draws_the_manifests_validation_videos(val_archive):
    import torch

    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks.segment import load_masks, masks_at
    from rnnimg.video.decode import read_clip
    from rnnimg.video.clips import Clip

    manifest, model_uri = val_archive
    job, model, config, model_id = tasks.load_model(model_uri)
    val = pq.read_table(manifest).to_pandas().query("split == 'val'")
    assert len(val) >= 2
    samples, notes = sample_overlay(model_uri, config, manifest, videos=2)
    assert not notes and [s.video_uri for s in samples] == val["video_uri"].tolist()[:2]  # the archive's URIs are absolute
    for sample, (_, row) in zip(samples, val.iterrows()):
        # Independently: the first clip at the model's frame size, the truth from the .npz, the model's masks.
        clip = Clip(0, 0.0, config.clip_seconds, frame_times(0.0, config.clip_seconds, config.frames_per_clip))
        frames = read_clip(sample.video_uri, clip, (32, 32))
        masks, times = load_masks(row["mask_uri"])
        truth = masks_at(masks, times, clip.timestamps, 32).astype(bool)
        with torch.inference_mode():
            predicted = (model(to_model_input(frames))[0, :, 0] > 0).numpy()
        assert sample.frame.shape == (32, 32, 3)
        np.testing.assert_array_equal(sample.frame, frames[-1])
        np.testing.assert_array_equal(sample.truth, truth[-1])
        assert sample.iou == pytest.approx(clip_iou(truth, predicted))

    report = job.write_report(model_uri, {"iou": 0.5, "loss": 0.7, "clips": 3, "iou_per_step": [0.4, 0.5, 0.5, 0.6]},
                              [{"epoch": 1, "train_loss": 0.8, "val_loss": 0.7, "train_iou": 0.4, "val_iou": 0.5}], {"epoch": 1}, config,
                              model_id, manifest_uri=manifest)
    assert report.report_uri == os.path.join(model_uri, REPORT)
    with open(os.path.join(model_uri, OVERLAY_PNG), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    first = samples[0]
    assert f"| {os.path.basename(first.video_uri)} | 0.0-2.0 s | {first.iou:.3f} |" in report.markdown
    assert f"({OVERLAY_PNG})" in report.markdown


def test_training_report_notes_an_unreadable_validation_video(val_archive, tmp_path):
    import pyarrow as pa

    from tests.media import export_untrained_model

    manifest, _ = val_archive
    table = pq.read_table(manifest).to_pandas()
    table.loc[table["split"] == "val", "video_uri"] = str(tmp_path / "missing.mp4")
    broken = str(tmp_path / "manifest.parquet")
    storage.write_table(pa.Table.from_pandas(table, preserve_index=False), broken)
    model_uri = export_untrained_model(str(tmp_path / "model"), task="segment", frame_size=32, frames_per_clip=4, channels=[8, 8], hidden=8)
    config = tasks.load_model(model_uri)[2]
    report = write_report(model_uri, {"iou": None}, [], {}, config, "m", manifest_uri=broken)
    assert "Overlay not drawn: no readable validation video" in report.markdown
    assert "missing.mp4: not drawn:" in report.markdown
    assert not os.path.exists(os.path.join(model_uri, OVERLAY_PNG))
    without = write_report(model_uri, {"iou": None}, [], {}, config, "m")
    assert "Overlay not drawn: no training manifest was given" in without.markdown


def test_every_tasks_write_report_takes_the_manifest():
    import inspect

    for name in tasks.names():
        parameter = inspect.signature(tasks.get(name).write_report).parameters["manifest_uri"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is None
