"""Task ``predict``: moving-digits synth, the encoder-forecaster, metrics, surprise rows, training and labelling."""

import os
from dataclasses import asdict, replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rnnimg import tables, tasks
from rnnimg.models.forecaster import (MOTION_TEMPERATURE, Forecast, Forecaster, ForecasterConfig, apply_filters, constant_velocity_prior,
                                      displacement_likelihoods, to_grey, to_image)
from rnnimg.tasks.digits_synth import (GLYPH, MOTION_CLASSES, Anomaly, DigitsSynthConfig, compose, digit_glyphs, digit_pool, make_archive, plan,
                                       pool_of_split, render_glyph, render_sequence, to_rgb, trajectory)
from rnnimg.tasks.predict import (BLACK_LEVELS, black_level_stats, choose_black_level, forecast_stats, frame_mse, frame_surprisal, ssim,
                                  surprise_measure)
from rnnimg.video.clips import ClipSpec, uniform_clips
from rnnimg.video.decode import VideoReader

TINY = dict(frame_size=32, frames_per_clip=6, context_frames=3, clip_seconds=0.6, stride_seconds=0.3, channels=[8], hidden=8, layers=1)


@pytest.fixture(scope="module")
def digits_archive(tmp_path_factory):
    """8 sequences (6 train, 1 val, 1 test) + 1 unlabelled, 2 s at 10 fps, 64 x 64."""
    root = str(tmp_path_factory.mktemp("digits"))
    config = DigitsSynthConfig(videos=8, unlabelled=1, seed=5, val_fraction=0.125, test_fraction=0.125)
    return root, make_archive(root, config, processes=1), config


def task():
    return tasks.get("predict")


# ----------------------------------------------------------------------------- synthetic data


def test_sequences_are_deterministic_two_digits_in_grey():
    grey, label = render_sequence(np.random.default_rng(7))
    again, again_label = render_sequence(np.random.default_rng(7))
    np.testing.assert_array_equal(grey, again)
    assert grey.shape == (20, 64, 64) and grey.dtype == np.uint8 and label == again_label and 0 <= label < len(MOTION_CLASSES)
    assert grey.max() == 255 and (grey == 0).mean() > 0.6  # bright digits on black
    glyph = render_glyph(3, np.random.default_rng(0))
    assert glyph.shape == (GLYPH, GLYPH) and 0.0 <= glyph.min() and glyph.max() == 1.0
    assert not glyph[:2].any() and not glyph[-2:].any()  # inside its box, a margin as in MNIST
    with pytest.raises(ValueError, match="digit must be 0-9"):
        render_glyph(10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="pool must be one of"):
        render_glyph(3, np.random.default_rng(0), "test")


def test_glyphs_are_scikit_learns_real_digits_upscaled_and_split_into_disjoint_pools():
    from sklearn.datasets import load_digits

    data = load_digits()
    glyphs, targets = digit_glyphs()
    assert glyphs.shape == (1797, GLYPH, GLYPH) and (targets == data.target).all()
    # Each glyph is its 8 x 8 source enlarged: shrunk back (box filter) it has the source's pattern (a correlation,
    # not equality: bicubic smooths).
    from PIL import Image

    corr = []
    for i in range(0, 1797, 50):
        back = np.asarray(Image.fromarray(glyphs[i, 4:24, 4:24], mode="F").resize((8, 8), Image.Resampling.BOX))  # (20, 20) -> (8, 8)
        corr.append(np.corrcoef(back.ravel(), data.images[i].ravel())[0, 1])
    assert min(corr) > 0.9
    assert np.allclose(glyphs.max((1, 2)), 1.0) and not glyphs[:, :4].any() and not glyphs[:, :, -4:].any()
    train, heldout = digit_pool("train"), digit_pool("heldout")
    assert len(np.intersect1d(train, heldout)) == 0 and len(train) + len(heldout) == 1797 and len(heldout) == 359
    assert set(targets[heldout]) == set(range(10))  # every digit can be drawn from either pool
    # A glyph drawn from a pool is one of that pool's digits, of the digit asked for.
    rng = np.random.default_rng(3)
    for pool, index in (("train", train), ("heldout", heldout)):
        for digit in (0, 7):
            glyph = render_glyph(digit, rng, pool)
            match = np.flatnonzero((glyphs[index] == glyph).all((1, 2)))
            assert len(match) >= 1 and (targets[index[match]] == digit).all()
    assert [pool_of_split(s) for s in ("train", "val", "test", "unlabelled")] == ["train", "heldout", "heldout", "heldout"]


@pytest.mark.parametrize("seed", range(6))
def test_bouncing_keeps_both_digits_inside_the_frame_at_constant_speed(seed):
    positions, _ = trajectory(np.random.default_rng(seed), 300, 64)
    limit = 64 - GLYPH
    assert positions.min() >= 0 and positions.max() <= limit
    steps = np.abs(np.diff(positions, axis=0))  # (299, 2, 2) per-axis moves
    # Constant speed per axis, up to rounding and the fold at an edge: never more than speed + 1 pixel.
    assert steps.max() <= 5
    # Every axis of every digit turns around at least once in 300 frames (it bounces).
    signs = np.sign(np.diff(positions, axis=0))
    assert ((signs[1:] * signs[:-1]) < 0).any(axis=0).all()
    # And turns only at an edge: a reversal happens within one step of 0 or the limit.
    turns = np.argwhere((signs[1:] * signs[:-1]) < 0)
    for t, digit, axis in turns:
        assert min(positions[t + 1, digit, axis], limit - positions[t + 1, digit, axis]) <= 5


