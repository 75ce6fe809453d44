"""`rnnimg report` over the tables of an objects model and of a next-frame (surprise) model, each written by the
real label job (Ray Data) with a tiny untrained model over a tiny synthetic archive and one broken file."""

from __future__ import annotations

import base64
import io
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rnnimg import storage
from rnnimg.report import (CLASSES_TABLE, OBJECT_VIDEOS_SUMMARY, RANKING, RANKING_TABLE, SURPRISE_VIDEOS_SUMMARY, ReportConfig, build_report,
                           draw_boxes, frames_at, object_segments)
from tests import test_review_page
from tests.media import export_untrained_model

browser = test_review_page.browser  # the review page's headless Chromium fixture (skips without a Chromium binary)

OBJECTS_TINY = dict(frame_size=32, frames_per_clip=4, cnn_channels=[4, 8], grid=2, feature_dim=16, rnn_hidden=8, clip_seconds=1.0,
                    stride_seconds=1.0, score_threshold=0.5)
PREDICT_TINY = dict(frame_size=32, frames_per_clip=6, context_frames=3, clip_seconds=0.6, stride_seconds=0.3, channels=[8], hidden=8, layers=1)
SECTION = re.compile(r'<section class="video" id="video-(\d+)" data-uri="([^"]+)">(.*?)</section>', re.S)


def _labelled(root: str, task: str, archive, model_config: dict) -> tuple[str, str]:
    """Label every video of a synthetic archive plus one broken file with an untrained model of ``task``; returns (labels, broken)."""
    from rnnimg.label import LabelConfig, label

    archive(root)
    videos = os.path.join(root, "videos")
    broken = os.path.join(videos, "z-broken.mp4")
    storage.write_bytes(broken, b"this is not a video")
    model = export_untrained_model(os.path.join(root, "model"), task=task, **model_config)
    out = os.path.join(root, "labels")
    result = label([videos], model, out, LabelConfig(videos_per_shard=2, batch_size=8))
    assert (result.videos, result.failed) == (4, 1)
    return out, broken


@pytest.fixture(scope="module")
def objects_labels(ray_local, tmp_path_factory):
    """3 videos of moving objects (2 s, 64 x 64) and a broken file, labelled by an untrained objects model (threshold 0.5)."""
    from rnnimg.tasks.objects_synth import ObjectsSynthConfig, make_archive

    root = str(tmp_path_factory.mktemp("objects-report"))
    return _labelled(root, "objects", lambda r: make_archive(r, ObjectsSynthConfig(videos=3, seconds=2.0, seed=5), processes=1), OBJECTS_TINY)


@pytest.fixture(scope="module")
def surprise_labels(ray_local, tmp_path_factory):
    """3 moving-digits videos (2 s, 64 x 64) and a broken file, labelled by an untrained forecaster: 5 clips per video."""
    from rnnimg.tasks.digits_synth import DigitsSynthConfig, make_archive

    root = str(tmp_path_factory.mktemp("surprise-report"))
    return _labelled(root, "predict", lambda r: make_archive(r, DigitsSynthConfig(videos=3, seed=5), processes=1), PREDICT_TINY)


def _runs(times, step: float) -> list[tuple[str, str]]:
    """Expected timeline segments of one class: distinct sampled times, split where they are more than 1.5 steps apart,
    each time covering half a step either side."""
    runs: list[list[float]] = []
    for t in sorted({round(float(t), 6) for t in times}):
        if runs and t - runs[-1][1] <= 1.5 * step + 1e-9:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    return [(f"{max(0.0, a - step / 2):.3f}", f"{b + step / 2:.3f}") for a, b in runs]


# ----------------------------------------------------------------------------- objects


