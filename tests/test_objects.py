"""Task ``objects``: synthetic truth, lossless storage, targets, model shapes and ablation, metrics,
the objects and tracks tables, training through Ray and labelling."""

import io
import json
import os

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from rnnimg import storage, tables, tasks
from rnnimg.models.objects import CellObjectCRNN, ObjectCRNN, ObjectOutputs, ObjectsConfig
from rnnimg.tasks.objects import (CATEGORIES, ObjectsTarget, box_iou, clip_objects_json, detection_counts, flip_clip, load_truth,
                                  summarize_counts, truth_at)
from rnnimg.tasks.objects_synth import LABELS, OCCLUDER, ObjectsSynthConfig, make_archive, render_video
from rnnimg.video.clips import Clip, frame_times

TINY = dict(frame_size=32, frames_per_clip=4, cnn_channels=[4, 8], grid=2, feature_dim=16, rnn_hidden=8)
TRACKER = dict(TINY, head="tracker")  # the pooled-features + tracker head, whatever the default


@pytest.fixture(scope="module")
def objects_archive(tmp_path_factory):
    """6 videos with truth (4 train, 1 val, 1 test) and 1 without, 4 s at 12 fps, 64 x 64."""
    root = str(tmp_path_factory.mktemp("objects"))
    return root, make_archive(root, ObjectsSynthConfig(videos=6, unlabelled=1, seed=5), processes=1)


def task():
    return tasks.get("objects")


# ----------------------------------------------------------------------------- synthetic truth


def test_truth_boxes_lie_inside_the_frame_and_visible_fraction_is_what_is_on_top():
    hidden_seen = 0
    for seed in range(6):
        scene = render_video(np.random.default_rng(seed))
        assert scene.frames.shape == (48, 64, 64, 3) and scene.inside.shape == scene.visible.shape == (48, 3)
        present = scene.inside > 0
        assert present.any(axis=0).sum() >= 1  # at least one class in the video
        box = scene.boxes[present]
        assert ((box >= 0) & (box <= 1)).all() and (box[:, 0] < box[:, 2]).all() and (box[:, 1] < box[:, 3]).all()
        assert not scene.boxes[~present].any() and not scene.visible[~present].any()
        for t, k in zip(*np.nonzero(present)):
            on_top = scene.layers[t] == k + 1
            assert scene.visible[t, k] == pytest.approx(on_top.sum() / scene.area[t, k], abs=1e-6)
            # The box is the box of the object's in-frame pixels: everything on top of it lies within.
            x0, y0, x1, y1 = np.round(scene.boxes[t, k] * 64).astype(int)
            assert on_top.sum() == on_top[y0:y1, x0:x1].sum()
            if scene.visible[t, k] == 0:
                hidden_seen += 1
                # Hidden: not one of its pixels is on top; a bar (or another object) covers its box.
                assert not on_top.any() and (np.isin(scene.layers[t, y0:y1, x0:x1], [OCCLUDER, *(j + 1 for j in range(3) if j != k)])).all()
        # Every object is first seen while at least half of it shows.
        for k in np.flatnonzero(present.any(axis=0)):
            first = np.flatnonzero(scene.inside[:, k] >= 0.5)[0]
            assert scene.visible[first, k] >= 0.5
    assert hidden_seen > 10  # the videos do hide objects, for many frames


def test_render_is_deterministic_and_some_objects_enter_or_leave():
    a, b = render_video(np.random.default_rng(9)), render_video(np.random.default_rng(9))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    partial = sum(((s.inside > 0) & (s.inside < 1)).sum() for s in (render_video(np.random.default_rng(i)) for i in range(6)))
    assert partial > 0  # objects partly outside the frame: entering or leaving


def test_archive_stores_the_truth_losslessly_next_to_the_videos(objects_archive):
    from rnnimg.video.decode import VideoReader

    root, manifest = objects_archive
    table = pq.read_table(manifest).to_pandas()
    assert list(table.columns) == ["video_uri", "objects_uri", "split"]
    assert table["split"].value_counts().to_dict() == {"train": 4, "val": 1, "test": 1, "unlabelled": 1}
    assert table.loc[table["split"] == "unlabelled", "objects_uri"].isna().all()
    assert table["objects_uri"][0] == os.path.join(root, "objects", "train", "train-00000.npz")
    # The same per-video seeds as make_archive: the stored truth equals the rendered one, bit for bit.
    seeds = np.random.default_rng(5).integers(2**63, size=7)
    for index, row in table.iterrows():
        if not isinstance(row["objects_uri"], str):  # the unlabelled video
            continue
        scene = render_video(np.random.default_rng(int(seeds[index])))
        truth = load_truth(row["objects_uri"])
        assert [str(n) for n in truth["labels"]] == list(LABELS)
        np.testing.assert_array_equal(truth["times"], np.arange(48) / 12)
        for name in ("inside", "boxes", "visible"):
            assert truth[name].dtype == np.float32
            np.testing.assert_array_equal(truth[name], getattr(scene, name))
    with VideoReader(table["video_uri"][0]) as reader:
        assert reader.duration_s == pytest.approx(4.0, abs=0.1)