def test_digits_combine_by_per_pixel_maximum():
    a = np.zeros((4, 4), np.float32)
    a[:2, :2] = 0.4
    b = np.zeros((4, 4), np.float32)
    b[:2, :2] = 0.7
    b[3, 3] = 0.2
    frames = compose([a, b], np.array([[[0, 0], [1, 1]]]), 8)  # b one pixel right and down of a
    assert frames.shape == (1, 8, 8)
    assert frames[0, 0, 0] == pytest.approx(0.4) and frames[0, 1, 1] == pytest.approx(0.7)  # overlap: the max, not 1.1
    assert frames[0, 4, 4] == pytest.approx(0.2) and frames.sum() == pytest.approx(0.4 * 3 + 0.7 * 4 + 0.2)


@pytest.mark.parametrize("label", range(4))
def test_both_digits_start_in_the_direction_of_their_motion_class(label):
    expected = {"down-right": (1, 1), "down-left": (-1, 1), "up-left": (-1, -1), "up-right": (1, -1)}[MOTION_CLASSES[label]]
    checked = 0
    for seed in range(40):
        positions, got = trajectory(np.random.default_rng(seed), 4, 64, label=label)
        assert got == label
        for digit in range(2):
            start = positions[0, digit]
            if (start < 12).any() or (start > 64 - GLYPH - 12).any():
                continue  # might bounce within 3 frames
            assert tuple(np.sign(positions[3, digit] - start)) == expected
            checked += 1
    assert checked >= 10


def test_anomalies_teleport_freeze_and_reverse_one_digit():
    def run(anomaly):
        return trajectory(np.random.default_rng(17), 20, 64, label=0, anomaly=anomaly)[0]

    normal = run(None)
    frozen = run(Anomaly("freeze", 10))
    assert (frozen[10:, 0] == frozen[9, 0]).all() and (frozen[:, 1] == normal[:, 1]).all() and (frozen[:10] == normal[:10]).all()
    jumped = run(Anomaly("teleport", 10))
    assert np.abs(jumped[10, 0] - jumped[9, 0]).max() > 12 and (jumped[:10] == normal[:10]).all()
    back = run(Anomaly("reverse", 10))
    assert (back[:10] == normal[:10]).all()
    # Turned back: from frame 10 on it moves against its way before (here far from any edge, so no bounce).
    assert (normal[8:13, 0] > 8).all() and (normal[8:13, 0] < 64 - GLYPH - 8).all()
    before, after = normal[9, 0] - normal[8, 0], back[11, 0] - back[10, 0]
    assert (np.sign(after) == -np.sign(before)).all() and (np.abs(after + before) <= 1).all()
    with pytest.raises(ValueError, match="anomaly kind"):
        run(Anomaly("explode", 3))


def test_archive_decodes_to_the_rendered_frames(digits_archive):
    root, manifest, config = digits_archive
    table = pq.read_table(manifest).to_pandas()
    assert list(table.columns) == ["video_uri", "label", "split"]
    assert table["split"].value_counts().to_dict() == {"train": 6, "val": 1, "test": 1, "unlabelled": 1}
    assert set(table["label"].dropna()) <= set(MOTION_CLASSES) and table.loc[table["split"] == "unlabelled", "label"].isna().all()
    videos = plan(root, config)
    test_video = next(v for v in videos if v[0] == "test")
    for split, uri, seed, label in [*videos[:2], test_video]:
        if split != "unlabelled":
            assert table.loc[table["video_uri"] == uri, "label"].item() == MOTION_CLASSES[label]
        # Training videos from the training digits, the others from the held-out ones.
        grey, _ = render_sequence(np.random.default_rng(seed), config.frames, config.size, label, pool=pool_of_split(split))
        with VideoReader(uri, (64, 64)) as reader:
            assert reader.duration_s == pytest.approx(2.0, abs=0.05)
            ((_, frames),) = list(reader.clips(uniform_clips(reader.duration_s, ClipSpec(2.0, 20, 1.0))))
        # Near-lossless grey: every decoded frame within a few levels of the rendered one.
        assert np.abs(frames.astype(int) - to_rgb(grey).astype(int)).max() <= 12


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("rnn_type,channels,layers,output", [("lstm", (4, 8), 2, "filters"), ("gru", (4,), 1, "filters"),
                                                              ("lstm", (4, 8), 2, "pixels")])
def test_model_shapes_and_gradients(rnn_type, channels, layers, output):
    config = ForecasterConfig(frame_size=16, frames_per_clip=6, context_frames=4, channels=channels, rnn_type=rnn_type, hidden=4, layers=layers,
                              output=output)
    model = task().build_model(config)
    x = torch.rand(2, 6, 3, 16, 16) - 0.5
    low = 16 // 2 ** len(channels)
    assert model.forward_features(x).shape == (2, 2, 4, low, low)
    out = model(x)
    assert isinstance(out, Forecast) and out.logits.shape == (2, 2, 1, 16, 16) and out.frames.shape == (2, 6, 1, 16, 16)
    loss = task().loss(out, torch.zeros(2, dtype=torch.long), config)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    assert model.rollout(x[:, :4], 7).shape == (2, 7, 1, 16, 16)  # any horizon, from the context alone