def test_object_segments_and_boxes_on_hand_made_input():
    # Sampled every 0.5 s; 1.0 and 1.5 missing (a gap of 3 steps), 2.0 seen twice (overlapping clips).
    segments = object_segments([0.25, 0.75, 2.25, 2.75, 2.25, 3.25], [0.6, 0.8, 0.5, 0.7, 0.9, 0.6], 0.5)
    assert [(g["start_s"], g["end_s"], g["frames"]) for g in segments] == [(0.0, 1.0, 2), (2.0, 3.5, 3)]
    assert segments[0]["score"] == pytest.approx(0.7) and segments[1]["score"] == pytest.approx((0.7 + 0.7 + 0.6) / 3)
    assert [(g["start_s"], g["end_s"]) for g in object_segments([0.25, 1.25], [1, 1], 0.5)] == [(0.0, 0.5), (1.0, 1.5)]  # 2 steps: apart

    frame = np.zeros((8, 10, 3), np.uint8)
    drawn = draw_boxes(frame, [(0.2, 0.25, 0.6, 0.75, (255, 0, 0))])  # columns 2..5, rows 2..5
    red = (drawn == (255, 0, 0)).all(-1)
    expected = np.zeros((8, 10), bool)
    expected[2:6, 2:6] = True
    expected[3:5, 3:5] = False  # an outline, one pixel thick
    assert (red == expected).all() and not frame.any()  # the input is left as it was


@pytest.mark.ray
def test_objects_report_counts_timelines_and_box_overlays_match_the_tables(objects_labels, tmp_path):
    labels, broken = objects_labels
    objects = pd.read_parquet(os.path.join(labels, "objects"))
    tracks = pd.read_parquet(os.path.join(labels, "tracks"))
    videos = pd.read_parquet(os.path.join(labels, "videos"))
    assert len(objects) > 0 and len(tracks) > 0  # the untrained model detects some classes at 0.5
    report = str(tmp_path / "report")
    result = build_report(labels, report, ReportConfig(timeline_videos=4, overlay_videos=2, overlay_frames=3))

    # Per class: the objects table counted, the tracks table summed.
    classes = pd.read_parquet(os.path.join(report, CLASSES_TABLE)).set_index("label")
    per_class = objects.groupby("label").agg(detections=("score", "size"), mean_score=("score", "mean"))
    per_track = tracks.groupby("label").agg(tracks=("video_uri", "size"), seconds=("seconds_seen", "sum"))
    assert sorted(classes.index) == sorted(set(per_class.index) | set(per_track.index))
    assert classes.loc[per_class.index, "detections"].tolist() == per_class["detections"].tolist()
    assert classes.loc[per_class.index, "mean_score"].tolist() == pytest.approx(per_class["mean_score"].tolist(), rel=1e-5)
    assert classes.loc[per_track.index, "tracks"].tolist() == per_track["tracks"].tolist()
    assert classes.loc[per_track.index, "seconds_seen"].tolist() == pytest.approx(per_track["seconds"].tolist())
    assert classes["share"].sum() == pytest.approx(1.0)

    # Per video: detections and classes from the label tables; the broken file failed, with nothing detected.
    per_video = pd.read_parquet(os.path.join(report, "videos"))
    assert list(per_video.columns) == OBJECT_VIDEOS_SUMMARY.names
    per_video = per_video.set_index("video_uri")
    assert sorted(per_video.index) == sorted(videos["video_uri"])
    for uri, rows in objects.groupby("video_uri"):
        mine = tracks[tracks["video_uri"] == uri].sort_values(["seconds_seen", "label"], ascending=[False, True])
        assert (per_video.loc[uri, "detections"], per_video.loc[uri, "classes"]) == (len(rows), len(mine))
        assert per_video.loc[uri, "top_class"] == mine["label"].iloc[0] and per_video.loc[uri, "status"] == "ok"
    assert (per_video.loc[broken, "status"], per_video.loc[broken, "detections"]) == ("failed", 0)
    assert (result.task, result.videos, result.ok, result.failed, result.detections, result.tracks) == ("objects", 4, 3, 1, len(objects), len(tracks))
    summary = json.loads(storage.read_bytes(os.path.join(report, "summary.json")))
    assert summary["task"] == "objects" and summary["class_detections"] == per_class["detections"].to_dict()

    page = storage.read_bytes(result.html).decode()
    overview = page.split('<h2 id="videos">')[0]
    reason = videos.set_index("video_uri").loc[broken, "error"]
    assert broken in overview and html_escape(reason) in overview  # the failed file and why
    panels = SECTION.findall(page)
    uris = sorted(videos["video_uri"])
    assert [uri for _, uri, _ in panels] == uris
    body = {uri: text for _, uri, text in panels}
    assert "No player: labelling failed" in body[broken]
    # The per-class timeline of each video: one lane per class; its segments are the class's sampled times from the
    # objects table, each covering its sampling interval (the tracks table's seconds_seen / frames), and run from the
    # track's first_seen_s to its last_seen_s.
    for uri in uris[:3]:
        lanes = re.findall(r'<span class="track-name">([^<]+)</span><div class="lane">(.*?)<div class="playhead">', body[uri], re.S)
        assert [name for name, _ in lanes] == sorted(classes.index)
        for name, lane in lanes:
            got = re.findall(r'data-start="([\d.]+)" data-end="([\d.]+)" data-label="([^"]+)"', lane)
            track = tracks[(tracks["video_uri"] == uri) & (tracks["label"] == name)]
            if track.empty:
                assert got == []
                continue
            step = float(track["seconds_seen"].iloc[0]) / int(track["frames"].iloc[0])
            times = objects[(objects["video_uri"] == uri) & (objects["label"] == name)]["frame_time_s"]
            assert [(a, b) for a, b, _ in got] == _runs(times, step) and {c for _, _, c in got} == {name}
            assert float(got[0][0]) == pytest.approx(max(0.0, float(track["first_seen_s"].iloc[0]) - step / 2), abs=1e-3)
            assert float(got[-1][1]) == pytest.approx(float(track["last_seen_s"].iloc[0]) + step / 2, abs=1e-3)

    # Boxes over decoded frames: the first 2 videos with detections; the first picture is the frame at the first
    # detection's time, enlarged, changed only where a box of a detected class's colour is drawn.
    with_objects = [u for u in uris if (objects["video_uri"] == u).any()]
    assert result.overlays == with_objects[:2] and result.overlay_notes == {}
    legend = dict(re.findall(r'<span style="background:(#[0-9a-f]{6})">([^<]+)</span>', page))
    rgb = {name: tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c, name in legend.items()}
    for uri in with_objects[:2]:
        encoded = re.search(r'<figure class="overlay"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', body[uri]).group(1)
        strip = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))
        mine = objects[objects["video_uri"] == uri]
        shown = min(3, mine["frame_time_s"].nunique())
        assert strip.shape == (128, shown * 128 + (shown - 1) * 4, 3)  # 64 x 64 videos enlarged twice, 4 px apart
        first = mine["frame_time_s"].min()
        expected = np.repeat(np.repeat(frames_at(uri, [first])[0], 2, axis=0), 2, axis=1)
        picture = strip[:, :128]
        changed = (picture != expected).any(-1)
        drawn = {tuple(p) for p in picture[changed]}
        detected = set(mine.loc[np.isclose(mine["frame_time_s"], first), "label"])
        assert changed.any() and drawn <= {rgb[name] for name in detected}


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


