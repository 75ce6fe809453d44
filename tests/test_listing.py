"""rnnimg.manifest listings: every file FFmpeg reads as video is a row, the rest is counted, and a
remote manifest names only its own bucket (plus the allow-prefixes).

The .ogv is Ogg with VP8 inside: this FFmpeg build decodes Theora but has no Theora encoder
(``libtheora`` is absent from ``av.codecs_available``), and the listing judges by extension only.
The .wmv is WMV2 in ASF, as Windows Media wrote it.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pyarrow as pa
import pytest

from rnnimg import storage
from rnnimg.manifest import (Listing, ManifestError, VideoRow, labelled_videos, list_inputs, manifest_overview, read_manifest,
                             resolve_all, resolve_manifest_uri, video_extensions)
from tests.media import write_video


def _frames(n: int = 4) -> np.ndarray:
    return np.stack([np.full((32, 48, 3), 16 * i, np.uint8) for i in range(n)])


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Real .ogv, .wmv and .mp4 videos next to files that are not videos."""
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "sub").mkdir()
    write_video(str(folder / "theora-era.ogv"), _frames(), codec="libvpx", container_format="ogg")
    write_video(str(folder / "windows.wmv"), _frames(), codec="wmv2", container_format="asf")
    write_video(str(folder / "sub" / "phone.mp4"), _frames(), codec="mpeg4", container_format="mp4")
    for name, data in {"notes.txt": b"hello\n", "sub/more.txt": b"x\n", "meta.json": b"{}\n", "thumb.jpg": b"\xff\xd8\xff\xe0",
                       "README": b"read me\n"}.items():
        (folder / name).write_bytes(data)
    return folder


def test_the_test_videos_are_real(mixed_folder):
    import av

    for name, codec in (("theora-era.ogv", "vp8"), ("windows.wmv", "wmv2")):
        with av.open(str(mixed_folder / name)) as container:
            assert container.streams.video[0].codec_context.name == codec
            assert next(container.decode(video=0)).width == 48


def test_video_extensions_are_what_ffmpeg_demuxes_minus_what_is_not_video():
    extensions = video_extensions()
    assert extensions is video_extensions()  # computed once
    for ext in (".ogv", ".wmv", ".mp4", ".mkv", ".webm", ".avi", ".mov", ".ts", ".h264", ".mpg", ".ogg"):
        assert ext in extensions, ext
    for ext in (".txt", ".json", ".jpg", ".png", ".bmp", ".tiff", ".webp", ".srt", ".ass", ".vtt", ".sub", ".mp3", ".wav",
                ".flac", ".aac", ".m4a", ".wma", ".yuv", ".parquet", ".csv", ""):
        assert ext not in extensions, ext
    assert all(e == e.lower() and e.startswith(".") for e in extensions)


def test_a_folder_lists_every_video_and_counts_what_it_skipped(mixed_folder):
    listing = list_inputs([str(mixed_folder)])
    assert isinstance(listing, Listing)
    assert [os.path.relpath(r.video_uri, mixed_folder) for r in listing.rows] == ["sub/phone.mp4", "theora-era.ogv", "windows.wmv"]
    assert all(r.size > 0 and r.version and r.refused == "" for r in listing.rows)
    assert listing.skipped == {".txt": 2, ".json": 1, ".jpg": 1, "": 1}
    assert sorted(os.path.basename(u) for u in listing.skipped_examples) == ["README", "meta.json", "more.txt", "notes.txt", "thumb.jpg"]
    assert "'.txt' 2" in listing.skipped_summary()
    assert resolve_all([str(mixed_folder)]) == listing.rows  # the old entry point: rows only