@pytest.mark.parametrize("dy,dx", [(0, 0), (2, -3), (-4, 4)])
def test_a_one_hot_filter_moves_the_frame_by_its_offset_and_fills_with_black(dy, dx):
    size = 9
    frame = torch.rand(2, 1, 12, 12)
    kernels = torch.zeros(2, size * size, 12, 12)
    # Output pixel (y, x) takes input (y + dy, x + dx): the tap at row dy + 4, column dx + 4.
    kernels[:, (dy + size // 2) * size + dx + size // 2] = 1.0
    moved = apply_filters(frame, kernels, size)
    expected = torch.zeros_like(frame)
    ys, xs = slice(max(0, -dy), 12 - max(0, dy)), slice(max(0, -dx), 12 - max(0, dx))
    expected[..., ys, xs] = frame[..., max(0, dy) : 12 + min(0, dy), max(0, dx) : 12 + min(0, dx)]
    assert torch.equal(moved, expected)


def test_displacement_likelihoods_find_the_motion_that_the_matching_filter_performs():
    frames = torch.zeros(1, 3, 1, 64, 64)
    for t in range(3):  # a box moving 2 px down and 3 px left per frame
        frames[0, t, 0, 20 + 2 * t : 30 + 2 * t, 20 - 3 * t : 28 - 3 * t] = 1.0
    likely = displacement_likelihoods(frames, 9, 4)
    assert likely.shape == (1, 3, 81, 16, 16)
    assert torch.allclose(likely.sum(2), torch.ones(1, 3, 16, 16))
    assert torch.allclose(likely[:, 0], torch.full_like(likely[:, 0], 1 / 81))  # no frame before the first
    assert torch.allclose(likely[0, 1, :, 0, 0], torch.full((81,), 1 / 81))  # a blank cell: every displacement fits
    tap = int(likely[0, 2].mean((1, 2)).argmax())
    assert divmod(tap, 9) == (4 - 2, 4 + 3)  # output p takes input p + (-2, +3)
    assert float(likely[0, 2, tap].max()) > 0.99  # an edge cell is sure of it
    kernels = torch.zeros(1, 81, 64, 64)
    kernels[:, tap] = 1.0
    assert torch.equal(apply_filters(frames[:, 1], kernels, 9), frames[:, 2])


def test_displacement_likelihoods_score_each_tap_by_what_its_filter_makes_of_the_frame_before():
    frames = torch.rand(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    likely = displacement_likelihoods(frames, 5, 4, pool_cells=3)
    one_tap = torch.eye(25)[:, None, :, None, None].expand(25, 2, 25, 16, 16)  # filter i: all weight on tap i
    for t in (1, 2):  # tap i's cost: the mean squared difference per cell between frame t and what filter i makes of frame t-1
        cost = torch.stack([torch.nn.functional.avg_pool2d((apply_filters(frames[:, t - 1], one_tap[i], 5) - frames[:, t]) ** 2, 4)[:, 0]
                            for i in range(25)], 1)  # (B, 25, 4, 4)
        cost = torch.nn.functional.avg_pool2d(cost, 3, stride=1, padding=1, count_include_pad=False)
        assert torch.allclose(likely[:, t], torch.softmax(-cost / MOTION_TEMPERATURE, 1), atol=1e-5), t


def test_filter_predictions_only_move_what_the_last_frame_shows():
    config = ForecasterConfig(**{**TINY, "channels": (8,)})
    assert config.output == "filters"
    model = Forecaster(config).eval()
    x = torch.full((2, 6, 3, 32, 32), -0.5)  # black clips ...
    x[1, :, :, 10:16, 12:20] = torch.rand(6, 8, generator=torch.Generator().manual_seed(0)) - 0.5  # ... the second with a box that never moves
    with torch.no_grad():
        predicted = model.rollout(x, 5)
    # Convex combinations of the last frame: black stays black (up to the logit's clamp), nothing brighter than white.
    assert float(predicted[0].max()) <= 2e-4 and float(predicted.max()) <= 1.0
    # A fresh model follows its constant-velocity prior: a box that stood still in the last two frames stays.
    last = to_grey(x[1:, 2:3])[:, 0]  # (1, 1, 32, 32)
    blurred = torch.nn.functional.avg_pool2d(last, 3, stride=1, padding=1)
    assert float((predicted[1:, 0] - last).abs().mean()) < 0.5 * float((blurred - last).abs().mean())


def test_the_constant_velocity_prior_moves_a_box_along_its_last_motion():
    frames = torch.zeros(1, 5, 1, 64, 64)
    for t in range(5):  # a textured box (no flat interior) moving 2 px down and 3 px left per frame
        frames[0, t, 0, 20 + 2 * t : 32 + 2 * t, 24 - 3 * t : 36 - 3 * t] = torch.rand(12, 12, generator=torch.Generator().manual_seed(0))
    prior = constant_velocity_prior(frames[:, :2], 9, 4, 3)
    assert prior.shape == (1, 3, 81, 64, 64) and torch.allclose(prior.sum(2), torch.ones(1, 3, 64, 64))
    frame = frames[:, 1]
    for step in range(3):
        frame = apply_filters(frame, prior[:, step], 9)
        truth = frames[:, 2 + step]
        # Far closer to the truth than copying the last frame, whose error grows with every step.
        assert float((frame - truth).abs().sum()) < 0.4 * float((frames[:, 1] - truth).abs().sum()), step


@pytest.mark.parametrize("rnn_type,output", [("lstm", "filters"), ("gru", "filters"), ("lstm", "pixels")])
def test_one_step_ahead_predictions_are_forward_on_each_prefix_of_the_clip(rnn_type, output):
    """Frame t of ``next_frame_logits`` is what the same weights predict first from the clip's frames 0 .. t-1."""
    config = ForecasterConfig(**{**TINY, "rnn_type": rnn_type, "output": output, "layers": 2})
    torch.manual_seed(0)
    model = Forecaster(config).eval()
    x = torch.rand(2, 7, 3, 32, 32) - 0.5
    with torch.no_grad():
        one_step = model.next_frame_logits(x)
        assert one_step.shape == (2, 7 - config.context_frames, 1, 32, 32)
        for t in range(config.context_frames, 7):
            prefix = Forecaster(ForecasterConfig(**{**asdict(config), "context_frames": t, "frames_per_clip": t + 1}))
            prefix.load_state_dict(model.state_dict())
            first = prefix.eval()(x[:, : t + 1]).logits[:, 0]
            assert torch.allclose(one_step[:, t - config.context_frames], first, atol=1e-5), t
    with pytest.raises(ValueError, match="T > context_frames"):
        model.next_frame_logits(x[:, : config.context_frames])


def test_surprise_is_low_for_steady_motion_and_high_where_it_jumps_stops_or_turns_back():
    """With the decoder's part zeroed the kernels are the constant-velocity prior alone: a steadily moving
    box is predicted one step ahead almost exactly, a jump, a stop or a turn is not."""
    from rnnimg.tasks.predict import surprise

    config = ForecasterConfig(frame_size=64, frames_per_clip=8, context_frames=4, clip_seconds=0.8, stride_seconds=0.4, hidden=8, layers=1)
    model = Forecaster(config).eval()
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
        model.decoder[-1].bias.zero_()
    texture = torch.rand(12, 12, generator=torch.Generator().manual_seed(0))
    positions = {"steady": [(10 + 2 * t, 40 - 3 * t) for t in range(8)]}
    positions["jumps"] = positions["steady"][:5] + [(y + 20, x) for y, x in positions["steady"][5:]]
    positions["stops"] = positions["steady"][:5] + [positions["steady"][4]] * 3
    positions["turns"] = positions["steady"][:5] + [positions["steady"][3], positions["steady"][2], positions["steady"][1]]
    clips = torch.zeros(len(positions), 8, 1, 64, 64)
    for i, track in enumerate(positions.values()):
        for t, (y, x) in enumerate(track):
            clips[i, t, 0, y : y + 12, x : x + 12] = texture
    x = clips.expand(-1, -1, 3, -1, -1) - 0.5
    ink = float((texture**2).sum())  # the squared error of missing the box altogether
    for measure in ("surprisal", "squared_error"):
        with torch.no_grad():
            scores = dict(zip(positions, surprise(model, x, config.context_frames, measure).tolist()))
        if measure == "squared_error":
            assert scores["steady"] < 0.1 * ink, scores
        for kind in ("jumps", "stops", "turns"):
            assert scores[kind] > 5 * scores["steady"] and scores[kind] > 0.3 * ink, (measure, kind, scores)
    with pytest.raises(ValueError, match="measure must be one of"):
        surprise(model, x, config.context_frames, "mse")


def test_surprisal_is_the_bce_less_the_frames_own_entropy_and_weighs_a_sure_miss_above_a_hedge():
    truth = torch.zeros(2, 1, 16, 16)
    truth[:, 0, 4:8, 4:8] = 1.0  # a 4 x 4 box
    truth[1, 0, 4:8, 4:8] = torch.linspace(0.1, 0.9, 16).view(4, 4)  # grey values too
    # An exact prediction costs nothing, whatever the frame's own entropy.
    exact = torch.logit(truth.clamp(1e-4, 1 - 1e-4))
    assert frame_surprisal(exact, truth).tolist() == pytest.approx([0.0, 0.0], abs=0.05)
    # It is the frame's BCE less that of a perfect prediction (the entropy of each pixel's grey).
    logits = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), truth.double(), reduction="none").sum((-3, -2, -1))
    y = truth.double()
    entropy = -(torch.xlogy(y, y) + torch.xlogy(1 - y, 1 - y)).sum((-3, -2, -1))
    assert frame_surprisal(logits, truth).tolist() == pytest.approx((bce - entropy).tolist(), rel=1e-9)
    # A sure miss (the box one pixel to the right, at p = 1 - 1e-4) against a hedge (p = 1/2 over an 8 x 8 square
    # around it): the squared error ranks the hedge higher (16 against 8), the surprisal the sure miss (74 against 44 nats).
    box = truth[:1]
    sure = torch.full_like(box, -9.21)
    sure[..., 4:8, 5:9] = 9.21
    hedge = torch.full_like(box, -9.21)
    hedge[..., 2:10, 2:10] = 0.0
    se = {name: float(frame_mse(torch.sigmoid(p), box)[0]) for name, p in (("sure", sure), ("hedge", hedge))}
    kl = {name: float(frame_surprisal(p, box)[0]) for name, p in (("sure", sure), ("hedge", hedge))}
    assert se["hedge"] > 1.9 * se["sure"] and kl["sure"] > 1.5 * kl["hedge"], (se, kl)


def test_the_surprise_measure_is_the_models_own_observation_model():
    assert surprise_measure(ForecasterConfig()) == "surprisal"
    assert surprise_measure(ForecasterConfig(loss="mse")) == "squared_error"


def test_a_forecaster_saved_before_the_filters_loads_as_it_was_trained():
    saved = {k: v for k, v in asdict(ForecasterConfig()).items() if k not in ("output", "filter_size", "motion_input", "loss")}
    assert ForecasterConfig.from_dict(saved).output == "pixels" and not ForecasterConfig.from_dict(saved).motion_input
    assert ForecasterConfig.from_dict({**saved, "output": "filters"}).output == "filters"
    assert ForecasterConfig.from_dict({"hidden": 8}).output == "filters"  # a new config: today's default
    assert ForecasterConfig.from_dict(saved).loss == "bce"
    assert ForecasterConfig.from_dict(saved).one_step_weight == 0.0  # saved before the one-step term: trained without it
    with pytest.raises(ValueError, match="loss"):
        ForecasterConfig(loss="l1")
    with pytest.raises(ValueError, match="output"):
        ForecasterConfig(output="flow")
    with pytest.raises(ValueError, match="filter_size"):
        ForecasterConfig(filter_size=4)


def test_the_loss_is_the_configured_per_pixel_bce_or_mse():
    logits = torch.randn(2, 3, 1, 8, 8)
    frames = torch.rand(2, 5, 1, 8, 8)
    out = Forecast(logits, frames)
    bce = task().loss(out, None, ForecasterConfig(**{**TINY, "frames_per_clip": 5, "context_frames": 2}))
    mse = task().loss(out, None, ForecasterConfig(**{**TINY, "frames_per_clip": 5, "context_frames": 2, "loss": "mse"}))
    target = frames[:, 2:]
    assert torch.allclose(bce, torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), target), atol=1e-5)
    assert torch.allclose(mse, ((torch.sigmoid(logits) - target) ** 2).mean())


