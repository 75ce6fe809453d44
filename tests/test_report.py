"""rnnimg.report and `rnnimg report`: Dask summaries of label tables written here in the CLIPS/VIDEOS schemas."""

from __future__ import annotations

import base64
import json
import re

import pandas as pd
import pytest

from rnnimg import storage, tables
from rnnimg.report import REVIEW, VIDEOS_SUMMARY, ReportConfig, ReportError, build_report, label_counts, resolve_labels

THRESHOLD = 0.6


def _clip_rows(video: str, labels: list[str], scores: list[float], run_id: str, stride: float = 2.0) -> list[dict]:
    return [
        {"video_uri": video, "clip_index": i, "start_s": i * stride, "end_s": i * stride + 2.0, "label": label,
         "score": score, "model_id": "m1", "run_id": run_id}
        for i, (label, score) in enumerate(zip(labels, scores))
    ]


def _video_row(video: str, clips: int, run_id: str, status: str = "ok") -> dict:
    failed = status == "failed"
    return {"video_uri": video, "status": status, "duration_s": None if failed else 2.0 * clips, "clips": clips,
            "error_type": "open" if failed else None, "error": f"{video}: cannot open" if failed else None,
            "attempt": 1, "model_id": "m1", "run_id": run_id}


def write_run(out: str, videos: dict[str, tuple[list[str], list[float]]], run_id: str, per_shard: int = 3, failed: tuple = ()) -> None:
    """One labelling output in the store layout of rnnimg.label: shards of clips/ and videos/, _run/config.json."""
    names = sorted(videos) + list(failed)
    for shard, start in enumerate(range(0, len(names), per_shard)):
        clips, rows = [], []
        for video in names[start : start + per_shard]:
            if video in failed:
                rows.append(_video_row(video, 0, run_id, "failed"))
                continue
            labels, scores = videos[video]
            clips += _clip_rows(video, labels, scores, run_id)
            rows.append(_video_row(video, len(labels), run_id))
        name = f"shard-{shard:05d}.parquet"
        storage.write_table(tables.table_from_rows(clips, tables.CLIPS), storage.join(out, "clips", name))
        storage.write_table(tables.table_from_rows(rows, tables.VIDEOS), storage.join(out, "videos", name))
    storage.write_json(storage.join(out, "_run", "config.json"), {"run_id": run_id, "model_id": "m1"})


VIDEOS = {
    "/archive/a.mp4": (["left", "left", "right", "left"], [0.9, 0.8, 0.55, 0.95]),
    "/archive/b.mp4": (["right", "right"], [0.7, 0.5]),
    "/archive/c.mp4": (["up", "left", "up", "up", "up"], [0.99, 0.4, 0.9, 0.9, 0.61]),
    "/archive/d.mp4": (["left", "right"], [0.65, 0.65]),  # a tie: the first label by name wins
    "/archive/e.mp4": (["right"], [0.3]),
}
FAILED = ("/archive/z-broken.mp4",)


def expected_frames():
    clips = pd.DataFrame([r for v, (ls, ss) in VIDEOS.items() for r in _clip_rows(v, ls, ss, "r1")])
    clips["duration"] = clips["end_s"] - clips["start_s"]
    per_label = clips.groupby("label").agg(clips=("score", "size"), duration_s=("duration", "sum"), videos=("video_uri", "nunique"))
    return clips, per_label


@pytest.fixture
def labels_run(tmp_path):
    out = str(tmp_path / "labels")
    write_run(out, VIDEOS, "r1", failed=FAILED)
    return out


