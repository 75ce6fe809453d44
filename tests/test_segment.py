"""Task ``segment``: synthetic archive, truth per clip, model shapes, RLE, masks table, labelling and training."""

import io
import json
import os

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rnnimg import rle, storage, tables, tasks
from rnnimg.models.segmenter import Segmenter, SegmenterConfig
from rnnimg.tasks.segment import MaskTarget, clip_masks_json, load_masks, masks_at
from rnnimg.tasks.segment_synth import SegmentSynthConfig, make_archive, render_video
from rnnimg.video.clips import Clip, ClipSpec, frame_times, uniform_clips
from rnnimg.video.decode import VideoReader


@pytest.fixture(scope="module")
def segment_archive(tmp_path_factory):
    """6 videos with masks (4 train, 1 val, 1 test) and 1 without, 4 s at 12 fps, 64 x 64."""
    root = str(tmp_path_factory.mktemp("segment"))
    return root, make_archive(root, SegmentSynthConfig(videos=6, unlabelled=1, seed=3), processes=1)


def task():
    return tasks.get("segment")


# ----------------------------------------------------------------------------- synthetic data


def test_render_is_deterministic_and_only_some_objects_move():
    frames, masks = render_video(np.random.default_rng(5))
    again, again_masks = render_video(np.random.default_rng(5))
    assert frames.shape == (48, 64, 64, 3) and masks.shape == (48, 64, 64) and masks.dtype == np.uint8
    np.testing.assert_array_equal(frames, again)
    np.testing.assert_array_equal(masks, again_masks)
    assert set(np.unique(masks)) <= {0, 1} and masks.any(axis=(1, 2)).all()
    assert (masks[0] != masks[-1]).any()  # the masked objects move
    # Every pixel of every object has the one object colour (up to noise); the mask is a strict subset.
    colour = frames[0][masks[0].astype(bool)].astype(float).mean(0)
    objects = (np.abs(frames[0].astype(float) - colour) < 20).all(-1)
    assert objects.sum() > masks[0].sum() * 1.2  # some objects of that look stay out of the mask


def test_archive_layout_and_masks_match_the_decoded_video(segment_archive):
    root, manifest = segment_archive
    table = pq.read_table(manifest).to_pandas()
    assert list(table.columns) == ["video_uri", "mask_uri", "split"]
    assert table["split"].value_counts().to_dict() == {"train": 4, "val": 1, "test": 1, "unlabelled": 1}
    assert table.loc[table["split"] == "unlabelled", "mask_uri"].isna().all()
    row = table[table["split"] == "train"].iloc[0]
    assert row["mask_uri"] == os.path.join(root, "masks", "train", "train-00000.npz")
    with np.load(row["mask_uri"]) as data:
        assert data["masks"].shape == (48, 64, 64) and data["masks"].dtype == np.uint8
        np.testing.assert_allclose(data["times"], np.arange(48) / 12)
        assert float(data["fps"]) == 12
    target = MaskTarget(row["mask_uri"], 64)
    with VideoReader(row["video_uri"]) as reader:
        assert reader.duration_s == pytest.approx(4.0, abs=0.1)
        for clip, frames in reader.clips(uniform_clips(reader.duration_s, ClipSpec(2.0, 6, 2.0))):
            masks = task().clip_target(target, clip)
            for frame, mask in zip(frames, masks.astype(bool)):
                inside = frame[mask].astype(float)
                # Under the mask: one flat colour (H.264 keeps it within a few levels), far from the mean of the rest.
                assert inside.std(0).max() < 25
                assert np.abs(inside.mean(0) - frame[~mask].astype(float).mean(0)).max() > 60
    # Deterministic from the seed.
    again = make_archive(os.path.join(root, "again"), SegmentSynthConfig(videos=6, unlabelled=1, seed=3), processes=1)
    other = pq.read_table(again).to_pandas()
    first, second = load_masks(table["mask_uri"][0])[0], load_masks(other["mask_uri"][0])[0]
    np.testing.assert_array_equal(first, second)