def test_the_one_step_weight_mixes_the_one_step_ahead_loss_into_the_forecasts():
    """w = one_step_weight: loss = (1 - w) forecast + w one-step-ahead, whose predictions ``forward`` returns
    (what the surprise score reads); w = 0 is the forecast alone and computes no one-step predictions."""
    from rnnimg.tasks.predict import loss_fn

    bce = torch.nn.functional.binary_cross_entropy_with_logits
    x = torch.rand(2, 6, 3, 32, 32) - 0.5
    torch.manual_seed(0)
    plain = Forecaster(ForecasterConfig(**TINY)).eval()
    with torch.no_grad():
        out = plain(x)
        forecast_loss = bce(out.logits, out.frames[:, 3:])
        assert out.next_frame_logits is None and torch.allclose(task().loss(out, None, plain.config), forecast_loss)
        for weight in (0.5, 1.0):
            model = Forecaster(ForecasterConfig(**TINY, one_step_weight=weight)).eval()
            model.load_state_dict(plain.state_dict())  # the weight changes the loss, not the architecture
            out = model(x)
            assert torch.equal(out.logits, plain(x).logits) and torch.equal(out.next_frame_logits, model.next_frame_logits(x))
            one_step_loss = bce(out.next_frame_logits, out.frames[:, 3:])
            assert torch.allclose(task().loss(out, None, model.config), weight * one_step_loss + (1 - weight) * forecast_loss)
    with pytest.raises(ValueError, match="one-step-ahead predictions"):
        loss_fn(plain(x), 3, "bce", 0.5)
    with pytest.raises(ValueError, match="one_step_weight"):
        ForecasterConfig(one_step_weight=1.5)
    with pytest.raises(ValueError, match="conditioned"):
        ForecasterConfig(labels=("a", "b"), one_step_weight=0.5)


