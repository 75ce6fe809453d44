"""Still images as one-frame inputs: decoding, listing, the label job (a spatial model labels them,
a temporal one gives a ``failed`` row saying it needs video), and the command line around it."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rnnimg import rle, storage
from rnnimg.manifest import image_extensions, list_inputs, video_extensions
from rnnimg.video.clips import Clip
from rnnimg.video.decode import VideoReader, is_still_format, probe
from tests.media import write_video


def _picture(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    """A folder of a PNG, a WebP (lossless), a JPEG, a video, a broken PNG and a text file."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("stills")
    Image.fromarray(_picture(0)).save(folder / "a.png")
    Image.fromarray(_picture(1)).save(folder / "b.webp", lossless=True)
    Image.fromarray(_picture(2)).save(folder / "c.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.txt").write_text("not a picture\n")
    frames = np.stack([np.roll(_picture(3, 32, 32), k, axis=1) for k in range(24)])
    write_video(str(folder / "clip.mp4"), frames, fps=12)
    return folder


@pytest.mark.parametrize("name", ["a.png", "b.webp", "c.jpg"])
def test_a_still_opens_as_one_frame_shown_at_time_zero(stills, name):
    info = probe(str(stills / name))
    assert info.still and (info.width, info.height) == (48, 40) and info.fps == 0.0
    with VideoReader(str(stills / name)) as reader:
        [(_, frames)] = list(reader.clips([Clip(0, 0.0, 0.0, (0.0, 0.0))]))
    assert frames.shape == (2, 40, 48, 3)
    if name != "c.jpg":  # PNG and lossless WebP decode to the very pixels written
        np.testing.assert_array_equal(frames[0], _picture({"a.png": 0, "b.webp": 1}[name]))
    assert not probe(str(stills / "clip.mp4")).still


def test_which_demuxers_read_stills():
    assert all(is_still_format(n) for n in ("png_pipe", "jpeg_pipe", "webp_pipe", "image2", "tiff_pipe"))
    assert not any(is_still_format(n) for n in ("gif", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "image2pipe", "mjpeg"))


def test_a_listing_takes_stills_only_for_a_model_that_labels_them(stills):
    assert not image_extensions() & video_extensions()
    videos_only = list_inputs([str(stills)])
    assert [os.path.basename(r.video_uri) for r in videos_only.rows] == ["clip.mp4"]
    assert videos_only.skipped == {".png": 2, ".webp": 1, ".jpg": 1, ".txt": 1}  # counted, never silently dropped
    with_stills = list_inputs([str(stills)], stills=True)
    assert [os.path.basename(r.video_uri) for r in with_stills.rows] == ["a.png", "b.webp", "broken.png", "c.jpg", "clip.mp4"]
    assert with_stills.skipped == {".txt": 1}
    narrow = list_inputs([str(stills)], extensions=[".png"], stills=True)  # explicit extensions replace the rule
    assert [os.path.basename(r.video_uri) for r in narrow.rows] == ["a.png", "broken.png"]