def test_report_tables_match_a_direct_computation(labels_run, tmp_path):
    report = str(tmp_path / "report")
    result = build_report(labels_run, report, ReportConfig(threshold=THRESHOLD, timeline_videos=3))
    clips, per_label = expected_frames()

    labels = pd.read_parquet(storage.join(report, "labels.parquet")).set_index("label")
    assert list(labels.index) == ["left", "right", "up"]
    for label, row in per_label.iterrows():
        assert labels.loc[label, "clips"] == row["clips"]
        assert labels.loc[label, "videos"] == row["videos"]
        assert labels.loc[label, "duration_s"] == pytest.approx(row["duration_s"])
        assert labels.loc[label, "low_confidence_clips"] == int(((clips.label == label) & (clips.score < THRESHOLD)).sum())
    assert labels["share"].sum() == pytest.approx(1.0)

    videos = pd.read_parquet(storage.join(report, "videos")).set_index("video_uri")
    assert list(pd.read_parquet(storage.join(report, "videos")).columns) == VIDEOS_SUMMARY.names
    assert len(videos) == len(VIDEOS) + len(FAILED)
    assert videos.loc["/archive/a.mp4", "dominant_label"] == "left"
    assert videos.loc["/archive/a.mp4", "dominant_share"] == pytest.approx(0.75)
    assert videos.loc["/archive/c.mp4", "dominant_label"] == "up"
    assert videos.loc["/archive/c.mp4", "dominant_share"] == pytest.approx(0.8)
    assert videos.loc["/archive/d.mp4", "dominant_label"] == "left"  # tie -> first by name
    assert videos.loc["/archive/b.mp4", "mean_score"] == pytest.approx(0.6)
    broken = videos.loc[FAILED[0]]
    assert broken["status"] == "failed" and broken["clips"] == 0 and pd.isna(broken["dominant_label"]) and pd.isna(broken["mean_score"])
    assert broken["error_type"] == "open"

    review = pd.read_parquet(storage.join(report, "review"))
    assert list(review.columns) == REVIEW.names
    expected_review = clips[clips.score < THRESHOLD]
    assert len(review) == len(expected_review) == result.low_confidence_clips
    assert sorted(zip(review.video_uri, review.clip_index)) == sorted(zip(expected_review.video_uri, expected_review.clip_index))

    assert (result.videos, result.ok, result.failed, result.clips) == (6, 5, 1, len(clips))
    assert result.label_clips == {k: int(v) for k, v in per_label["clips"].items()}
    summary = json.loads(storage.read_bytes(storage.join(report, "summary.json")))
    assert summary["error_types"] == {"open": 1} and summary["clips"] == len(clips)
    assert summary["task"] == result.task == "classify"  # a run that records no task is a classifier's


def test_html_embeds_the_plots_and_the_lowest_scores(labels_run, tmp_path):
    report = str(tmp_path / "report")
    result = build_report(labels_run, report, ReportConfig(threshold=THRESHOLD, timeline_videos=2, review_examples=3))
    page = storage.read_bytes(result.html).decode()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # distribution, score histogram, timeline
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert "http://" not in page and "https://" not in page  # viewable offline
    assert "/archive/a.mp4" in page and "/archive/b.mp4" in page and "/archive/c.mp4" not in page.split("<h2>Review")[0]
    lowest = page.split("<h2>Review")[1]
    assert lowest.count("<tr>") == 1 + 3  # header + the 3 lowest scores
    assert "0.300" in lowest and "0.400" in lowest


def test_base_folder_reports_each_videos_latest_run(tmp_path):
    """A label-videos base: a changed video relabelled by run r2 counts once, with r2's labels."""
    base = str(tmp_path / "base")
    write_run(storage.join(base, "runs", "r1"), {"/a.mp4": (["left"] * 3, [0.9] * 3), "/b.mp4": (["left"] * 2, [0.9] * 2)}, "r1")
    write_run(storage.join(base, "runs", "r2"), {"/b.mp4": (["right"] * 4, [0.8] * 4)}, "r2")
    write_run(storage.join(base, "runs", "r3"), {"/c.mp4": (["up"], [0.9])}, "r3")  # an abandoned run: not read
    runs = [{"run_id": "r1", "model_id": "m1", "status": "completed"}, {"run_id": "r2", "model_id": "m1", "status": "completed"},
            {"run_id": "r3", "model_id": "m1", "status": "abandoned"}]
    storage.write_json(storage.join(base, "state.json"), {"version": 1, "runs": runs, "last_success": {"m1": "r2"}, "pending": None})

    source = resolve_labels(base)
    assert source.kind == "base" and source.runs == ["r1", "r2"] and source.model_id == "m1"
    result = build_report(base, str(tmp_path / "report"))
    assert result.videos == 2 and result.clips == 3 + 4
    assert result.label_clips == {"left": 3, "right": 4}
    videos = pd.read_parquet(str(tmp_path / "report" / "videos")).set_index("video_uri")
    assert videos.loc["/b.mp4", "run_id"] == "r2" and videos.loc["/b.mp4", "dominant_label"] == "right"

    with pytest.raises(ReportError, match="no completed run of model 'other'"):
        resolve_labels(base, model_id="other")


