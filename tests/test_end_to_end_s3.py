"""synth -> train -> label entirely on s3:// URLs, through the command line, on a real local Ray
and a real S3 endpoint (moto's server on 127.0.0.1)."""

import contextlib
import io
import json

import pyarrow.dataset as pads
import pytest

from rnnimg import storage
from rnnimg.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.ray]


def run_cli(*args: str) -> dict:
    """Run ``rnnimg ARGS`` in this process (on the session's Ray); return its JSON output.

    Only stdout is redirected: Ray keeps logging handlers on the stderr it first sees.
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return json.loads(out.getvalue())


def test_synth_train_label_on_s3(ray_local, s3_bucket):
    archive, runs, labels = f"{s3_bucket}/archive", f"{s3_bucket}/runs", f"{s3_bucket}/labels"

    manifest = run_cli("synth", archive, "--videos", "10", "--unlabelled", "2", "--seed", "5")["manifest"]
    assert manifest == f"{archive}/manifest.parquet"
    assert len(storage.list_files(f"{archive}/videos", (".mp4",))) == 12

    trained = run_cli("train", manifest, "--out", runs, "--epochs", "2", "--workers", "2", "--name", "s3run")
    model = trained["model"]
    assert model == f"{runs}/model"
    for name in ("model.safetensors", "config.json", "labels.json", "metrics.json"):
        assert storage.exists(f"{model}/{name}"), name
    metrics = storage.read_json(f"{model}/metrics.json")
    assert len(metrics["history"]) == 2 and 0.0 <= metrics["best"]["val_acc"] <= 1.0
    # Checkpoints went to the store too.
    assert storage.list_files(f"{runs}/ray/s3run")

    summary = run_cli("label", f"{archive}/videos/test", f"{archive}/videos/unlabelled", "--model", model, "--out", labels, "--truth", manifest)
    assert summary["ok"] == summary["videos"] == 2 + 2 and summary["failed"] == 0
    assert summary["test_clips"] == 2 * 2

    fs, path = storage.resolve(labels)
    clips = pads.dataset(f"{path}/clips", filesystem=fs, format="parquet").to_table()
    videos = pads.dataset(f"{path}/videos", filesystem=fs, format="parquet").to_table()
    assert clips.num_rows == summary["clips"] == 8
    assert set(videos.column("status").to_pylist()) == {"ok"}
    assert all(uri.startswith(f"{archive}/videos/") for uri in clips.column("video_uri").to_pylist())


def test_a_remote_manifest_names_only_its_own_bucket_unless_allowed(ray_local, s3_bucket, s3_server, tiny_archive, untrained_model, tmp_path):
    """Escaping URIs become `refused` rows (never opened); --allow-prefix admits what the user names."""
    import boto3
    import pyarrow as pa

    root, _ = tiny_archive
    video = sorted(f.uri for f in storage.list_files(f"{root}/videos/test"))[0]
    data = open(video, "rb").read()
    storage.write_bytes(f"{s3_bucket}/archive/videos/own.mp4", data)
    other = s3_bucket + "-other"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=other[len("s3://"):])
    storage.write_bytes(f"{other}/videos/theirs.mp4", data)
    uris = ["videos/own.mp4", f"{s3_bucket}/archive/videos/own.mp4", "/etc/passwd", "file:///etc/hosts", "../../../escape.mp4",
            f"{other}/videos/theirs.mp4"]
    manifest = f"{s3_bucket}/archive/manifest.parquet"
    storage.write_table(pa.table({"video_uri": uris}), manifest)

    def videos_table(out):
        fs, path = storage.resolve(out)
        return {r["video_uri"]: r for r in pads.dataset(f"{path}/videos", filesystem=fs, format="parquet").to_table().to_pylist()}

    summary = run_cli("label", manifest, "--model", untrained_model, "--out", f"{s3_bucket}/labels")
    rows = videos_table(f"{s3_bucket}/labels")
    assert summary["videos"] == 5 and summary["ok"] == 1 and summary["failed"] == 4  # the own video is named twice: one row
    assert rows[f"{s3_bucket}/archive/videos/own.mp4"]["status"] == "ok"
    refused = {uri: row for uri, row in rows.items() if row["error_type"] == "refused"}
    assert len(refused) == 4 and all(row["status"] == "failed" and row["clips"] == 0 for row in refused.values())
    assert {"/etc/passwd", "/etc/hosts", f"{other}/videos/theirs.mp4"} <= set(refused)
    assert all("outside" in row["error"] or "climbs above" in row["error"] for row in refused.values())

    allowed = run_cli("label", manifest, "--model", untrained_model, "--out", f"{s3_bucket}/labels-allowed", "--allow-prefix", f"{other}/videos/")
    rows = videos_table(f"{s3_bucket}/labels-allowed")
    assert allowed["ok"] == 2 and rows[f"{other}/videos/theirs.mp4"]["status"] == "ok"
    assert rows["/etc/passwd"]["error_type"] == "refused"