def test_training_rows_model_config_and_refusals(objects_archive, tmp_path):
    import pyarrow as pa

    _, manifest = objects_archive
    config = task().model_config(manifest, **TINY)
    assert config.labels == LABELS and config.frame_size == 32
    rows = task().training_rows(manifest, "train", config)
    assert len(rows) == 4 and all(isinstance(t, ObjectsTarget) and t.labels == LABELS for _, t in rows)
    assert {len(task().training_rows(manifest, "train", config, rank=k, world=3, pad=True)) for k in range(3)} == {2}
    with pytest.raises(ValueError, match="unknown objects config keys"):
        task().model_config(manifest, colour="blue")
    with pytest.raises(ValueError, match="score_threshold must be in"):
        ObjectsConfig(score_threshold=1.5)
    other = str(tmp_path / "manifest.parquet")
    storage.write_table(pa.table({"video_uri": ["a.mp4"], "objects_uri": ["a.npz"], "split": ["train"]}), other)
    with pytest.raises(ValueError, match="'train' and 'val'"):
        task().model_config(other)


# ----------------------------------------------------------------------------- targets


def _truth_file(tmp_path) -> str:
    inside = np.zeros((24, 2), np.float32)
    inside[:, 0] = np.linspace(0, 1, 24)  # class a slides into the frame
    boxes = np.zeros((24, 2, 4), np.float32)
    boxes[:, 0] = np.arange(24)[:, None] / 100 + np.array([0.1, 0.2, 0.3, 0.4])  # frame i: x0 = 0.1 + i/100
    visible = np.where(inside > 0, 1.0, 0.0).astype(np.float32)
    visible[10:14, 0] = 0.0  # hidden for 4 frames
    uri = str(tmp_path / "t.npz")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=np.array(["a", "b"]), times=np.arange(24) / 12.0, fps=12.0, inside=inside, boxes=boxes, visible=visible)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def test_clip_target_picks_the_frame_shown_and_marks_present_ignored_and_hidden(tmp_path):
    uri = _truth_file(tmp_path)
    clip = Clip(0, 0.0, 2.0, frame_times(0.0, 2.0, 4))  # 0.25, 0.75, 1.25, 1.75 s -> frames 3, 9, 15, 21
    target = task().clip_target(ObjectsTarget(uri, ("b", "a", "c"), 0.3), clip)
    assert target.shape == (4, 3, 7) and target.dtype == np.float32
    a = target[:, 1]
    np.testing.assert_allclose(a[:, 2], 0.1 + np.array([3, 9, 15, 21]) / 100, rtol=1e-6)  # x0 of the frame shown
    inside = np.linspace(0, 1, 24)[[3, 9, 15, 21]]
    assert a[:, 0].tolist() == (inside >= 0.3).astype(float).tolist()  # present from 30% inside
    assert a[:, 1].tolist() == ((inside > 0) & (inside < 0.3)).astype(float).tolist()  # ignored below that
    hidden = truth_at(load_truth(uri), [10 / 12, 13.5 / 12], ("a",), 0.3)
    assert hidden[:, 0, 6].tolist() == [0.0, 0.0] and hidden[:, 0, 0].tolist() == [1.0, 1.0]  # hidden, and still present
    assert not target[:, 0].any() and not target[:, 2].any()  # b never in the scene; c unknown to the file
    blank = task().blank_target(ObjectsConfig(frames_per_clip=5))
    assert blank.shape == (5, 3, 7) and not blank.any()


