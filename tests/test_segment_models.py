"""Segmenter variants (temporal, per-frame, ReNet, its conv ablation, mask stride), loading configs saved
before a field existed, and the still-image synthetic set (marker-colour rule, PNG and npz files)."""

from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rnnimg import checkpoint, tasks
from rnnimg.manifest import absolute_uri, manifest_folder
from rnnimg.models.segmenter import Segmenter, SegmenterConfig, conv_ablation_width
from rnnimg.tasks.segment import load_masks, masks_at
from rnnimg.tasks.segment_synth import PALETTE, SegmentSynthConfig, encode_png, make_archive, render_still
from rnnimg.train.data import iter_clips
from rnnimg.video.clips import ClipSpec, uniform_clips
from rnnimg.video.decode import VideoReader

SMALL = {"frame_size": 32, "channels": (8, 16), "hidden": 8}
VARIANTS = {
    "temporal lstm": dict(frames_per_clip=3),
    "temporal gru, 3 stages, full-resolution stage": dict(frames_per_clip=3, rnn_type="gru", channels=(8, 8, 16), mask_stride=1),
    "per-frame ablation": dict(frames_per_clip=3, temporal=False),
    "renet": dict(frames_per_clip=1, temporal=False, spatial="renet"),
    "renet gru, 2 layers": dict(frames_per_clip=1, temporal=False, spatial="renet", rnn_type="gru", spatial_layers=2),
    "conv ablation": dict(frames_per_clip=1, temporal=False, spatial="conv"),
    "conv ablation, 2 layers": dict(frames_per_clip=1, temporal=False, spatial="conv", spatial_layers=2),
    "renet on 2x2 patches": dict(frames_per_clip=1, temporal=False, spatial="renet", spatial_patch=2),
    "renet without sweep norms, untied": dict(frames_per_clip=1, temporal=False, spatial="renet", spatial_norm=False, spatial_tied=False),
    "conv ablation, stride 2": dict(frames_per_clip=1, temporal=False, spatial="conv", spatial_patch=2),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than several, and kinder to a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- shapes and configs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_maps_clips_to_mask_logits_and_trains(name):
    config = SegmenterConfig(**{**SMALL, **VARIANTS[name]})
    model = tasks.get("segment").build_model(config)
    t, stages = config.frames_per_clip, len(config.channels)
    x = torch.randn(2, t, 3, 32, 32)
    features, skips = model.forward_features(x)
    low = 32 // 2**stages // config.spatial_patch
    assert features.shape == (2, t, 8, low, low)
    assert [tuple(s.shape) for s in skips] == [(2 * t, 3, 32, 32), *[(2 * t, c, 32 // 2 ** (k + 1), 32 // 2 ** (k + 1))
                                                                    for k, c in enumerate(config.channels[:-1])]]
    logits = model.forward_head(features, skips)
    assert logits.shape == (2, t, 1, 32, 32)
    loss = tasks.get("segment").loss(logits, torch.zeros(2, t, 32, 32, dtype=torch.uint8), config)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_mask_stride_2_has_no_convolution_at_full_resolution():
    seen = []
    model = Segmenter(SegmenterConfig(**SMALL, frames_per_clip=2)).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, inputs, output: seen.append((m.stride[0], inputs[0].shape[-1])))
    with torch.no_grad():
        model(torch.randn(1, 2, 3, 32, 32))
    full_resolution = [stride for stride, width in seen if width == 32 and stride == 1]
    assert seen and not full_resolution  # only the first stride-2 conv reads the full frame


@pytest.mark.parametrize("spatial_layers,spatial_patch", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_conv_ablation_has_renet_parameter_count_and_depth(spatial_layers, spatial_patch, rnn_type):
    common = dict(frame_size=64, frames_per_clip=1, temporal=False, rnn_type=rnn_type, spatial_layers=spatial_layers,
                  spatial_patch=spatial_patch)
    renet = Segmenter(SegmenterConfig(**common, spatial="renet"))
    conv = Segmenter(SegmenterConfig(**common, spatial="conv"))
    assert abs(_parameters(conv.rnn) - _parameters(renet.rnn)) <= 0.1 * _parameters(renet.rnn)
    assert abs(_parameters(conv) - _parameters(renet)) <= 0.02 * _parameters(renet)
    sweeps = 2 * len(renet.rnn)  # each ReNet layer: a row sweep and a column sweep
    assert sum(isinstance(m, torch.nn.Conv2d) for m in conv.rnn.modules()) == sweeps
    assert conv_ablation_width(32, SegmenterConfig(**common, spatial="conv")) > 1
    x = torch.randn(1, 1, 3, 64, 64)
    assert renet.forward_features(x)[0].shape == conv.forward_features(x)[0].shape == (1, 1, 32, 16 // spatial_patch, 16 // spatial_patch)


@pytest.mark.parametrize("spatial_patch", [1, 2])
def test_renet_sees_the_opposite_corner_and_the_conv_ablation_does_not(spatial_patch):
    """Which input pixels move the logits of the bottom-right 8x8 corner (untrained models, eval mode)."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 3, 64, 64) - 0.5
    for spatial, reaches in (("renet", True), ("conv", False)):
        config = SegmenterConfig(frame_size=64, frames_per_clip=1, temporal=False, spatial=spatial, spatial_patch=spatial_patch)
        model = Segmenter(config).eval()
        image = x.clone().requires_grad_(True)
        model(image)[0, 0, 0, -8:, -8:].sum().backward()
        influence = image.grad[0, 0].abs().sum(0)  # (3, H, W) -> (H, W)
        assert influence[-8:, -8:].max() > 0  # near the corner: both see it
        assert bool(influence[:8, :8].max() > 0) is reaches, spatial  # the opposite corner: ReNet only
        if not reaches:
            assert influence[:24, :24].max() == 0  # the conv stack's field ends well before the far half


def test_renet_norm_normalises_each_sweep_and_a_plain_layer_keeps_its_weights_layout():
    from rnnimg.nn import ReNet

    torch.manual_seed(0)
    plain, normed = ReNet(6, 4, patch_size=2), ReNet(6, 4, patch_size=2, norm=True)
    assert set(normed.state_dict()) - set(plain.state_dict()) == {"horizontal_norm.weight", "horizontal_norm.bias",
                                                                   "vertical_norm.weight", "vertical_norm.bias"}
    assert not any("norm" in k for k in plain.state_dict())  # the layout saved before the option existed
    rows = []
    normed.horizontal.register_forward_hook(lambda m, inputs, output: rows.append(output[0]))
    normed.vertical.register_forward_hook(lambda m, inputs, output: rows.append(output[0]))
    out = normed(torch.randn(2, 6, 8, 10))
    assert out.shape == (2, 8, 4, 5) and len(rows) == 2
    # The sweeps' raw states are small; what the next sweep and the next layer read has unit scale per position.
    assert all(r.std() < 0.5 for r in rows)
    torch.testing.assert_close(out.mean(1), torch.zeros(2, 4, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(2, 4, 5), atol=1e-3, rtol=0)


def test_tied_renet_shares_each_sweeps_weights_between_its_directions():
    """Tied: flipping the image upside down flips the output and swaps the column sweep's two directions
    (which an untied layer does not do), with half the recurrent parameters."""
    from rnnimg.nn import ReNet

    torch.manual_seed(0)
    tied, untied = ReNet(5, 4, patch_size=1, tied=True, norm=True).double(), ReNet(5, 4, patch_size=1, norm=True).double()
    assert 2 * sum(p.numel() for p in tied.horizontal.parameters()) == sum(p.numel() for p in untied.horizontal.parameters())
    assert not any("reverse" in k for k in tied.state_dict())
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)

    def swap(out):  # (B, 2D, H, W): the column sweep's forward states <-> its reverse ones
        return torch.cat([out[:, 4:], out[:, :4]], 1)

    torch.testing.assert_close(tied(x.flip(2)), swap(tied(x)).flip(2))
    assert not torch.allclose(untied(x.flip(2)), swap(untied(x)).flip(2))


def _far_corner_influence(config: SegmenterConfig, seed: int) -> float:
    """How much the bottom-right 8x8 logits move with the top-left 8x8 pixels, against the bottom-right pixels."""
    torch.manual_seed(seed)
    x = torch.rand(1, 1, 3, 64, 64) - 0.5
    model = Segmenter(config).eval()
    image = x.clone().requires_grad_(True)
    model(image)[0, 0, 0, -8:, -8:].sum().backward()
    influence = image.grad[0, 0].abs().sum(0)  # (3, H, W) -> (H, W)
    return float(influence[:8, :8].mean() / influence[-8:, -8:].mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_sweep_norms_make_the_far_corner_heard_at_initialisation(seed):
    """Untrained, what crosses the frame is ~1e-4 of the local signal without the norms (bench/RESULTS_segment.md);
    the norms lift it by more than 10x (measured ~50x); trained, the normed layer's later steps came sooner."""
    common = dict(frame_size=64, frames_per_clip=1, temporal=False, spatial="renet", spatial_patch=2)
    plain = _far_corner_influence(SegmenterConfig(**common, spatial_norm=False), seed)
    normed = _far_corner_influence(SegmenterConfig(**common, spatial_norm=True), seed)
    assert 0 < plain < 1e-3 and normed > 10 * plain


@pytest.mark.parametrize("fields,message", [
    (dict(spatial="renet"), "needs temporal=false"),
    (dict(temporal=False, spatial="attention"), "spatial must be one of"),
    (dict(temporal=False, spatial="renet", hidden=7), "hidden must be even"),
    (dict(temporal=False, spatial_layers=2), "spatial_layers applies to spatial='renet' or 'conv'"),
    (dict(temporal=False, spatial="conv", spatial_layers=0), "spatial_layers must be an integer >= 1"),
    (dict(mask_stride=4), "mask_stride must be one of"),
    (dict(temporal=False, spatial="renet", spatial_patch=3), "spatial_patch must be 1 or 2"),
    (dict(temporal=False, spatial_patch=2), "spatial_patch applies to spatial='renet' or 'conv'"),
    (dict(temporal=False, spatial="renet", spatial_norm=1), "spatial_norm must be true or false"),
    (dict(temporal=False, spatial="renet", spatial_tied="yes"), "spatial_tied must be true or false"),
])
def test_config_refuses_combinations_that_mean_nothing(fields, message):
    with pytest.raises(ValueError, match=message):
        SegmenterConfig(**fields)


# ----------------------------------------------------------------------------- configs saved before a field existed

# The config.json and the weights' layout of SegmenterConfig(frame_size=16, frames_per_clip=2, channels=(4, 8), hidden=4)
# as exported before mask_stride and spatial existed (recorded from that version: convolution and head weights).
FIRST_CONFIG = {"frame_size": 16, "frames_per_clip": 2, "clip_seconds": 2.0, "stride_seconds": 2.0, "channels": [4, 8],
                "rnn_type": "lstm", "hidden": 4, "kernel_size": 3, "temporal": True, "dice_weight": 0.5}
FIRST_LAYOUT = {
    "encoder.0.0.0.weight": (4, 3, 3, 3), "encoder.0.1.0.weight": (4, 4, 3, 3), "encoder.1.0.0.weight": (8, 4, 3, 3),
    "encoder.1.1.0.weight": (8, 8, 3, 3), "rnn.weight_x_l0": (16, 8, 3, 3), "rnn.weight_h_l0": (16, 4, 3, 3),
    "rnn.bias_x_l0": (16,), "rnn.bias_h_l0": (16,), "decoder.0.0.0.weight": (16, 8, 3, 3), "decoder.0.1.0.weight": (16, 16, 3, 3),
    "decoder.1.0.0.weight": (16, 19, 3, 3), "decoder.1.1.0.weight": (16, 16, 3, 3), "head.weight": (1, 16, 1, 1), "head.bias": (1,),
}
FIRST_STATE_KEYS = 54


def test_a_config_saved_before_the_new_fields_loads_the_architecture_it_was_saved_with(tmp_path):
    config = SegmenterConfig.from_dict(FIRST_CONFIG)
    assert (config.mask_stride, config.spatial, config.spatial_layers, config.spatial_patch) == (1, "none", 1, 1)
    state = Segmenter(config).state_dict()
    assert len(state) == FIRST_STATE_KEYS
    assert {k: tuple(state[k].shape) for k in FIRST_LAYOUT} == FIRST_LAYOUT

    # An exported folder of that time (config.json without the new fields) labels with its own weights.
    folder = str(tmp_path / "model")
    checkpoint.save(folder, state, "segment", FIRST_CONFIG)
    _, model, loaded, _ = tasks.load_model(folder)
    assert loaded == config
    x = torch.randn(1, 2, 3, 16, 16)
    reference = Segmenter(config).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_a_renet_config_saved_before_the_sweep_norms_and_tying_loads_the_plain_renet():
    saved = {k: v for k, v in asdict(SegmenterConfig(frames_per_clip=1, temporal=False, spatial="renet", spatial_patch=2)).items()
             if k not in ("spatial_norm", "spatial_tied")}
    config = SegmenterConfig.from_dict(saved)
    assert (config.spatial_norm, config.spatial_tied, config.spatial_patch) == (False, False, 2)
    keys = set(Segmenter(config).state_dict())
    assert not any("norm" in k for k in keys) and "rnn.0.horizontal.weight_ih_l0_reverse" in keys  # the layout of its time
    new = SegmenterConfig(frames_per_clip=1, temporal=False, spatial="renet")
    assert new.spatial_norm and new.spatial_tied  # new configs: the norms and tied sweeps


def test_overrides_and_configs_saved_now_get_todays_fields():
    assert SegmenterConfig.from_dict({"temporal": False}).mask_stride == 2  # a few overrides: today's defaults
    assert SegmenterConfig.from_dict({**FIRST_CONFIG, "mask_stride": 2}).mask_stride == 2
    for config in (SegmenterConfig(), SegmenterConfig(temporal=False, frames_per_clip=1, spatial="renet", spatial_layers=2)):
        assert SegmenterConfig.from_dict(asdict(config)) == config


# ----------------------------------------------------------------------------- still images


def _close_to(image: np.ndarray, colour: np.ndarray, tolerance: float = 15.0) -> np.ndarray:
    return (np.abs(image.astype(np.float32) - colour) <= tolerance).all(-1)


def _marker_square(size: int, corner: int, side: int = 8) -> np.ndarray:
    square = np.zeros((size, size), bool)
    top, left = (0 if corner < 2 else size - side), (0 if corner % 2 == 0 else size - side)
    square[top:top + side, left:left + side] = True
    return square


def _check_rule(image: np.ndarray, mask: np.ndarray) -> None:
    """The mask is exactly the pixels of the marker's colour outside the marker, the marker being the one
    corner square of a single palette colour; some other shape has another palette colour."""
    size = image.shape[0]
    markers = [(corner, colour) for corner in range(4) for colour in range(len(PALETTE))
               if _close_to(image, PALETTE[colour])[_marker_square(size, corner)].all()]
    assert len(markers) == 1, markers
    corner, colour = markers[0]
    marker_coloured = _close_to(image, PALETTE[colour]) & ~_marker_square(size, corner)
    np.testing.assert_array_equal(mask.astype(bool), marker_coloured)
    other = np.zeros(mask.shape, bool)
    for c in range(len(PALETTE)):
        if c != colour:
            other |= _close_to(image, PALETTE[c])
    assert mask.sum() >= 20 and other.sum() >= 20  # at least one matching and one non-matching shape


@pytest.mark.parametrize("seed", range(12))
def test_still_rule_the_mask_is_the_shapes_of_the_marker_colour(seed):
    still = render_still(np.random.default_rng(seed), 64, 4)
    assert still.image.shape == (64, 64, 3) and still.image.dtype == np.uint8 and still.mask.shape == (64, 64)
    assert still.marker_colour in still.shape_colours and any(c != still.marker_colour for c in still.shape_colours)
    _check_rule(still.image, still.mask)
    again = render_still(np.random.default_rng(seed), 64, 4)
    np.testing.assert_array_equal(again.image, still.image)


def test_png_decodes_with_pyav_to_the_rendered_pixels(tmp_path):
    image = render_still(np.random.default_rng(3)).image
    path = tmp_path / "still.png"
    path.write_bytes(encode_png(image))
    with VideoReader(str(path)) as reader:
        [(clip, frames)] = list(reader.clips(uniform_clips(reader.duration_s, ClipSpec(2.0, 1, 2.0))))
    np.testing.assert_array_equal(frames, image[None])


def test_still_archive_layout_masks_and_clip_stream(tmp_path):
    manifest = make_archive(str(tmp_path), SegmentSynthConfig(images=True, videos=4, unlabelled=1, seed=2), processes=1)
    table = pq.read_table(manifest).to_pydict()
    assert set(table) == {"video_uri", "mask_uri", "split"}
    assert table["split"] == ["train", "train", "val", "test", "unlabelled"] and table["mask_uri"][-1] is None
    base = manifest_folder(manifest)
    for video, mask, split in zip(table["video_uri"], table["mask_uri"], table["split"]):
        assert video.endswith(".png") and f"images/{split}/" in video
        if mask is None:
            continue
        masks, times = load_masks(absolute_uri(mask, base))
        assert masks.shape == (1, 64, 64) and masks.dtype == np.uint8 and times.tolist() == [0.0]
        with VideoReader(absolute_uri(video, base)) as reader:
            [(_, frames)] = list(reader.clips(uniform_clips(reader.duration_s, ClipSpec(2.0, 1, 2.0))))
        _check_rule(frames[0], masks[0])
        np.testing.assert_array_equal(masks_at(masks, times, [0.02], 64), masks)

    task = tasks.get("segment")
    config = SegmenterConfig(frames_per_clip=1, temporal=False, spatial="renet")
    rows = task.training_rows(manifest, "train", config)
    clips = list(iter_clips(rows, task, config, train=True, rng=np.random.default_rng(0)))
    assert len(clips) == 2 and all(f.shape == (1, 64, 64, 3) and t.shape == (1, 64, 64) for f, t in clips)


def test_still_config_refuses_a_bad_palette_or_marker():
    with pytest.raises(ValueError, match="palette must be between 2 and 6"):
        SegmentSynthConfig(images=True, palette=1)
    with pytest.raises(ValueError, match="marker must be between 2 and size / 4 = 16"):
        SegmentSynthConfig(images=True, marker=17)