def test_the_forecast_never_sees_the_frames_it_predicts():
    config = ForecasterConfig(**{**TINY, "channels": (8,)})
    model = Forecaster(config).eval()
    x = torch.rand(1, 6, 3, 32, 32) - 0.5
    future_changed, context_changed = x.clone(), x.clone()
    future_changed[:, 3:] = 0.5
    context_changed[:, 1] = -0.5
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(future_changed).logits)
        assert not torch.equal(model(x).logits, model(context_changed).logits)


def test_a_conditioned_model_takes_its_class_and_only_then():
    config = ForecasterConfig(**{**TINY, "channels": (8,), "labels": MOTION_CLASSES})
    model = Forecaster(config).eval()
    x = torch.rand(2, 6, 3, 32, 32) - 0.5
    with torch.no_grad():
        a, b = model(x, torch.tensor([0, 0])).logits, model(x, torch.tensor([0, 2])).logits
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="needs labels"):
        model(x)
    with pytest.raises(ValueError, match="takes no labels"):
        Forecaster(ForecasterConfig(**{**TINY, "channels": (8,)}))(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="context_frames must be"):
        ForecasterConfig(frames_per_clip=4, context_frames=4)


def test_to_grey_maps_model_input_back_to_unit_range():
    from rnnimg.models.layout import to_model_input

    frames = np.zeros((1, 2, 2, 3), np.uint8)
    frames[0, 0, 0] = 255
    grey = to_grey(to_model_input(frames))
    assert grey.shape == (1, 1, 1, 2, 2) and grey[0, 0, 0, 0, 0] == 1.0 and grey[0, 0, 0, 1, 1] == 0.0