def test_flips_move_boxes_with_the_frames():
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    frames[:, 2:6, 3:11] = 255  # rows 2..5, columns 3..10
    target = np.zeros((2, 1, 7), np.float32)
    target[:, 0, 0] = 1
    target[:, 0, 2:6] = np.array([3, 2, 11, 6]) / 16
    for horizontal, vertical in ((True, False), (False, True), (True, True)):
        out, moved = flip_clip(frames, target, horizontal, vertical)
        rows, cols = np.nonzero(out[0, :, :, 0])
        np.testing.assert_allclose(moved[0, 0, 2:6], np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / 16)
    absent = np.zeros((1, 1, 7), np.float32)
    assert not flip_clip(frames[:1], absent, True, True)[1].any()  # an absent slot keeps its zero box


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("temporal,rnn_type,rnn_impl", [(True, "lstm", "reference"), (True, "gru", "torch"), (False, "lstm", "reference")])
def test_model_shapes_and_gradients(temporal, rnn_type, rnn_impl):
    config = ObjectsConfig(**TRACKER, temporal=temporal, rnn_type=rnn_type, rnn_impl=rnn_impl)
    model = task().build_model(config)
    x = torch.randn(2, 4, 3, 32, 32)
    features, per_frame = model.forward_features(x)
    assert features.shape == (2, 4, 8) and per_frame.measured.shape == (2, 4, 3, 5) and per_frame.heat.shape == (2, 4, 3, 8, 8)
    assert ((per_frame.measured[..., :4] >= 0) & (per_frame.measured[..., :4] <= 1)).all()  # centres and sizes on the frame's scale
    outputs = model(x)
    assert isinstance(outputs, ObjectOutputs) and outputs.detections.shape == (2, 4, 3, 5)
    box = outputs.detections[..., 1:]
    assert (box >= 0).all() and (box <= 1).all() and (box[..., 0] <= box[..., 2]).all() and (box[..., 1] <= box[..., 3]).all()
    targets = torch.zeros(2, 4, 3, 7)
    targets[:, :, 0, 0] = 1
    targets[:, :, 0, 2:6] = torch.tensor([0.1, 0.1, 0.4, 0.5])
    loss = task().loss(outputs, targets, config)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_per_frame_ablation_lets_no_information_cross_frames():
    x = torch.randn(1, 4, 3, 32, 32)
    changed = x.clone()
    changed[:, 0] += 1.0  # change the first frame only
    for temporal, later_frames_change in ((False, False), (True, True)):
        torch.manual_seed(0)
        model = ObjectCRNN(ObjectsConfig(**TRACKER, temporal=temporal)).eval()
        with torch.no_grad():
            differs = (model(x).detections[:, 1:] - model(changed).detections[:, 1:]).abs().max() > 1e-6
        assert bool(differs) is later_frames_change


def test_the_tracker_takes_the_measurement_where_its_gains_are_one_and_coasts_on_the_velocity_where_zero():
    model = ObjectCRNN(ObjectsConfig(**TRACKER, labels=("a",))).eval()
    measured = torch.zeros(1, 6, 1, 5)
    measured[0, :, 0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.9, 0.9])  # x moves 0.1 per frame, then a wrong measurement
    measured[0, :, 0, 1] = 0.5
    measured[0, :, 0, 2:4] = 0.2
    gains = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # the object shows in frames 0-2, then hides
    raw = torch.zeros(1, 6, 4)
    raw[0, :, 1:] = torch.logit(gains.clamp(1e-6, 1 - 1e-6))[:, None]
    model.head = torch.nn.Identity()  # the recurrent features are the head's output: the gains set by hand
    box = model.forward_head(raw, measured)[0, :, 0, 1:]
    centre_x = (box[:, 0] + box[:, 2]) / 2
    assert centre_x.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], abs=1e-4)  # coasting, not the wrong measurement
    assert (box[:, 2] - box[:, 0]).tolist() == pytest.approx([0.2] * 6, abs=1e-4)
    ablation = ObjectCRNN(ObjectsConfig(**TRACKER, labels=("a",), temporal=False)).eval()
    ablation.head = torch.nn.Identity()
    flat = ablation.forward_head(raw, measured)[0, :, 0, 1:]
    assert ((flat[:, 0] + flat[:, 2]) / 2).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.9, 0.9, 0.9], abs=1e-4)  # per frame: what shows


# ----------------------------------------------------------------------------- metrics


def test_box_iou_on_known_boxes():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], [0.5, 0.5, 0.7, 0.7], [0.0, 0.0, 0.0, 0.0]])
    assert box_iou(a, b).tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.0])


def _slot(present, box=(0.2, 0.2, 0.6, 0.6), visible=1.0, ignore=0.0):
    return [float(present), ignore, *box, visible]