# ----------------------------------------------------------------------------- surprise


@pytest.mark.ray
def test_surprise_report_ranks_the_table_with_start_thumbnails_and_timelines(surprise_labels, tmp_path):
    labels, broken = surprise_labels
    clips = pd.read_parquet(os.path.join(labels, "clips"))
    videos = pd.read_parquet(os.path.join(labels, "videos"))
    assert len(clips) == 15 and clips["surprise"].nunique() > 5  # 5 clips per video, scores that differ
    report = str(tmp_path / "report")
    result = build_report(labels, report, ReportConfig(timeline_videos=4, surprising_clips=6))

    # The ranking is the clips table sorted by surprise, most surprising first.
    expected = clips.sort_values(["surprise", "video_uri", "clip_index"], ascending=[False, True, True]).head(6)
    ranking = pd.read_parquet(os.path.join(report, RANKING_TABLE))
    assert list(ranking.columns) == RANKING.names and ranking["rank"].tolist() == list(range(1, 7))
    assert ranking[["video_uri", "clip_index"]].values.tolist() == expected[["video_uri", "clip_index"]].values.tolist()
    assert ranking["surprise"].tolist() == pytest.approx(expected["surprise"].astype(float).tolist())
    assert ranking["start_s"].tolist() == pytest.approx(expected["start_s"].tolist())

    per_video = pd.read_parquet(os.path.join(report, "videos"))
    assert list(per_video.columns) == SURPRISE_VIDEOS_SUMMARY.names
    per_video = per_video.set_index("video_uri")
    stats = clips.groupby("video_uri")["surprise"].agg(["size", "mean", "max"])
    for uri, row in stats.iterrows():
        assert per_video.loc[uri, "clips"] == row["size"] and per_video.loc[uri, "max_surprise"] == pytest.approx(row["max"], rel=1e-6)
        assert per_video.loc[uri, "mean_surprise"] == pytest.approx(row["mean"], rel=1e-6)
    assert (per_video.loc[broken, "status"], per_video.loc[broken, "clips"]) == ("failed", 0)
    assert (result.task, result.videos, result.failed, result.clips, result.ranked) == ("predict", 4, 1, 15, 6)
    assert result.max_surprise == pytest.approx(float(clips["surprise"].max()), rel=1e-6)

    # On the page: one play button per ranked clip, in rank order, from the clip's start, showing the frame at its start.
    page = storage.read_bytes(result.html).decode()
    buttons = re.findall(r'class="queue-play" data-src="([^"]+)" data-start="([\d.]+)" data-end="([\d.]+)" data-caption="#(\d+): (\S+) clip (\d+),'
                         r'[^"]*"><img class="start-thumb" alt="[^"]*" src="([^"]+)">', page)
    assert [(int(r), u, int(c), s) for _, s, _, r, u, c, _ in buttons] == [
        (k + 1, row.video_uri, row.clip_index, f"{row.start_s:.3f}") for k, row in enumerate(expected.itertuples(index=False))]
    for src, start, _, _, uri, _, thumb in buttons:
        assert storage.normalize(os.path.join(report, src)) == uri  # linked relative to the report folder
        picture = np.asarray(Image.open(os.path.join(report, thumb)).convert("RGB"), dtype=np.int16)
        frame = Image.fromarray(frames_at(uri, [float(start)])[0]).resize(picture.shape[1::-1], Image.Resampling.BILINEAR)
        assert np.abs(picture - np.asarray(frame, dtype=np.int16)).mean() < 8  # the decoded frame at the clip's start (JPEG)

    # Per video: a player over one track of its clips, each clip with its window and surprise.
    panels = SECTION.findall(page)
    assert [uri for _, uri, _ in panels] == sorted(videos["video_uri"])
    for _, uri, text in panels:
        got = re.findall(r'data-start="([\d.]+)" data-end="([\d.]+)" data-label="clip (\d+)" title="clip \d+: [^"]*surprise ([\d.]+)"', text)
        mine = clips[clips["video_uri"] == uri].sort_values("start_s")
        assert [(s, e, int(c)) for s, e, c, _ in got] == [(f"{r.start_s:.3f}", f"{r.end_s:.3f}", r.clip_index) for r in mine.itertuples(index=False)]
        assert [float(v) for _, _, _, v in got] == pytest.approx(mine["surprise"].astype(float).tolist(), abs=1e-3)
    assert "No player: labelling failed" in dict((u, t) for _, u, t in panels)[broken]
    assert broken in page.split('<h2 id="videos">')[0]