# ----------------------------------------------------------------------------- metrics


def test_ssim_is_one_for_identical_frames_and_drops_with_damage():
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.random((3, 1, 32, 32)))
    assert torch.allclose(ssim(frames, frames), torch.ones(3, dtype=torch.float64))
    black = torch.zeros(1, 1, 32, 32)
    assert ssim(black, black).item() == pytest.approx(1.0)
    noisy = (frames + 0.2 * torch.from_numpy(rng.standard_normal((3, 1, 32, 32)))).clamp(0, 1)
    assert (ssim(noisy, frames) < 0.9).all() and (ssim(1 - frames, frames) < 0).all()
    assert ssim(frames, noisy).tolist() == pytest.approx(ssim(noisy, frames).tolist())  # symmetric


def test_frame_mse_sums_squared_error_over_the_pixels():
    truth = torch.zeros(2, 1, 8, 8)
    truth[0, 0, :2, :5] = 1.0  # 10 bright pixels
    predicted = torch.zeros(2, 1, 8, 8)
    predicted[1] = 0.5  # 64 pixels off by 0.5
    assert frame_mse(predicted, truth).tolist() == pytest.approx([10.0, 16.0])


def test_baselines_on_hand_made_clips():
    frames = torch.zeros(1, 5, 1, 16, 16)  # 3 context frames, 2 future
    frames[0, 0, 0, 0, :4] = 1.0  # context frame 0: 4 pixels
    frames[0, 2, 0, 5, :8] = 1.0  # the last context frame: 8 pixels
    frames[0, 3:] = frames[0, 2]  # the future repeats it: copying it is exact
    stats = forecast_stats(torch.zeros(1, 2, 1, 16, 16), frames, 3)
    assert stats["copy_last_mse"].tolist() == [0.0, 0.0] and stats["copy_last_ssim"].tolist() == pytest.approx([1.0, 1.0])
    assert stats["mse"].tolist() == [8.0, 8.0]  # all black against 8 bright pixels
    # Mean of the context: the 8 pixels at 1/3 (error (2/3)^2 each), the other 4 at 1/3 (error (1/3)^2 each).
    assert stats["mean_frame_mse"].tolist() == pytest.approx([8 * 4 / 9 + 4 / 9] * 2)
    assert stats["ssim"].shape == (2,) and (stats["ssim"] < 1).all()


def test_batch_stats_summarize_to_per_frame_mse_and_the_ratio():
    config = ForecasterConfig(**{**TINY, "channels": (8,)})
    frames = torch.zeros(2, 6, 1, 32, 32)
    frames[:, :, :, 10:14, 10:14] = 1.0  # a still 4x4 square: 16 bright pixels per frame
    logits = torch.full((2, 3, 1, 32, 32), -30.0)  # predicts black
    summary = task().summarize(task().batch_stats(Forecast(logits, frames), torch.zeros(2), config))
    assert summary["clips"] == 2 and summary["mse"] == pytest.approx(16.0) and summary["mse_per_step"] == [16.0] * 3
    assert summary["copy_last_mse"] == 0.0 and summary["copy_last_ssim"] == pytest.approx(1.0) and summary["mean_frame_mse"] == 0.0
    assert np.isnan(summary["mse_vs_copy_last"])  # no ratio to a perfect baseline
    exact = torch.where(frames[:, 3:] > 0, 30.0, -30.0)
    assert task().summarize(task().batch_stats(Forecast(exact, frames), torch.zeros(2), config))["mse"] == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- config, predict, rows


def test_model_config_follows_the_manifest_frame_rate(digits_archive, tmp_path):
    _, manifest, _ = digits_archive
    config = task().model_config(manifest)
    assert (config.frames_per_clip, config.context_frames, config.clip_seconds, config.stride_seconds) == (20, 10, 2.0, 1.0)
    short = task().model_config(manifest, frames_per_clip=8, rnn_hidden=16)
    assert (short.context_frames, short.clip_seconds, short.stride_seconds, short.hidden) == (4, 0.8, 0.4, 16)
    with pytest.raises(ValueError, match="unknown forecaster config keys"):
        task().model_config(manifest, backbone="resnet18")
    with pytest.raises(ValueError, match="shared training loop"):
        task().check_training(manifest, ForecasterConfig(labels=MOTION_CLASSES))
    rows = task().training_rows(manifest, "train", config)
    assert len(rows) == 6 and {t for _, t in rows} == {0}
    conditioned = task().training_rows(manifest, "train", ForecasterConfig(labels=MOTION_CLASSES))
    table = pq.read_table(manifest).to_pandas().set_index("video_uri")
    assert all(MOTION_CLASSES[t] == table.loc[uri, "label"] for uri, t in conditioned)