def _out(score_logit, box=(0.2, 0.2, 0.6, 0.6)):
    return [score_logit, *box]


def test_detection_counts_and_f1_at_iou_half_on_hand_made_frames():
    right, shifted_ok, shifted_bad = (0.2, 0.2, 0.6, 0.6), (0.25, 0.2, 0.65, 0.6), (0.4, 0.2, 0.8, 0.6)
    assert float(box_iou(torch.tensor(right), torch.tensor(shifted_ok))) >= 0.5 > float(box_iou(torch.tensor(right), torch.tensor(shifted_bad)))
    targets = torch.tensor([[
        _slot(1), _slot(1), _slot(1),  # visible: found, found with a small shift, found at the wrong place
        _slot(1, visible=0.4), _slot(1, visible=0.0), _slot(1, visible=0.0),  # occluded found; hidden found; hidden missed
        _slot(0), _slot(0), _slot(0, ignore=1.0),  # absent and claimed; absent and quiet; ignored and claimed
    ]])
    outputs = torch.tensor([[
        _out(3.0), _out(3.0, shifted_ok), _out(3.0, shifted_bad),
        _out(3.0), _out(2.0), _out(-2.0),
        _out(1.0), _out(-4.0), _out(5.0),
    ]])
    counts = detection_counts(outputs, targets)
    by = {c: (int(counts["tp"][i]), int(counts["fp"][i]), int(counts["fn"][i])) for i, c in enumerate(CATEGORIES)}
    assert by == {"all": (4, 2, 2), "visible": (2, 1, 1), "occluded": (1, 0, 0), "hidden": (1, 0, 1)}
    assert counts["objects"].tolist() == [6, 3, 1, 2]
    m = summarize_counts(counts["tp"], counts["fp"], counts["fn"], counts["objects"])
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 2 + 2)) and m["f1_visible"] == pytest.approx(4 / 6)
    assert (m["precision_hidden"], m["recall_hidden"], m["f1_hidden"]) == pytest.approx((1.0, 0.5, 2 / 3))
    # Every box a little too far off: F1 at IoU >= 0.5 falls to 0 although every class is claimed where it is.
    wrong = outputs.clone()
    wrong[..., 1:] = torch.tensor(shifted_bad)
    bad = summarize_counts(*(detection_counts(wrong, targets)[k] for k in ("tp", "fp", "fn")))
    assert bad["f1"] == 0.0 and bad["f1_visible"] == 0.0
    # Nothing to find and nothing claimed: not a number, not a perfect score.
    nothing = summarize_counts(*(detection_counts(torch.full((1, 1, 5), -5.0), torch.zeros(1, 1, 7))[k] for k in ("tp", "fp", "fn")))
    assert np.isnan(nothing["f1_hidden"]) and np.isnan(nothing["f1"])


def test_miss_counts_say_why_a_present_object_is_missed():
    from rnnimg.tasks.objects import MISS_KINDS, miss_counts

    truth = (0.2, 0.2, 0.6, 0.6)
    targets = torch.tensor([[_slot(1, truth, visible=v) for v in (1.0, 0.0, 0.0, 0.0, 0.0, 0.5)] + [_slot(0)]])  # (1, 7, 7)
    outputs = torch.tensor([[_out(3.0),  # visible, found
                           _out(3.0, (0.25, 0.2, 0.65, 0.6)),  # hidden, found (IoU 0.8)
                           _out(-3.0),  # hidden, right box but not reported
                           _out(3.0, (0.35, 0.35, 0.45, 0.45)),  # hidden, centre inside the box, far too small
                           _out(3.0, (0.6, 0.6, 0.9, 0.9)),  # hidden, elsewhere
                           _out(3.0, (0.6, 0.6, 0.9, 0.9)),  # occluded, elsewhere
                           _out(3.0)]])  # absent: counts nowhere
    counts = miss_counts(outputs, targets)
    assert counts.shape == (3, len(MISS_KINDS))
    assert counts.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]]
    assert int(counts[:, 0].sum()) == int(detection_counts(outputs, targets)["tp"][1:].sum())  # found: the true positives