def test_training_rows_are_shared_out_by_rank_and_padded(segment_archive):
    _, manifest = segment_archive
    config = task().model_config(manifest, frame_size=32)
    rows = task().training_rows(manifest, "train", config)
    assert len(rows) == 4 and all(isinstance(t, MaskTarget) and t.frame_size == 32 for _, t in rows)
    assert [r for k in range(3) for r in task().training_rows(manifest, "train", config, rank=k, world=3)] != []
    assert sorted(r[0] for k in range(3) for r in task().training_rows(manifest, "train", config, rank=k, world=3)) == sorted(r[0] for r in rows)
    assert {len(task().training_rows(manifest, "train", config, rank=k, world=3, pad=True)) for k in range(3)} == {2}
    assert task().training_rows(manifest, "unlabelled", config) == []


def test_model_config_refuses_unknown_keys_and_manifests_without_masks(segment_archive, tmp_path):
    _, manifest = segment_archive
    with pytest.raises(ValueError, match="unknown segmenter config keys"):
        task().model_config(manifest, colour="blue")
    with pytest.raises(ValueError, match="rnn_type must be one of"):
        SegmenterConfig(rnn_type="rnn")
    classify_manifest = make_archive_without_masks(tmp_path)
    with pytest.raises(ValueError, match="mask_uri"):
        task().model_config(classify_manifest)


def make_archive_without_masks(tmp_path):
    import pyarrow as pa

    uri = str(tmp_path / "manifest.parquet")
    storage.write_table(pa.table({"video_uri": ["a.mp4"], "label": ["left"], "split": ["train"]}), uri)
    return uri


# ----------------------------------------------------------------------------- targets


def test_clip_target_picks_the_frame_shown_at_each_time_and_resizes_nearest(tmp_path):
    masks = np.zeros((48, 8, 8), np.uint8)
    for i in range(48):
        masks[i].flat[i % 64] = 1  # frame i marks pixel i
    uri = str(tmp_path / "m.npz")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, masks=masks, times=np.arange(48) / 12.0, fps=12.0)
    storage.write_bytes(uri, buffer.getvalue())
    clip = Clip(0, 1.0, 3.0, frame_times(1.0, 2.0, 4))  # 1.25, 1.75, 2.25, 2.75 s -> frames 15, 21, 27, 33
    target = task().clip_target(MaskTarget(uri, 8), clip)
    assert target.dtype == np.uint8 and target.shape == (4, 8, 8)
    assert [int(np.flatnonzero(m.ravel())[0]) for m in target] == [15, 21, 27, 33]
    exact = task().clip_target(MaskTarget(uri, 8), Clip(0, 0.0, 1.0, (0.0, 1 / 12, 0.999)))  # at a frame's time: that frame
    assert [int(np.flatnonzero(m.ravel())[0]) for m in exact] == [0, 1, 11]
    big = masks_at(masks, np.arange(48) / 12.0, [0.0], 16)
    np.testing.assert_array_equal(big[0], np.kron(masks[0], np.ones((2, 2), np.uint8)))
    blank = task().blank_target(SegmenterConfig(frame_size=32, frames_per_clip=5))
    assert blank.shape == (5, 32, 32) and blank.dtype == np.uint8 and not blank.any()


def test_augment_flips_frames_and_masks_alike():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    masks = (frames[..., 0] > 128).astype(np.uint8)
    for _ in range(8):
        out_frames, out_masks = task().augment(frames, masks, rng)
        np.testing.assert_array_equal(out_masks, (out_frames[..., 0] > 128).astype(np.uint8))


# ----------------------------------------------------------------------------- model, loss, metrics