def test_extensions_narrow_or_widen_the_listing(mixed_folder):
    narrow = list_inputs([str(mixed_folder)], extensions=[".mp4"])
    assert [os.path.basename(r.video_uri) for r in narrow.rows] == ["phone.mp4"]
    assert narrow.skipped == {".ogv": 1, ".wmv": 1, ".txt": 2, ".json": 1, ".jpg": 1, "": 1}
    wide = list_inputs([str(mixed_folder)], extensions=["OGV", "wmv", ".txt"])
    assert sorted(os.path.basename(r.video_uri) for r in wide.rows) == ["more.txt", "notes.txt", "theora-era.ogv", "windows.wmv"]
    with pytest.raises(ValueError, match="extensions must name at least one"):
        list_inputs([str(mixed_folder)], extensions=[])


def test_a_folder_without_videos_says_what_it_skipped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"1")
    with pytest.raises(ManifestError, match=r"no videos found .*skipped as not videos: '\.txt' 1"):
        list_inputs([str(tmp_path)])


def test_a_single_named_file_is_a_row_whatever_its_extension(tmp_path):
    (tmp_path / "clip.bin").write_bytes(b"1234")
    assert [r.video_uri for r in list_inputs([str(tmp_path / "clip.bin")]).rows] == [str(tmp_path / "clip.bin")]


def test_video_row_keeps_its_field_order_and_adds_refused_after_it():
    assert [f.name for f in dataclasses.fields(VideoRow)] == ["video_uri", "size", "version", "label", "split", "refused", "attempt"]
    assert VideoRow(**dataclasses.asdict(VideoRow("s3://b/x.mp4"))).refused == ""


# ----------------------------------------------------------------------------- confinement

MANIFEST = "s3://archive/manifests/train.parquet"
ESCAPING = ["/etc/passwd", "file:///etc/hosts", "../../other/x.mp4", "s3://other-bucket/x.mp4", "s3://archive/../other-bucket/y.mp4",
            "https://example.com/z.mp4"]
HONEST = {"videos/a.mp4": "s3://archive/manifests/videos/a.mp4", "../videos/b.mp4": "s3://archive/videos/b.mp4",
          "s3://archive/videos/c.mp4": "s3://archive/videos/c.mp4", "./d.mp4": "s3://archive/manifests/d.mp4"}


@pytest.mark.parametrize("uri", ESCAPING)
def test_a_remote_manifest_may_not_name_other_places(uri):
    _, reason = resolve_manifest_uri(uri, MANIFEST)
    assert reason and repr(uri) in reason and MANIFEST in reason and "\n" not in reason


@pytest.mark.parametrize("uri, location", HONEST.items())
def test_a_remote_manifest_names_its_own_bucket(uri, location):
    assert resolve_manifest_uri(uri, MANIFEST) == (location, "")


def test_allow_prefixes_admit_more_at_a_segment_boundary():
    assert resolve_manifest_uri("s3://other-bucket/x.mp4", MANIFEST, ["s3://other-bucket/"]) == ("s3://other-bucket/x.mp4", "")
    assert resolve_manifest_uri("s3://other-bucket/x.mp4", MANIFEST, ["s3://other"])[1]  # not a prefix of the bucket name
    assert resolve_manifest_uri("/mnt/archive/x.mp4", MANIFEST, ["/mnt/archive/"]) == ("/mnt/archive/x.mp4", "")
    assert resolve_manifest_uri("/mnt/archive/../../etc/passwd", MANIFEST, ["/mnt/archive/"])[1]
    assert resolve_manifest_uri("s3://other-bucket/videos/../../x.mp4", MANIFEST, ["s3://other-bucket/"])[1]
    with pytest.raises(ValueError, match="allow-prefix 'gs://x' has scheme gs://"):
        resolve_manifest_uri("x.mp4", MANIFEST, ["gs://x"])