def test_summarize_sums_batches_into_epoch_metrics():
    config = ObjectsConfig(**TRACKER)
    targets = torch.tensor([[[_slot(1), _slot(0), _slot(1, visible=0.0)]]])  # (1, 1, 3, 7)
    detections = torch.tensor([[[_out(3.0), _out(-3.0), _out(-3.0)]]])
    one = task().batch_stats(ObjectOutputs(detections, torch.zeros(1, 1, 3, 5), torch.zeros(1, 1, 3, 2, 2)), targets, config)
    total = {k: one[k] + one[k] for k in one}
    summary = task().summarize(total)
    assert summary["clips"] == 2 and summary["loss"] == pytest.approx(float(one["loss_sum"]))
    assert (summary["f1_visible"], summary["f1_hidden"], summary["objects_hidden"]) == (1.0, 0.0, 2)


# ----------------------------------------------------------------------------- label job rows and tables


def test_predict_and_shard_rows_give_objects_and_tracks():
    config = ObjectsConfig(**TINY)
    model = task().build_model(config).eval()
    with torch.inference_mode():
        out = task().predict(model, torch.zeros(2, 4, 3, 32, 32), config)
    assert list(out) == list(task().clip_columns()) and out["objects"].shape == (2,)
    assert len(json.loads(out["objects"][0])["frames"]) == 4

    logits = np.full((3, 3, 5), -5.0, np.float32)
    logits[:, :, 1:] = [0.1, 0.2, 0.3, 0.4]
    logits[[0, 2], 0, 0] = 2.0  # disc in frames 0 and 2
    logits[1, 2, 0] = 0.0  # triangle at probability 0.5 in frame 1: reported (>= threshold)
    first = {"video_uri": "v.mp4", "clip_index": 0, "start_s": 0.0, "end_s": 3.0, "objects": clip_objects_json(logits, LABELS, 0.5),
             "model_id": "m", "run_id": "r"}
    second = {**first, "clip_index": 1, "start_s": 3.0, "end_s": 6.0}
    status_like = {**first, "video_uri": "w.mp4", "objects": ""}
    rows = task().shard_rows([first, second, status_like], {"model_id": "m", "run_id": "r"}, 0.0)
    objects, tracks = rows["objects"], rows["tracks"]
    assert [(r["frame_time_s"], r["label"]) for r in objects] == [(0.5, "disc"), (1.5, "triangle"), (2.5, "disc"), (3.5, "disc"),
                                                                    (4.5, "triangle"), (5.5, "disc")]
    assert objects[0]["score"] == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-5)
    assert (objects[0]["x0"], objects[0]["y0"], objects[0]["x1"], objects[0]["y1"]) == pytest.approx((0.1, 0.2, 0.3, 0.4))
    by_label = {t["label"]: t for t in tracks}
    assert set(by_label) == {"disc", "triangle"}
    assert (by_label["disc"]["first_seen_s"], by_label["disc"]["last_seen_s"], by_label["disc"]["frames"]) == (0.5, 5.5, 4)
    assert by_label["disc"]["seconds_seen"] == pytest.approx(4.0) and by_label["triangle"]["mean_score"] == pytest.approx(0.5, abs=1e-5)
    for name, schema in task().tables().items():
        table = tables.table_from_rows(rows[name], schema)
        assert table.schema == schema and table.num_rows == len(rows[name])


# ----------------------------------------------------------------------------- through Ray: train, label


