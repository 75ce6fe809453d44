"""Clip embeddings (``rnnimg label --embeddings``): the recurrent state after a clip's last frame,
as a float16 column of the clips table, that finds clips like a given one."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from rnnimg import storage


def _fit_classifier(out: str, manifest: str, steps: int = 120, seed: int = 0) -> str:
    """A small CRNN fitted for a few seconds to the clips the label job will cut from ``manifest``'s labelled videos.

    It is fitted to the very clips it then embeds (their labels are what it learnt): the test is
    about what the label job writes, not about generalisation, which ``bench/embeddings.py``
    measures on held-out videos of a model trained the usual way.
    """
    import torch

    from rnnimg import checkpoint, tasks
    from rnnimg.manifest import read_manifest
    from rnnimg.models.layout import to_model_input
    from rnnimg.video.clips import ClipSpec, uniform_clips
    from rnnimg.video.decode import VideoReader

    torch.manual_seed(seed)
    job = tasks.get("classify")
    config = job.config_from_dict({"rnn_hidden": 32, "feature_dim": 64, "cnn_channels": [8, 16, 32, 32], "dropout": 0.0})
    spec = ClipSpec(config.clip_seconds, config.frames_per_clip, config.stride_seconds)
    clips, targets = [], []
    for row in read_manifest(manifest):
        if row.label:
            with VideoReader(row.video_uri, (config.frame_size, config.frame_size)) as reader:
                for _, frames in reader.clips(uniform_clips(reader.duration_s, spec)):
                    clips.append(frames)
                    targets.append(config.labels.index(row.label))
    clips, targets = np.stack(clips), torch.tensor(targets)
    model = job.build_model(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        pick = rng.choice(len(clips), min(16, len(clips)), replace=False)
        loss = job.loss(model(to_model_input(clips[pick])), targets[torch.from_numpy(pick)], config)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    checkpoint.save(out, model.state_dict(), job.name, job.config_to_dict(config), labels=job.labels(config))
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_embeddings_find_clips_of_the_same_label(ray_local, tiny_archive, tmp_path):
    from rnnimg.label import LabelConfig, label
    from rnnimg.manifest import read_manifest

    root, manifest = tiny_archive
    model = _fit_classifier(str(tmp_path / "model"), manifest)
    out = str(tmp_path / "labels")
    result = label(manifest, model, out, LabelConfig(videos_per_shard=4, embeddings=True))
    assert result.failed == 0

    table = pq.read_table(os.path.join(out, "clips"))
    field = table.schema.field("embedding")
    assert str(field.type) == "fixed_size_list<element: halffloat>[32]"
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)  # (clips, 32)
    assert vectors.shape == (table.num_rows, 32) and np.isfinite(vectors).all() and vectors.std() > 0

    # Each embedding is the model's recurrent state after the clip's last frame, to float16 precision.
    import torch

    from rnnimg.label import decode_video
    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks import load_model

    _, net, config, _ = load_model(model)
    first_uri = table["video_uri"][0].as_py()
    spec = {"clip_seconds": config.clip_seconds, "frames_per_clip": config.frames_per_clip, "stride_seconds": config.stride_seconds}
    batch = next(decode_video({"video_uri": np.array([first_uri], dtype=object), "shard": np.array([0])}, spec, config.frame_size, 8))
    with torch.inference_mode():
        expected = net.forward_features(to_model_input(batch["frames"][~batch["is_status"]]))[:, -1].numpy()
    stored = vectors[[i for i, u in enumerate(table["video_uri"].to_pylist()) if u == first_uri]]
    order = np.argsort([c for u, c in zip(table["video_uri"].to_pylist(), table["clip_index"].to_pylist()) if u == first_uri])
    np.testing.assert_allclose(stored[order], expected, rtol=2e-3, atol=2e-3)

    truth = {r.video_uri: r.label for r in read_manifest(manifest) if r.label}
    uris = table["video_uri"].to_pylist()
    labelled = [i for i, u in enumerate(uris) if u in truth]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    agree = 0
    for i in labelled:
        others = [j for j in labelled if uris[j] != uris[i]]  # not the other clip of the same video
        nearest = others[int(np.argmax(unit[others] @ unit[i]))]
        agree += truth[uris[nearest]] == truth[uris[i]]
    share = agree / len(labelled)
    assert len(labelled) >= 20 and share >= 0.9, f"nearest neighbour shares the label in {share:.2f} of {len(labelled)} clips"

    # The README's recipe: the clips most like a given one, in DuckDB.
    first = uris[labelled[0]]
    rows = duckdb.execute(
        f"""
        with q as (select embedding::float[32] as e from '{out}/clips/*.parquet' where video_uri = ? and clip_index = 0)
        select video_uri, clip_index, array_cosine_similarity(embedding::float[32], q.e) as similarity
        from '{out}/clips/*.parquet', q order by similarity desc limit 5
        """, [first]).fetchall()
    # The clip itself comes first, or ties with clips whose features are the same to float16 precision.
    assert rows[0][2] == pytest.approx(1.0, abs=1e-3)
    assert (first, 0) in [(r[0], r[1]) for r in rows] or all(r[2] == pytest.approx(1.0, abs=1e-3) for r in rows)
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)


@pytest.mark.ray
def test_embeddings_refused_for_a_task_without_them_and_kept_in_the_run_identity(ray_local, tiny_archive, untrained_model, tmp_path):
    from rnnimg.label import LabelConfig, LabelError, label
    from tests.media import export_untrained_model

    root, _ = tiny_archive
    videos = os.path.join(root, "videos", "unlabelled")
    segmenter = export_untrained_model(str(tmp_path / "seg"), task="segment", frame_size=32, frames_per_clip=4, channels=[8, 8], hidden=8)
    with pytest.raises(LabelError, match="task 'segment' writes no clip embeddings"):
        label(videos, segmenter, str(tmp_path / "x"), LabelConfig(embeddings=True))
    out = str(tmp_path / "plain")
    label(videos, untrained_model, out, LabelConfig())
    assert "embedding" not in pq.read_schema(next(f.uri for f in storage.list_files(os.path.join(out, "clips")))).names
    with pytest.raises(LabelError, match="embeddings False there, True now"):
        label(videos, untrained_model, out, LabelConfig(embeddings=True))