@pytest.mark.slow
@pytest.mark.ray
def test_surprise_page_plays_ranked_clips_and_seeks_in_chromium(surprise_labels, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _open, _seek_by_click, _severe, _wait = (test_review_page._open, test_review_page._seek_by_click, test_review_page._severe,
                                             test_review_page._wait)

    labels, _ = surprise_labels
    result = build_report(labels, str(tmp_path / "report"), ReportConfig(timeline_videos=3, surprising_clips=5))
    states = _open(browser, result.html)
    assert len(states) == 3 and all(s["error"] is None and s["ready"] >= 1 for s in states), states
    start, current = _seek_by_click(browser, 0, 2)  # the third clip of the first video: from 0.6 s
    assert start == 0.6 and current == pytest.approx(start, abs=0.1)
    loaded = browser.execute_script("return Array.from(document.querySelectorAll('.start-thumb')).map(i => i.naturalWidth)")
    assert len(loaded) == 5 and all(w > 0 for w in loaded)
    button = browser.find_elements(By.CSS_SELECTOR, ".queue-play")[0]
    start, end = float(button.get_attribute("data-start")), float(button.get_attribute("data-end"))
    browser.find_elements(By.CSS_SELECTOR, ".start-thumb")[0].click()  # the picture inside the button plays the clip
    played = _wait(browser, "var v = document.getElementById('queue-player');"
                            "return (v.readyState >= 1 && !v.seeking) ? {t: v.currentTime, e: v.error && v.error.code} : null;")
    assert played and played["e"] is None and start - 0.1 <= played["t"] <= end + 0.1, played
    assert "#1:" in browser.find_element(By.ID, "queue-now").text
    assert _severe(browser) == []