@pytest.mark.parametrize("temporal,rnn_type,channels", [(True, "lstm", (8, 16)), (True, "gru", (8, 16, 16)), (False, "lstm", (8, 16))])
def test_model_shapes(temporal, rnn_type, channels):
    config = SegmenterConfig(frame_size=32, frames_per_clip=4, channels=channels, rnn_type=rnn_type, hidden=8, temporal=temporal)
    model = tasks.get("segment").build_model(config)
    x = torch.randn(2, 4, 3, 32, 32)
    features, skips = model.forward_features(x)
    low = 32 // 2 ** len(channels)
    assert features.shape == (2, 4, 8, low, low)
    assert [tuple(s.shape) for s in skips] == [(8, 3, 32, 32), *[(8, c, 32 // 2 ** (k + 1), 32 // 2 ** (k + 1)) for k, c in enumerate(channels[:-1])]]
    logits = model(x)
    assert logits.shape == (2, 4, 1, 32, 32)
    targets = torch.zeros(2, 4, 32, 32, dtype=torch.uint8)
    loss = task().loss(logits, targets, config)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_per_frame_ablation_lets_no_information_cross_frames():
    config = SegmenterConfig(frame_size=32, frames_per_clip=4, channels=(8, 8), hidden=8)
    x = torch.randn(1, 4, 3, 32, 32)
    changed = x.clone()
    changed[:, 0] += 1.0  # change the first frame only
    for temporal, later_frames_change in ((False, False), (True, True)):
        model = Segmenter(SegmenterConfig(**{**config.__dict__, "temporal": temporal})).eval()
        with torch.no_grad():
            differs = (model(x)[:, 1:] - model(changed)[:, 1:]).abs().max() > 1e-6
        assert bool(differs) is later_frames_change


def test_batch_stats_sum_to_iou():
    config = SegmenterConfig(frame_size=16, frames_per_clip=2)
    truth = torch.zeros(1, 2, 16, 16, dtype=torch.uint8)
    truth[0, :, :4, :4] = 1  # 16 pixels per frame
    logits = torch.full((1, 2, 1, 16, 16), -5.0)
    logits[0, 0, 0, :4, :8] = 5.0  # frame 0: 16 right + 16 extra -> IoU 0.5
    logits[0, 1, 0, :4, :4] = 5.0  # frame 1: exact -> IoU 1
    stats = task().batch_stats(logits, truth, config)
    summary = task().summarize(stats)
    assert summary["iou"] == pytest.approx(32 / 48) and summary["iou_per_step"] == [0.5, 1.0] and summary["clips"] == 1
    assert task().summarize({k: v * 0 for k, v in stats.items()})["iou"] == 1.0  # nothing anywhere: perfect, not NaN


# ----------------------------------------------------------------------------- RLE and the masks table


def test_rle_matches_coco_on_examples():
    assert rle.encode(np.array([[0, 1], [1, 1]])) == {"size": [2, 2], "counts": [1, 3]}  # column-major: 0, 1, 1, 1
    assert rle.encode(np.array([[1, 0, 0]])) == {"size": [1, 3], "counts": [0, 1, 2]}  # starts with zero zeros
    assert rle.encode(np.zeros((2, 3))) == {"size": [2, 3], "counts": [6]}
    with pytest.raises(ValueError, match="sum to 2x2=4"):
        rle.decode({"size": [2, 2], "counts": [1, 2]})


@settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(0, 12), st.integers(0, 12))))
def test_rle_round_trips_exactly(mask):
    encoded = rle.encode(mask)
    assert sum(encoded["counts"]) == mask.size
    assert all(c > 0 for c in encoded["counts"][1:])  # runs alternate: no empty run after the first
    decoded = rle.decode(json.loads(json.dumps(encoded)))
    assert decoded.dtype == np.bool_ and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)
    assert rle.area_fraction(encoded) == pytest.approx(mask.mean() if mask.size else 0.0)


def test_shard_rows_expand_each_clip_into_one_row_per_sampled_frame():
    masks = np.zeros((3, 4, 4), bool)
    masks[1, 0, 0] = masks[2] = True
    clip = {"video_uri": "v.mp4", "clip_index": 1, "start_s": 2.0, "end_s": 4.0, "masks": clip_masks_json(masks), "model_id": "m", "run_id": "r"}
    status_like = {**clip, "clip_index": 2, "masks": ""}
    rows = task().shard_rows([clip, status_like], {"model_id": "m", "run_id": "r"}, 0.0)["masks"]
    assert [r["frame_time_s"] for r in rows] == pytest.approx(list(frame_times(2.0, 2.0, 3)))
    assert [r["area_fraction"] for r in rows] == pytest.approx([0.0, 1 / 16, 1.0])
    for row, mask in zip(rows, masks):
        assert (row["video_uri"], row["clip_index"], row["height"], row["width"]) == ("v.mp4", 1, 4, 4)
        np.testing.assert_array_equal(rle.decode({"size": [row["height"], row["width"]], "counts": json.loads(row["rle"])}), mask)
    table = tables.table_from_rows(rows, tables.MASKS)
    assert table.schema == tables.MASKS and table.num_rows == 3