def test_predict_gives_the_surprise_of_each_clip_and_rows_fit_the_table():
    config = ForecasterConfig(**{**TINY, "channels": (8,)})
    model = task().build_model(config).eval()
    x = torch.rand(3, 6, 3, 32, 32) - 0.5
    with torch.inference_mode():
        out = task().predict(model, x, config)
        # Each frame after the context one step ahead (the model's own check is below): the largest surprisal.
        errors = frame_surprisal(model.next_frame_logits(x[1:2]).float(), to_grey(x[1:2])[:, config.context_frames:])
    assert list(out) == list(task().clip_columns()) and out["surprise"].shape == (3,) and out["surprise"].dtype == np.float32
    assert errors.shape == (1, 3) and out["surprise"][1] == pytest.approx(float(errors.max()), rel=1e-5)
    clip = {"video_uri": "v.mp4", "clip_index": 0, "start_s": 0.0, "end_s": 0.6, "surprise": float(out["surprise"][0]), "model_id": "m",
            "run_id": "r"}
    rows = task().shard_rows([clip], {"model_id": "m", "run_id": "r"}, 0.0)
    table = tables.table_from_rows(rows["clips"], task().tables()["clips"])
    assert table.schema == tables.SURPRISE_CLIPS and table.column("surprise").to_pylist() == pytest.approx([clip["surprise"]])


def test_the_black_level_draws_faint_grey_black_and_is_chosen_within_the_mse_slack():
    logits = torch.logit(torch.tensor([0.0001, 0.04, 0.06, 0.5, 0.99]).view(1, 1, 1, 1, 5))
    assert to_image(logits).flatten().tolist() == pytest.approx([0.0001, 0.04, 0.06, 0.5, 0.99], rel=1e-4)
    assert to_image(logits, 0.05).flatten().tolist() == pytest.approx([0.0, 0.0, 0.06, 0.5, 0.99], rel=1e-4)

    # A digit's clear core with a faint haze around it, over black: drawing the haze black costs a little
    # MSE (where the truth is lit) and wins SSIM; the sweep's level 0 is the plain prediction.
    truth = torch.zeros(2, 3, 1, 32, 32)
    truth[..., 10:20, 10:20] = 1.0
    predicted = torch.full_like(truth, 0.03)
    predicted[..., 10:20, 10:20] = 0.9
    predicted[..., 10:20, 19] = 0.08  # a lit column of the truth the model was unsure of
    sweep = black_level_stats(torch.logit(predicted), truth)
    plain = forecast_stats(predicted, torch.cat([truth[:, :1], truth], 1), 1)
    assert sweep["black_level_mse"][0].item() == pytest.approx(plain["mse"].mean().item(), rel=1e-6)
    assert sweep["black_level_ssim"][0].item() == pytest.approx(plain["ssim"].mean().item(), rel=1e-6)
    mse, score = sweep["black_level_mse"].tolist(), sweep["black_level_ssim"].tolist()
    assert score[1] > score[0] + 0.2 and mse[1] < mse[0]  # 0.05: the haze gone, the lit column kept
    assert mse[2] > mse[1]  # 0.1 also blacks out the lit column
    assert choose_black_level(mse, score) >= 0.05  # the haze-only level costs no MSE here: something above none is chosen
    assert choose_black_level([10, 10.4, 11, 12, 13, 14, 15], [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]) == 0.05  # within 5% of level 0 only
    assert choose_black_level([10, 9, 9, 9, 9, 9, 9], [0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3]) == 0.0
    with pytest.raises(ValueError, match="per level"):
        choose_black_level([1, 2], [0.1, 0.2])


def test_the_black_level_is_saved_chosen_at_export_and_old_models_keep_none():
    task_ = task()
    assert ForecasterConfig().black_level is None and ForecasterConfig().black == 0.0
    with pytest.raises(ValueError, match="black_level"):
        ForecasterConfig(black_level=1.0)
    saved = {k: v for k, v in asdict(ForecasterConfig(output="pixels", motion_input=False)).items() if k in
             {"frame_size", "frames_per_clip", "context_frames", "clip_seconds", "stride_seconds", "channels", "rnn_type", "hidden",
              "layers", "kernel_size", "labels"}}
    assert ForecasterConfig.from_dict(saved).black_level == 0.0  # a model exported before the black level draws as it did
    entry = {"epoch": 3, "val_mse": 10.0, "val_ssim": 0.5, "val_mse_by_black_level": [10, 10.2, 10.4, 11, 12, 13, 14],
             "val_ssim_by_black_level": [0.5, 0.6, 0.7, 0.75, 0.8, 0.8, 0.8], "val_copy_last_mse": 40.0}
    chosen = task_.export_config(ForecasterConfig(), entry)
    assert chosen.black_level == 0.1 and task_.export_config(ForecasterConfig(black_level=0.2), entry).black_level == 0.2
    assert task_.export_config(ForecasterConfig(), {"epoch": 0}).black_level == 0.0  # no sweep: none
    ev = task_.evaluation(entry, chosen)
    assert (ev["black_level"], ev["mse"], ev["ssim"], ev["raw_mse"], ev["raw_ssim"]) == (0.1, 10.4, 0.7, 10, 0.5)
    assert ev["mse_vs_copy_last"] == pytest.approx(10.4 / 40.0)
    assert task_.evaluation(entry, ForecasterConfig(black_level=0.0))["mse"] == 10