@pytest.mark.s3
def test_a_remote_manifest_keeps_every_row_and_refuses_exactly_the_escaping_ones(s3_bucket):
    manifest = f"{s3_bucket}/manifests/m.parquet"
    honest = ["videos/a.mp4", f"{s3_bucket}/videos/b.mp4"]
    escaping = ["/etc/passwd", "file:///etc/hosts", "../../other/x.mp4", "s3://other-bucket/x.mp4"]
    storage.write_table(pa.table({"video_uri": honest + escaping}), manifest)
    rows = read_manifest(manifest)
    assert len(rows) == 6  # refused URIs are rows too, never dropped
    assert [bool(r.refused) for r in rows] == [False, False, True, True, True, True]
    assert rows[0].video_uri == f"{s3_bucket}/manifests/videos/a.mp4" and rows[1].video_uri == f"{s3_bucket}/videos/b.mp4"
    for row, uri in zip(rows[2:], escaping):
        assert repr(uri) in row.refused
    allowed = list_inputs([manifest], allow_prefixes=["s3://other-bucket/"]).rows
    assert [bool(r.refused) for r in allowed] == [False, False, True, True, True, False]
    assert allowed[5].video_uri == "s3://other-bucket/x.mp4"


@pytest.mark.s3
def test_training_never_opens_what_a_remote_manifest_may_not_name(s3_bucket, caplog):
    manifest = f"{s3_bucket}/m.parquet"
    uris = ["v/a.mp4", "/etc/passwd", f"{s3_bucket}/v/b.mp4", "s3://other-bucket/c.mp4", "v/d.mp4"]
    storage.write_table(pa.table({"video_uri": uris, "label": ["x", "y", "y", "x", "y"], "split": ["train"] * 5}), manifest)
    with caplog.at_level(logging.WARNING, logger="rnnimg.manifest"):
        videos = labelled_videos(manifest, "train", ("x", "y"))
    assert videos == [(f"{s3_bucket}/v/a.mp4", 0), (f"{s3_bucket}/v/b.mp4", 1), (f"{s3_bucket}/v/d.mp4", 1)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "rnnimg.manifest"]
    assert len(warnings) == 1 and "2 row(s)" in warnings[0] and "'/etc/passwd'" in warnings[0]
    shares = [labelled_videos(manifest, "train", ("x", "y"), rank=r, world=2, pad=True) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2]  # dropped before sharing out: every rank the same count
    assert manifest_overview(manifest) == (("x", "y"), {"train": 3})
    assert len(labelled_videos(manifest, "train", ("x", "y"), allow_prefixes=["s3://other-bucket/"])) == 4


def test_a_local_manifest_is_unconfined_with_or_without_allow_prefixes(tmp_path):
    manifest = str(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("video_uri\n/etc/passwd\n../x.mp4\nvideos/y.mp4\nhttps://example.com/z.mp4\n")
    expected = ["/etc/passwd", str(tmp_path.parent / "x.mp4"), str(tmp_path / "videos" / "y.mp4")]
    for allow in (None, ["s3://other-bucket/"]):  # an allow-prefix widens what remote manifests name; it never narrows a local one
        rows = read_manifest(manifest, allow_prefixes=allow)
        assert [r.video_uri for r in rows[:3]] == expected and [r.refused for r in rows[:3]] == ["", "", ""]
        assert "scheme https:// is not readable" in rows[3].refused


@pytest.mark.s3
def test_an_s3_prefix_is_listed_and_an_s3_object_is_one_row(s3_bucket):
    for key in ("v/a.ogv", "v/b.wmv", "v/notes.txt", "v/deep/c.mp4"):
        storage.write_bytes(f"{s3_bucket}/{key}", b"1")
    for prefix in (f"{s3_bucket}/v", f"{s3_bucket}/v/", s3_bucket):
        listing = list_inputs([prefix])
        assert [r.video_uri for r in listing.rows] == [f"{s3_bucket}/v/{k}" for k in ("a.ogv", "b.wmv", "deep/c.mp4")], prefix
        assert listing.skipped == {".txt": 1}
    assert [r.video_uri for r in list_inputs([f"{s3_bucket}/v/notes.txt"]).rows] == [f"{s3_bucket}/v/notes.txt"]
    with pytest.raises(FileNotFoundError):
        list_inputs([f"{s3_bucket}/missing"])