@pytest.mark.ray
def test_training_through_ray_then_labelling_writes_objects_and_tracks(ray_local, objects_archive, tmp_path):
    from rnnimg.cli import main
    from rnnimg.train import TrainConfig, train

    root, manifest = objects_archive
    # A threshold so low that an untrained model reports every class in every frame: the tables can be checked row by row.
    config = task().model_config(manifest, **TINY, clip_seconds=2.0, stride_seconds=2.0, score_threshold=0.001)
    result = train(manifest, str(tmp_path / "train"), "objects", TrainConfig(epochs=1, workers=1, batch_size=4, use_gpu=False),
                   model_config=config, task="objects")
    assert result.task == "objects" and 0.0 <= result.metrics["val_f1"] <= 1.0
    assert result.evaluation["f1"] == result.metrics["val_f1"] and result.evaluation["objects"] > 0
    assert os.path.exists(os.path.join(result.model_uri, "overlay.png")) and os.path.exists(os.path.join(result.model_uri, "timeline.png"))
    assert "F1" in result.report_markdown and "| hidden |" in result.report_markdown
    loaded_task, _, loaded_config, _ = tasks.load_model(result.model_uri)
    assert loaded_task.name == "objects" and loaded_config == config

    out = str(tmp_path / "labels")
    videos = [os.path.join(root, "videos", "test"), os.path.join(root, "videos", "unlabelled")]
    assert main(["label", *videos, "--model", result.model_uri, "--out", out, "--videos-per-shard", "1", "--batch-size", "2"]) == 0
    objects = pq.read_table(os.path.join(out, "objects"))
    assert objects.schema.remove_metadata() == tables.OBJECTS
    frame = objects.to_pandas()
    expected_times = sorted(t for k in range(2) for t in frame_times(2.0 * k, 2.0, 4))  # 2 clips of 2 s x 4 frames per video
    assert len(frame) == 2 * len(expected_times) * len(LABELS)  # every sampled frame of both videos, every class, once
    for (_, label), rows in frame.groupby(["video_uri", "label"]):
        assert sorted(rows["frame_time_s"]) == pytest.approx(expected_times)
    assert frame["label"].isin(LABELS).all() and ((frame[["x0", "y0", "x1", "y1"]] >= 0) & (frame[["x0", "y0", "x1", "y1"]] <= 1)).all().all()
    assert ((frame["x0"] <= frame["x1"]) & (frame["y0"] <= frame["y1"])).all() and frame["score"].between(0.001, 1).all()
    tracks = pd.read_parquet(os.path.join(out, "tracks"))
    assert list(tracks.columns) == [f.name for f in tables.TRACKS]
    # The tracks are the objects table, summed per video and class.
    expected = frame.groupby(["video_uri", "label"]).agg(first=("frame_time_s", "min"), last=("frame_time_s", "max"), frames=("score", "size"))
    got = tracks.set_index(["video_uri", "label"]).sort_index()
    assert got.index.tolist() == expected.sort_index().index.tolist()
    assert got["frames"].tolist() == expected.sort_index()["frames"].tolist()
    assert got["first_seen_s"].tolist() == pytest.approx(expected.sort_index()["first"].tolist())
    assert tracks["seconds_seen"].tolist() == pytest.approx([4.0] * len(tracks))  # 8 frames of 0.5 s each
    n_objects = duckdb.execute(f"select count(*) from '{out}/objects/*.parquet'").fetchall()[0][0]
    # The README's query: every video where a class is seen for more than N seconds.
    long = duckdb.execute(f"select distinct video_uri from '{out}/tracks/*.parquet' where label = 'disc' and seconds_seen > 3.5").fetchall()
    none = duckdb.execute(f"select distinct video_uri from '{out}/tracks/*.parquet' where label = 'disc' and seconds_seen > 4.5").fetchall()
    assert n_objects == len(frame) and sorted(v for (v,) in long) == sorted(tracks["video_uri"].unique()) and none == []
    videos_table = pd.read_parquet(os.path.join(out, "videos"))
    assert len(videos_table) == 2 and (videos_table["status"] == "ok").all() and (videos_table["clips"] == 2).all()


# ----------------------------------------------------------------------------- the per-cell head (head="cells")


@pytest.mark.parametrize("temporal,rnn_type", [(True, "lstm"), (True, "gru"), (False, "lstm")])
def test_cells_head_shapes_and_gradients(temporal, rnn_type):
    config = ObjectsConfig(**TINY, head="cells", cell_hidden=6, temporal=temporal, rnn_type=rnn_type)
    model = task().build_model(config)
    assert isinstance(model, CellObjectCRNN)
    x = torch.randn(2, 4, 3, 32, 32)
    state, grid = model.forward_features(x)
    assert state.shape == (2, 4, 6, 8, 8) and grid.shape == (2, 4, 8, 8, 8)
    outputs = model(x)
    assert outputs.detections.shape == (2, 4, 3, 5) and outputs.cells.shape == (2, 4, 3, 5, 8, 8) and outputs.heat.shape == (2, 4, 3, 8, 8)
    box = outputs.detections[..., 1:]
    assert (box >= 0).all() and (box <= 1).all() and (box[..., 0] <= box[..., 2]).all() and (box[..., 1] <= box[..., 3]).all()
    targets = torch.zeros(2, 4, 3, 7)
    targets[:, :, 0, 0] = 1
    targets[:, :, 0, 2:6] = torch.tensor([0.1, 0.1, 0.4, 0.5])
    targets[:, :, 1, 1] = 1  # ignored
    loss = task().loss(outputs, targets, config)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    with torch.inference_mode():
        out = task().predict(model.eval(), torch.zeros(1, 4, 3, 32, 32), config)
    assert len(json.loads(out["objects"][0])["frames"]) == 4  # the label job's format, unchanged