# ----------------------------------------------------------------------------- through Ray, and generate


@pytest.mark.slow
@pytest.mark.ray
def test_train_through_ray_then_label_writes_surprise_rows_then_generate(ray_local, digits_archive, tmp_path):
    from rnnimg.generate import from_video
    from rnnimg.label import LabelConfig, label
    from rnnimg.train import TrainConfig, train

    root, manifest, _ = digits_archive
    # Half the loss one step ahead: the one-step predictions go through DDP's forward with the forecast.
    config = task().model_config(manifest, frame_size=32, frames_per_clip=6, channels=[8], hidden=8, layers=1, one_step_weight=0.5)
    result = train(manifest, str(tmp_path), "pred", TrainConfig(epochs=1, workers=1, batch_size=4, use_gpu=False), model_config=config,
                   task="predict")
    assert result.task == "predict" and result.metrics["val_mse"] > 0 and result.metrics["val_copy_last_mse"] > 0
    assert "copy the last input frame" in result.report_markdown and "black level" in result.report_markdown
    # The black level was left to choose: chosen on the selected epoch's validation sweep, exported with the model,
    # and the evaluation's figures are the model's at that level (with none: the epoch's own val_mse).
    ev = result.evaluation
    assert config.black_level is None and ev["raw_mse"] == pytest.approx(result.metrics["val_mse"], rel=1e-6)
    assert ev["black_level"] == choose_black_level(ev["mse_by_black_level"], ev["ssim_by_black_level"])
    assert ev["mse"] == ev["mse_by_black_level"][BLACK_LEVELS.index(ev["black_level"])]
    loaded_task, _, loaded_config, _ = tasks.load_model(result.model_uri)
    assert loaded_task.name == "predict" and loaded_config == replace(config, black_level=ev["black_level"])

    out = str(tmp_path / "labels")
    videos = [os.path.join(root, "videos", "test"), os.path.join(root, "videos", "unlabelled")]
    labelled = label(videos, result.model_uri, out, LabelConfig(videos_per_shard=1, batch_size=4))
    assert (labelled.videos, labelled.ok) == (2, 2)
    clips = pq.read_table(os.path.join(out, "clips"))
    assert clips.schema.remove_metadata() == tables.SURPRISE_CLIPS
    frame = clips.to_pandas()
    # 2 s videos, 0.6 s clips every 0.3 s: 5 clips each; every surprise a finite, positive error.
    assert len(frame) == 10 and sorted(frame["clip_index"].unique()) == list(range(5))
    assert np.isfinite(frame["surprise"]).all() and (frame["surprise"] > 0).all()

    video = os.path.join(root, "videos", "test", "test-00000.mp4")
    written = from_video(result.model_uri, video, 1.2, str(tmp_path / "pred.mp4"))
    assert (written["frames"], written["context_frames"], written["predicted_frames"]) == (12, 3, 9)
    with VideoReader(written["out"]) as reader:
        assert (reader.info.width, reader.info.height) == (66, 32) and reader.duration_s == pytest.approx(1.2, abs=0.15)


def test_generate_with_a_conditioned_model_and_the_command_line_errors(tmp_path, capsys):
    from rnnimg.cli import main
    from rnnimg.generate import from_label, generate_clip
    from tests.media import export_untrained_model

    conditioned = export_untrained_model(str(tmp_path / "cond"), task="predict", **{**TINY, "labels": list(MOTION_CLASSES)})
    written = from_label(conditioned, "up-left", 3, str(tmp_path / "gen.mp4"))
    assert (written["frames"], written["context_frames"], written["label"]) == (6, 3, "up-left")
    with VideoReader(written["out"]) as reader:
        assert (reader.info.width, reader.info.height) == (32, 32) and reader.duration_s == pytest.approx(0.6, abs=0.15)
    _, model, config, _ = tasks.load_model(conditioned)
    first, again, other = generate_clip(model, config, 2, 3), generate_clip(model, config, 2, 3), generate_clip(model, config, 0, 3)
    np.testing.assert_array_equal(first, again)  # the seed fixes the clip
    assert first.shape == (6, 32, 32) and not np.array_equal(first[3:], other[3:])  # the class changes what is generated

    plain = export_untrained_model(str(tmp_path / "plain"), task="predict", **TINY)
    cases = [
        (["generate", conditioned, "--label", "sideways", "--out", str(tmp_path / "x.mp4")], "label must be one of the model's classes"),
        (["generate", plain, "--label", "up-left", "--out", str(tmp_path / "x.mp4")], "is not conditioned"),
        (["generate", plain, "--from", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "x.mp4")], "cannot read"),
        (["generate", plain, "--from", "v.mp4", "--seconds", "0.2", "--out", str(tmp_path / "x.mp4")], "more than the model's 3 context frames"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        main(["generate", plain, "--from", "v.mp4", "--label", "up-left", "--out", "x.mp4"])  # one source only