def test_predict_gives_one_json_per_clip():
    config = SegmenterConfig(frame_size=16, frames_per_clip=3, channels=(4, 4), hidden=4)
    model = task().build_model(config).eval()
    with torch.inference_mode():
        out = task().predict(model, torch.zeros(2, 3, 3, 16, 16), config)
    assert list(out) == list(task().clip_columns()) and out["masks"].shape == (2,)
    data = json.loads(out["masks"][0])
    assert (data["height"], data["width"], len(data["frames"])) == (16, 16, 3)


@pytest.mark.ray
def test_labelling_writes_one_mask_row_per_sampled_frame(ray_local, segment_archive, tmp_path):
    from rnnimg.label import LabelConfig, label
    from tests.media import export_untrained_model

    root, _ = segment_archive
    model = export_untrained_model(str(tmp_path / "model"), task="segment", frame_size=32, frames_per_clip=4, channels=[8, 8], hidden=8)
    out = str(tmp_path / "labels")
    videos = [os.path.join(root, "videos", "test"), os.path.join(root, "videos", "unlabelled")]
    result = label(videos, model, out, LabelConfig(videos_per_shard=1, batch_size=2))
    assert (result.videos, result.ok) == (2, 2)
    masks = pq.read_table(os.path.join(out, "masks")).to_pandas()
    assert len(masks) == 2 * 2 * 4  # 2 videos x 2 clips of 2 s x 4 frames
    assert set(masks["height"]) == set(masks["width"]) == {32}
    expected = sorted(t for k in range(2) for t in frame_times(2.0 * k, 2.0, 4))
    for _, frames in masks.groupby("video_uri"):
        assert sorted(frames["frame_time_s"]) == pytest.approx(expected)
    first = masks.iloc[0]
    mask = rle.decode({"size": [first.height, first.width], "counts": json.loads(first.rle)})
    assert mask.mean() == pytest.approx(first.area_fraction, abs=1e-6)
    assert duckdb.execute(f"select count(*) from '{out}/masks/*.parquet'").fetchall()[0][0] == len(masks)
    assert len(pd.read_parquet(os.path.join(out, "videos"))) == 2


@pytest.mark.slow
@pytest.mark.ray
def test_training_through_ray_exports_the_model_and_its_report(ray_local, segment_archive, tmp_path):
    from rnnimg.train import TrainConfig, train

    _, manifest = segment_archive
    config = task().model_config(manifest, frame_size=32, frames_per_clip=4, channels=[8, 8], hidden=8)
    result = train(manifest, str(tmp_path), "seg", TrainConfig(epochs=1, workers=1, batch_size=4, use_gpu=False), model_config=config,
                   task="segment")
    assert result.task == "segment" and 0.0 <= result.metrics["val_iou"] <= 1.0
    assert result.evaluation["iou"] == result.metrics["val_iou"] and len(result.evaluation["iou_per_step"]) == 4
    assert os.path.exists(os.path.join(result.model_uri, "overlay.png"))
    assert "IoU of the moving mask" in result.report_markdown
    loaded_task, model, loaded_config, _ = tasks.load_model(result.model_uri)
    assert loaded_task.name == "segment" and loaded_config == config


def test_the_frame_order_ablation_moves_each_mask_with_its_frame():
    from rnnimg import tasks

    frames = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((4, 2, 2, 3), np.uint8)  # frame i is all i
    masks = np.arange(4, dtype=np.uint8)[:, None, None] * np.ones((4, 2, 2), np.uint8)
    order = np.array([2, 0, 3, 1])
    shuffled, target = tasks.get("segment").permute_frames(frames, masks, order)
    assert shuffled[:, 0, 0, 0].tolist() == target[:, 0, 0].tolist() == [2, 0, 3, 1]
    kept, label = tasks.get("classify").permute_frames(frames, 1, order)
    assert kept[:, 0, 0, 0].tolist() == [2, 0, 3, 1] and label == 1
