"""Task ``classify``: one class per clip, from the order of its frames (CRNN: per-frame CNN -> LSTM/GRU).

    rnnimg synth OUT --task classify
    rnnimg train OUT/manifest.parquet --out runs --task classify
    rnnimg label OUT/videos/test --model runs/model --out labels     # the model says it classifies

- Data: ``rnnimg.synth``, a disc moving left or right over a drifting background; the class
  is the direction, so no single frame and no shuffled order of frames carries it.
- Model: ``rnnimg.models.crnn.CRNN`` (clip logits from the last step, frame logits from every step).
- Sample: a random clip window of a labelled video; its target is the video's class id.
- Loss: clip cross-entropy + a per-frame cross-entropy ramped from 0 at the first frame.
- Metrics: loss, clip accuracy, confusion matrix; the exported checkpoint is the best val_acc.
- Label job: ``label`` and ``score`` per clip; tables ``clips`` and ``segments`` (``rnnimg.tables``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rnnimg import tables
from rnnimg.tasks import Task

if TYPE_CHECKING:
    import torch

    from rnnimg.models.crnn import CRNNConfig


def loss_fn(clip_logits: "torch.Tensor", frame_logits: "torch.Tensor", labels: "torch.Tensor", frame_weight: float) -> "torch.Tensor":
    """Clip cross-entropy plus the per-frame head's cross-entropy against the clip's label.

    The per-frame head at step t answers "what is happening so far". Its loss is weighted by
    t / (T - 1): zero at the first frame, where only memorising the video could answer, full
    at the last. Without the ramp the first-frame loss rewards recognising training videos by
    their background instead of learning the motion.
    """
    import torch
    import torch.nn.functional as F

    clip_logits, frame_logits = clip_logits.float(), frame_logits.float()
    b, t, k = frame_logits.shape
    per_frame = F.cross_entropy(
        frame_logits.reshape(b * t, k), labels[:, None].expand(b, t).reshape(-1), reduction="none"
    ).reshape(b, t)  # (B*T,) -> (B, T)
    ramp = torch.linspace(0.0, 1.0, t, device=frame_logits.device) if t > 1 else torch.ones(1, device=frame_logits.device)
    frame_loss = (per_frame * ramp).sum(1).mean() / ramp.sum()
    return F.cross_entropy(clip_logits, labels) + frame_weight * frame_loss


def augment_clip(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Label-preserving augmentation of one uint8 (T, H, W, C) clip, the same for every frame.

    Colour channels permuted, brightness and contrast jittered, a small translation. No flip
    and no time reversal: both turn a motion into another class.
    """
    t, h, w, c = frames.shape
    x = frames[..., rng.permutation(c)].astype(np.float32)
    x = (x - 128.0) * rng.uniform(0.7, 1.3) + 128.0 + rng.uniform(-25, 25)
    # Shift every frame alike, repeating the edge: wrapping around would make an object that
    # leaves one side re-enter at the other, which reads as motion the other way.
    dy, dx = (int(v) for v in rng.integers(-(h // 10), h // 10 + 1, 2))
    x = np.pad(x, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    x = x[:, abs(dy) + dy : abs(dy) + dy + h, abs(dx) + dx : abs(dx) + dx + w]  # back to (T, H, W, C)
    return np.clip(x, 0, 255).astype(np.uint8)


class ClassifyTask(Task):
    name = "classify"
    description = "one class per clip (CRNN: per-frame CNN -> LSTM/GRU)"
    selection_metric = "val_acc"
    selection_mode = "max"

    # ------------------------------------------------------------------ data and model

    def synth(self, out: str, videos: int, unlabelled: int, seed: int, **options) -> str:
        from rnnimg.synth import SynthConfig, make_archive

        return make_archive(out, SynthConfig(videos=videos, unlabelled=unlabelled, seed=seed, **options))

    def model_config(self, manifest_uri: str, **overrides) -> "CRNNConfig":
        from rnnimg.manifest import manifest_overview

        labels, _ = manifest_overview(manifest_uri)
        if len(labels) < 2 and "labels" not in overrides:
            raise ValueError(f"manifest {manifest_uri} needs labelled train/val rows of at least 2 classes, found {list(labels)}")
        return self.config_from_dict({"labels": labels, **overrides})

    def config_from_dict(self, data: dict) -> "CRNNConfig":
        from rnnimg.models.crnn import CRNNConfig

        return CRNNConfig.from_dict(data)

    def config_to_dict(self, config: "CRNNConfig") -> dict:
        from dataclasses import asdict

        return asdict(config)

    def labels(self, config: "CRNNConfig") -> tuple[str, ...]:
        return tuple(config.labels)

    def build_model(self, config: "CRNNConfig"):
        from rnnimg.models.crnn import CRNN

        return CRNN(config)

    def prepare_training(self, model, config: "CRNNConfig") -> None:
        from rnnimg.models.crnn import load_backbone_weights

        if config.backbone_weights:
            load_backbone_weights(model, config.backbone_weights)

    def check_training(self, manifest_uri: str, config: "CRNNConfig") -> None:
        from rnnimg import storage
        from rnnimg.manifest import manifest_overview
        from rnnimg.models.crnn import TORCHVISION_BACKBONES, import_torchvision

        names, counts = manifest_overview(manifest_uri)
        unknown = set(names) - set(config.labels)
        if unknown:
            raise ValueError(f"manifest labels {sorted(unknown)} are not among the model's labels {list(config.labels)}")
        if not counts.get("train") or not counts.get("val"):
            raise ValueError(f"manifest {manifest_uri} needs labelled rows with split 'train' and 'val' "
                             f"(found {counts.get('train', 0)} train, {counts.get('val', 0)} val)")
        if config.backbone in TORCHVISION_BACKBONES:
            import_torchvision(config.backbone)  # fail here, in one line, not in every worker
        if config.backbone_weights and not storage.exists(config.backbone_weights):
            raise FileNotFoundError(f"no backbone weights file at {config.backbone_weights}")

    # ------------------------------------------------------------------ training

    def training_rows(self, manifest_uri: str, split: str, config: "CRNNConfig", *, rank: int = 0, world: int = 1,
                      pad: bool = False) -> list[tuple[str, int]]:
        from rnnimg.manifest import labelled_videos

        return labelled_videos(manifest_uri, split, config.labels, rank=rank, world=world, pad=pad)

    def augment(self, frames: np.ndarray, target: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        return augment_clip(frames, rng), target

    def blank_target(self, config: "CRNNConfig") -> int:
        return 0  # class id 0: any class will do, the filler's loss is multiplied by 0

    def loss(self, outputs, targets, config: "CRNNConfig"):
        clip_logits, frame_logits = outputs
        return loss_fn(clip_logits, frame_logits, targets, config.frame_loss_weight)

    def batch_stats(self, outputs, targets, config: "CRNNConfig", loss=None) -> dict:
        import torch
        import torch.nn.functional as F

        clip_logits = outputs[0].float()
        k = config.num_classes
        if loss is None:
            loss_sum = F.cross_entropy(clip_logits, targets, reduction="sum").double()
        else:
            loss_sum = loss.detach().double() * len(targets)
        confusion = torch.bincount(targets * k + clip_logits.argmax(1), minlength=k * k).reshape(k, k)  # (K*K,) -> (K, K)
        return {"loss_sum": loss_sum, "count": torch.tensor(len(targets), device=targets.device), "confusion": confusion}

    def summarize(self, stats: dict) -> dict:
        count = max(int(stats["count"]), 1)
        confusion = stats["confusion"]
        return {"loss": float(stats["loss_sum"]) / count, "acc": float(confusion.diag().sum()) / count,
                "clips": int(stats["count"]), "confusion": confusion.tolist()}

    def evaluation(self, best_entry: dict, config: "CRNNConfig") -> dict:
        from rnnimg.evaluation import classification_summary

        return classification_summary(best_entry["val_confusion"], config.labels)

    def write_report(self, model_uri: str, evaluation: dict, history: list, best_metrics: dict, config: "CRNNConfig", model_id: str, *,
                     manifest_uri: str | None = None):
        from rnnimg.evaluation import write_report

        return write_report(model_uri, evaluation, history, best_metrics, config.labels, model_id=model_id)

    # ------------------------------------------------------------------ labelling

    def clip_columns(self) -> dict[str, tuple[str, object]]:
        return {"label": ("object", ""), "score": ("float32", 0.0)}

    embedding_table = "clips"

    def embedding_size(self, config: "CRNNConfig") -> int:
        return config.rnn_hidden

    def predict(self, model, inputs, config: "CRNNConfig", embeddings: bool = False) -> dict[str, np.ndarray]:
        import torch

        sequence = model.forward_features(inputs)  # (B, T, R): the recurrent layer's output at every step
        clip_logits, _ = model.forward_head(sequence)
        probs = torch.softmax(clip_logits.float(), dim=1)
        score, index = probs.max(dim=1)
        labels = np.array(config.labels, dtype=object)
        out = {"label": labels[index.cpu().numpy()], "score": score.cpu().numpy().astype(np.float32)}
        if embeddings:
            # The clip's embedding: the recurrent state after its last frame, what the clip head reads.
            out["embedding"] = sequence[:, -1].float().cpu().numpy().astype(np.float16)  # (B, T, R) -> (B, R)
        return out

    def tables(self) -> dict:
        return {"clips": tables.CLIPS, "segments": tables.SEGMENTS}

    def shard_rows(self, clips: list[dict], run: dict, min_segment_seconds: float) -> dict[str, list[dict]]:
        from rnnimg.segments import merge_segments

        segments = []
        by_video: dict[str, list[dict]] = {}
        for row in clips:
            by_video.setdefault(row["video_uri"], []).append(row)
        for uri, rows in by_video.items():
            for segment in merge_segments(rows, min_segment_seconds):
                segments.append({"video_uri": uri, **segment, "model_id": run["model_id"], "run_id": run["run_id"]})
        return {"clips": clips, "segments": segments}