def test_errors_say_what_was_given(tmp_path):
    with pytest.raises(ReportError, match="no label tables at .*expected a labelling output"):
        build_report(str(tmp_path / "nothing"), str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 1.5"):
        ReportConfig(threshold=1.5)
    with pytest.raises(ValueError, match="timeline_videos must be an integer >= 0, got -1"):
        ReportConfig(timeline_videos=-1)
    with pytest.raises(ValueError, match="overlay_frames must be an integer in \\[1, 16\\], got 0"):
        ReportConfig(overlay_frames=0)


def test_labels_of_a_task_without_a_report_are_refused_by_name(tmp_path):
    labels = str(tmp_path / "labels")
    write_run(labels, {"/a.mp4": (["left"], [0.9])}, "r1")
    storage.write_json(storage.join(labels, "_run", "config.json"), {"run_id": "r1", "model_id": "m1", "task": "mytask"})
    assert resolve_labels(labels).task == "mytask"
    with pytest.raises(ReportError, match=r"holds labels of task 'mytask'; the report reads the tables of tasks "
                                          r"\['classify', 'objects', 'predict', 'segment'\]"):
        build_report(labels, str(tmp_path / "report"))


def test_label_counts_streams_one_run(labels_run):
    assert label_counts(labels_run) == {"left": 5, "right": 5, "up": 4}


def test_cli_report(labels_run, tmp_path, capsys):
    from rnnimg.cli import main

    report = str(tmp_path / "cli-report")
    assert main(["report", labels_run, "--out", report, "--threshold", "0.5", "--timeline-videos", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["low_confidence_clips"] == 2 and summary["threshold"] == 0.5 and summary["html"].endswith("index.html")
    assert storage.exists(storage.join(report, "index.html"))

    assert main(["report", str(tmp_path / "missing"), "--out", report]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rnnimg report: error: no label tables at") and "\n" not in err
    assert main(["report", labels_run, "--out", report, "--threshold", "2"]) == 2
    assert "threshold must be in (0, 1], got 2.0" in capsys.readouterr().err


@pytest.mark.s3
def test_report_on_s3(s3_bucket):
    labels, report = f"{s3_bucket}/labels", f"{s3_bucket}/report"
    write_run(labels, VIDEOS, "r1", failed=FAILED)
    result = build_report(labels, report, ReportConfig(threshold=THRESHOLD))
    assert result.html == f"{report}/index.html" and storage.exists(result.html)
    per_label = storage.read_table(f"{report}/labels.parquet").to_pydict()
    assert dict(zip(per_label["label"], per_label["clips"])) == {"left": 5, "right": 5, "up": 4}
    assert storage.read_table(f"{report}/videos").num_rows == len(VIDEOS) + len(FAILED)
    assert storage.read_table(f"{report}/review").num_rows == result.low_confidence_clips > 0


def test_review_page_panels_failed_files_and_queue(labels_run, tmp_path):
    """The review page without a browser: a player and a timeline of segments per video, the failed files, the queue."""
    report = str(tmp_path / "report")
    result = build_report(labels_run, report, ReportConfig(threshold=THRESHOLD, timeline_videos=3, review_examples=3))
    page = storage.read_bytes(result.html).decode()
    panels = re.findall(r'<section class="video" id="video-(\d+)" data-uri="([^"]+)">(.*?)</section>', page, re.S)
    assert [(i, uri) for i, uri, _ in panels] == [("0", "/archive/a.mp4"), ("1", "/archive/b.mp4"), ("2", "/archive/c.mp4")]
    body = dict((uri, text) for _, uri, text in panels)
    # A local video is linked relative to the report folder.
    src = re.search(r'<video class="player"[^>]* src="([^"]+)"', body["/archive/a.mp4"]).group(1)
    assert not src.startswith("/") and storage.normalize(str(tmp_path / "report" / src)) == "/archive/a.mp4"
    # a.mp4: left, left, right, left (clips of 2 s every 2 s) -> segments left [0, 4), right [4, 6), left [6, 8).
    segments = re.findall(r'class="seg" data-start="([\d.]+)" data-end="([\d.]+)" data-label="(\w+)"', body["/archive/a.mp4"])
    assert segments == [("0.000", "4.000", "left"), ("4.000", "6.000", "right"), ("6.000", "8.000", "left")]
    # c.mp4: up, left, up, up, up -> three segments; widths are shares of the declared 10 s duration.
    c = re.findall(r'data-start="([\d.]+)"[^>]*style="left:([\d.]+)%;width:([\d.]+)%', body["/archive/c.mp4"])
    assert c == [("0.000", "0.000", "20.000"), ("2.000", "20.000", "20.000"), ("4.000", "40.000", "60.000")]
    # The failed file and its reason, in the overview.
    overview = page.split('<h2 id="videos">')[0]
    assert "/archive/z-broken.mp4" in overview and "/archive/z-broken.mp4: cannot open" in overview
    # The queue: one play button per row, starting at the clip's start.
    plays = re.findall(r'class="queue-play" data-src="([^"]+)" data-start="([\d.]+)" data-end="([\d.]+)"', page)
    assert [(s, e) for _, s, e in plays] == [("0.000", "2.000"), ("2.000", "4.000"), ("2.000", "4.000")]  # e 0.3, c 0.4, b 0.5
    assert plays[0][0].endswith("archive/e.mp4")
    assert "<script src" not in page and "<link" not in page


def test_merge_clips_and_video_links(tmp_path, monkeypatch):
    from rnnimg.report import merge_clips, video_src

    clips = pd.DataFrame(_clip_rows("/v.mp4", ["a", "a", "b", "a"], [0.5, 0.7, 0.9, 0.8], "r1", stride=1.0))
    merged = merge_clips(clips)
    assert merged[["start_s", "end_s", "label"]].values.tolist() == [[0.0, 3.0, "a"], [2.0, 4.0, "b"], [3.0, 5.0, "a"]]
    assert merged["score"].tolist() == pytest.approx([0.6, 0.9, 0.8])
    assert merge_clips(clips.iloc[:0]).empty

    out = str(tmp_path / "r")
    assert video_src(str(tmp_path / "x y.mp4"), out, 60)[0] == "../x%20y.mp4"
    assert video_src("file://" + str(tmp_path / "v" / "a.mp4"), out, 60)[0] == "../v/a.mp4"
    assert video_src("/data/a.mp4", "s3://bucket/report", 60) == (None, "a local video cannot be played from a report written to S3")
    with pytest.raises(ValueError, match="link_expires_s must be an integer in \\[60, 604800\\]"):
        ReportConfig(link_expires_s=8 * 24 * 3600)


def test_presigned_url_is_signed_locally_and_checks_its_input(monkeypatch):
    from urllib.parse import parse_qs, urlparse

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: signing makes no request
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPRESIGNTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "presign-secret-key")
    url = storage.presigned_url("s3://bucket/videos/a b.mp4", 900)
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    assert f"{parsed.scheme}://{parsed.netloc}{parsed.path}" == "http://127.0.0.1:9/bucket/videos/a%20b.mp4"
    assert query["X-Amz-Expires"] == ["900"] and query["X-Amz-Credential"][0].startswith("AKIAPRESIGNTEST/")
    assert "X-Amz-Signature" in query and "presign-secret-key" not in url
    with pytest.raises(ValueError, match="needs an s3:// location"):
        storage.presigned_url("/local/a.mp4", 900)
    with pytest.raises(ValueError, match="needs an object key"):
        storage.presigned_url("s3://bucket", 900)
    with pytest.raises(ValueError, match="expires_s must be an integer in \\[1, 604800\\]"):
        storage.presigned_url("s3://bucket/a.mp4", 8 * 24 * 3600)
