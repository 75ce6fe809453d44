"""Optimisation and scale of one training run, whatever the task. Saved next to every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from rnnimg.models.precision import check_precision

LR_SCHEDULES = ("cosine", "step", "constant")
PLACEMENTS = ("PACK", "SPREAD")  # Ray placement-group strategies for the training workers


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and scale of one training run. Saved next to every checkpoint."""

    epochs: int = 12  # passes over the training videos
    batch_size: int = 16  # clips per optimiser step, per worker
    lr: float = 3e-3  # peak AdamW learning rate
    lr_schedule: str = "cosine"  # after warmup: "cosine" (to 5% of lr), "step" (x0.1 at 50% and 75% of the run), "constant"
    warmup_epochs: float | None = None  # linear warmup, in epochs (fractions allowed, 0 = none); None: the first 5% of the run
    weight_decay: float = 0.05  # AdamW weight decay
    clips_per_video: int = 1  # random clips decoded from each training video per epoch
    augment: bool = False  # label-preserving jitter of training clips (colour, brightness, shift; never flip or time reversal)
    workers: int = 2  # Ray Train workers (processes, DDP)
    use_gpu: bool | None = None  # True: one GPU share per worker; False: CPU; None: GPUs if the Ray cluster has any
    gpus_per_worker: float = 1.0  # GPUs each worker reserves when on GPU (a fraction packs several workers on one GPU)
    cpus_per_worker: float | None = None  # CPUs each worker reserves; None: 1 + loader_workers
    loader_workers: int = 0  # decoding processes per worker (torch DataLoader); 0 decodes in the training process
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 on GPU, fp32 on CPU
    seed: int = 0  # seeds model init and clip sampling
    shuffle_frames: bool = False  # ablation: shuffle frame order inside every clip (kills temporal order)
    keep_checkpoints: int = 2  # best-k checkpoints kept by validation accuracy
    max_failures: int = 2  # worker failures recovered from the last checkpoint before the run fails (-1: no limit)
    placement: str = "PACK"  # where the workers go: "PACK" (as few nodes as fit) or "SPREAD" (over the nodes, best effort)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "clips_per_video", "workers", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        check_precision(self.precision)
        if self.use_gpu not in (True, False, None):
            raise ValueError(f"use_gpu must be True, False or None (auto), got {self.use_gpu!r}")
        if not self.gpus_per_worker > 0:
            raise ValueError(f"gpus_per_worker must be > 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0 (or None for 1 + loader_workers), got {self.cpus_per_worker}")
        if not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise ValueError(f"loader_workers must be an integer >= 0, got {self.loader_workers!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ValueError(f"max_failures must be an integer >= -1 (-1: no limit), got {self.max_failures!r}")

    @property
    def worker_cpus(self) -> float:
        """CPUs each Ray Train worker reserves."""
        return self.cpus_per_worker if self.cpus_per_worker is not None else 1.0 + self.loader_workers