def _hand_made_cells(g=4):
    """(1, 2, 5, g, g): class 0 peaks at row 2, column 1 with its centre a quarter into the cell; class 1 peaks at (0, 3)."""
    cells = torch.zeros(1, 2, 5, g, g)
    cells[:, :, 0] = -3.0
    cells[0, 0, 0, 2, 1] = 2.0
    cells[0, 0, 0, 3, 3] = 1.5  # a weaker peak elsewhere: not picked
    cells[0, 0, 1, 2, 1] = float(torch.logit(torch.tensor(0.375)))  # ox = 2 * 0.375 - 0.5 = 0.25
    cells[0, 0, 2, 2, 1] = float(torch.logit(torch.tensor(0.5)))  # oy = 0.5
    cells[0, 0, 3, 2, 1] = float(np.log(2.0))  # width: 2 cells
    cells[0, 1, 0, 0, 3] = -1.0
    return cells


def test_decode_cells_picks_the_highest_cell_and_its_box():
    from rnnimg.models.objects import decode_cells

    detections = decode_cells(_hand_made_cells())
    logit, box = detections[0, 0, 0], detections[0, 0, 1:]
    assert float(logit) == pytest.approx(2.0)
    # centre ((1 + 0.25) / 4, (2 + 0.5) / 4) = (0.3125, 0.625); width 2/4, height exp(0)/4
    assert box.tolist() == pytest.approx([0.3125 - 0.25, 0.625 - 0.125, 0.3125 + 0.25, 0.625 + 0.125], abs=1e-5)
    assert float(detections[0, 1, 0]) == pytest.approx(-1.0)
    centre_x = (detections[0, 1, 1] + detections[0, 1, 3]) / 2
    assert float(centre_x) == pytest.approx((3 + 0.5) / 4, abs=1e-5)  # offset 0 -> sigmoid 0.5 -> the cell's middle


def test_cell_loss_is_lowest_where_the_map_matches_the_truth():
    from rnnimg.tasks.objects import cell_loss

    cells = _hand_made_cells()[None]  # (1, 1, 2, 5, 4, 4)
    right = torch.zeros(1, 1, 2, 7)
    right[0, 0, 0, 0] = 1
    right[0, 0, 0, 2:6] = torch.tensor([0.0625, 0.5, 0.5625, 0.75])  # the box class 0's peak cell predicts
    moved = right.clone()
    moved[0, 0, 0, 2:6] = torch.tensor([0.5625, 0.0, 1.0, 0.25])  # the same object elsewhere: another centre cell
    assert float(cell_loss(cells, right, 5.0, 2.0)) < float(cell_loss(cells, moved, 5.0, 2.0))
    hidden = right.clone()
    hidden[0, 0, 0, 6] = 0.0  # hidden objects are targets too: the loss does not change with visibility
    assert float(cell_loss(cells, hidden, 5.0, 2.0)) == pytest.approx(float(cell_loss(cells, right, 5.0, 2.0)))
    ignored = right.clone()
    ignored[0, 0, 1, 1] = 1.0  # class 1 ignored: its cells count nowhere
    claimed = cells.clone()
    claimed[0, 0, 1, 0] = 4.0  # class 1 claimed in every cell
    assert float(cell_loss(claimed, right, 5.0, 2.0)) > float(cell_loss(cells, right, 5.0, 2.0)) + 1.0
    assert float(cell_loss(claimed, ignored, 5.0, 2.0)) == pytest.approx(float(cell_loss(cells, ignored, 5.0, 2.0)))