@pytest.mark.ray
def test_a_spatial_model_labels_stills_and_a_temporal_one_refuses_them(ray_local, stills, tmp_path):
    from rnnimg.label import LabelConfig, label
    from tests.media import export_untrained_model

    spatial = export_untrained_model(str(tmp_path / "spatial"), task="segment", frame_size=32, frames_per_clip=1, temporal=False,
                                     channels=[8, 8], hidden=8)
    out = str(tmp_path / "spatial-labels")
    result = label(str(stills), spatial, out, LabelConfig(videos_per_shard=2, batch_size=4))
    videos = pd.read_parquet(os.path.join(out, "videos"))
    status = {os.path.basename(u): s for u, s in zip(videos["video_uri"], videos["status"])}
    assert status == {"a.png": "ok", "b.webp": "ok", "c.jpg": "ok", "clip.mp4": "ok", "broken.png": "failed"}
    assert result.videos == 5 and result.summary()["left_out"] == {".txt": 1}
    masks = pq.read_table(os.path.join(out, "masks")).to_pandas()
    masks["name"] = masks["video_uri"].map(os.path.basename)
    for name in ("a.png", "b.webp", "c.jpg"):
        rows = masks[masks["name"] == name]
        assert len(rows) == 1 and rows["frame_time_s"].tolist() == [0.0]  # one frame, at time 0
        row = rows.iloc[0]
        mask = rle.decode({"size": [int(row.height), int(row.width)], "counts": json.loads(row.rle)})
        assert mask.shape == (32, 32) and mask.mean() == pytest.approx(row.area_fraction, abs=1e-6)
    assert len(masks[masks["name"] == "clip.mp4"]) == 1  # a 2 s video: one clip of one frame, like any video

    temporal = export_untrained_model(str(tmp_path / "temporal"), task="segment", frame_size=32, frames_per_clip=4,
                                      channels=[8, 8], hidden=8)
    manifest = str(tmp_path / "inputs.parquet")
    storage.write_table(pa.table({"video_uri": [str(stills / "a.png"), str(stills / "clip.mp4")]}), manifest)
    out = str(tmp_path / "temporal-labels")
    label(manifest, temporal, out, LabelConfig(videos_per_shard=2, batch_size=4))
    videos = pd.read_parquet(os.path.join(out, "videos"))
    by_name = {os.path.basename(u): r for u, r in zip(videos["video_uri"], videos.to_dict("records"))}
    assert by_name["clip.mp4"]["status"] == "ok"
    assert by_name["a.png"]["status"] == "failed" and by_name["a.png"]["error_type"] == "needs_video"
    assert "still image" in by_name["a.png"]["error"] and "needs video" in by_name["a.png"]["error"]
    masks = pq.read_table(os.path.join(out, "masks")).to_pandas()
    assert set(masks["video_uri"].map(os.path.basename)) == {"clip.mp4"}
    # A folder listing for a temporal model leaves the stills out, counted.
    out = str(tmp_path / "temporal-folder")
    result = label(str(stills), temporal, out, LabelConfig(videos_per_shard=2, batch_size=4))
    assert result.videos == 1 and result.summary()["left_out"] == {".png": 2, ".webp": 1, ".jpg": 1, ".txt": 1}


def test_synth_images_only_for_a_task_that_has_them(tmp_path, capsys):
    from rnnimg.cli import main

    assert main(["synth", str(tmp_path / "x"), "--task", "classify", "--images"]) == 2
    assert "task 'classify' has no still-image archive (--images is for: segment)" in capsys.readouterr().err


def test_train_passes_only_the_model_options_given(tmp_path, monkeypatch, capsys):
    """The classifier's flags do not leak into another task's config; --model-option reaches any field."""
    import rnnimg.train
    from rnnimg.cli import main
    from rnnimg.tasks.segment import SegmentTask

    seen = {}

    def fake_train(manifest, out, name, train_config, model_config, **kwargs):
        seen["config"] = model_config
        raise ValueError("stop here")  # the wiring is under test, not training

    monkeypatch.setattr(rnnimg.train, "train", fake_train)
    monkeypatch.setattr(SegmentTask, "_split_counts", staticmethod(lambda uri: {"train": 1, "val": 1}))
    argv = ["train", "m.parquet", "--task", "segment", "--out", str(tmp_path), "--frames-per-clip", "1",
            "--model-option", "temporal=false", "--model-option", "channels=[8, 16]", "--model-option", "rnn_type=gru"]
    assert main(argv) == 2 and "stop here" in capsys.readouterr().err
    config = seen["config"]
    assert (config.frames_per_clip, config.temporal, config.channels, config.rnn_type, config.frame_size) == (1, False, (8, 16), "gru", 64)
    assert main(["train", "m.parquet", "--task", "segment", "--out", str(tmp_path), "--model-option", "colour=blue"]) == 2
    assert "unknown segmenter config keys ['colour']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["train", "m.parquet", "--out", str(tmp_path), "--model-option", "nokey"])
    assert exit_.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err