def test_hidden_weight_scales_the_hidden_slots_share_of_the_loss():
    from rnnimg.tasks.objects import cell_loss

    cells = _hand_made_cells()[None]  # (1, 1, 2, 5, 4, 4)
    targets = torch.zeros(1, 2, 2, 7)  # frame 0: class 0 visible where its peak is; frame 1: class 0 hidden elsewhere
    targets[0, :, 0, 0] = 1
    targets[0, 0, 0, 2:6] = torch.tensor([0.0625, 0.5, 0.5625, 0.75])
    targets[0, 0, 0, 6] = 1.0
    targets[0, 1, 0, 2:6] = torch.tensor([0.5625, 0.0, 1.0, 0.25])
    both = torch.cat([cells, cells], dim=1)  # the same outputs in both frames: right in frame 0, wrong in frame 1
    visible_only = targets.clone()
    visible_only[0, 1, 0, 6] = 1.0  # the same slot, but visible: the plain loss does not tell them apart
    plain = float(cell_loss(both, targets, 5.0, 2.0))
    assert float(cell_loss(both, targets, 5.0, 2.0, hidden_weight=1.0)) == pytest.approx(plain)
    assert float(cell_loss(both, visible_only, 5.0, 2.0, hidden_weight=3.0)) == pytest.approx(plain)  # no hidden slot: no change
    # The wrong (hidden) frame weighs more: the loss rises towards the hidden frame's own loss, not beyond it.
    hidden_alone = float(cell_loss(both[:, 1:], targets[:, 1:], 5.0, 2.0))
    weighted = [float(cell_loss(both, targets, 5.0, 2.0, hidden_weight=w)) for w in (1.0, 3.0, 100.0)]
    assert weighted[0] < weighted[1] < weighted[2] < hidden_alone
    assert weighted[2] == pytest.approx(hidden_alone, rel=0.05)
    # And its gradient: only through the hidden frame's cells, the weight scales it against the visible frame's.
    grads = []
    for w in (1.0, 3.0):
        x = both.clone().requires_grad_(True)
        cell_loss(x, targets, 5.0, 2.0, hidden_weight=w).backward()
        grads.append(x.grad[0, 1].abs().sum() / x.grad[0, 0].abs().sum())
    assert float(grads[1]) > 2.0 * float(grads[0])


def test_cells_ablation_passes_no_gradient_across_frames():
    x = torch.randn(1, 4, 3, 32, 32, requires_grad=True)
    for temporal in (False, True):
        torch.manual_seed(0)
        model = task().build_model(ObjectsConfig(**TINY, head="cells", cell_hidden=6, temporal=temporal)).eval()
        cells = model(x).cells
        (grad,) = torch.autograd.grad(cells[:, 2].sum(), x)
        earlier, later = grad[:, :2].abs().max(), grad[:, 3:].abs().max()
        assert float(grad[:, 2].abs().max()) > 0 and float(later) == 0.0  # nothing flows backwards in time
        if temporal:
            assert float(earlier) > 0  # the recurrent model does carry frames 0 and 1 into frame 2
        else:
            assert float(earlier) == 0.0  # exactly zero: frame t's output does not depend on frame t - 1


def test_old_configs_load_with_the_tracker_head_and_new_fields_round_trip():
    from dataclasses import asdict, dataclass

    from rnnimg.models.objects import FIRST_FIELDS, SAVED_BEFORE

    config = ObjectsConfig(**TINY)
    old = {k: v for k, v in asdict(config).items() if k in FIRST_FIELDS}  # a config.json written before the cells head
    assert set(old) == FIRST_FIELDS and not set(SAVED_BEFORE) & FIRST_FIELDS
    loaded = task().config_from_dict(json.loads(json.dumps(old)))
    assert loaded.head == "tracker" and isinstance(task().build_model(loaded), ObjectCRNN)

    @dataclass(frozen=True)
    class CellsByDefault(ObjectsConfig):  # a later version whose default is the cells head
        head: str = "cells"

    assert CellsByDefault().head == "cells" and CellsByDefault.from_dict(old).head == "tracker"  # old files keep their old layout
    assert isinstance(task().build_model(CellsByDefault.from_dict(old)), ObjectCRNN)
    cells = ObjectsConfig(**{**TINY, "cnn_channels": (4, 8)}, head="cells", cell_hidden=6)
    back = task().config_from_dict(json.loads(cells.to_json()))
    assert back == cells and isinstance(task().build_model(back), CellObjectCRNN)
    from rnnimg.models.objects import CELLS_FIELDS, SAVED_BEFORE_HIDDEN_WEIGHT

    before_weight = {k: v for k, v in asdict(ObjectsConfig(**TINY, hidden_weight=4.0)).items() if k in CELLS_FIELDS}  # saved before hidden_weight
    assert task().config_from_dict(json.loads(json.dumps(before_weight))).hidden_weight == SAVED_BEFORE_HIDDEN_WEIGHT["hidden_weight"] == 1.0
    assert task().config_from_dict(old).hidden_weight == 1.0  # the tracker's configs too: the loss they were trained with
    assert task().config_from_dict({"temporal": False}).hidden_weight == ObjectsConfig().hidden_weight  # overrides: today's default
    with pytest.raises(ValueError, match="hidden_weight must be > 0"):
        ObjectsConfig(hidden_weight=0.0)
    with pytest.raises(ValueError, match="head must be one of"):
        ObjectsConfig(head="anchors")
    with pytest.raises(ValueError, match="cell_kernel odd"):
        ObjectsConfig(cell_kernel=2)
