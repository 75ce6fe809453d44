"""Training, whatever the task: the clip stream, the plain PyTorch loop, the thin Ray Train wrapper.

    rnnimg train OUT/manifest.parquet --out runs/ --epochs 12 --workers 2 --name demo
    rnnimg train s3://bucket/manifest.parquet --out s3://bucket/runs --workers 16 --gpu \
        --batch-size 32 --loader-workers 6 --cpus-per-worker 7 --lr-schedule cosine --warmup-epochs 1

The training path, in the file list:

    config.py        TrainConfig: optimisation and scale of a run
    data.py          manifest rows -> decoded clips -> batches (the clip stream)
    loop.py          train_one_epoch / evaluate / the optimiser and its schedule (plain PyTorch)
    ray_trainer.py   TorchTrainer, DDP, per-epoch checkpoints in the store, resume, export

The task (``rnnimg.tasks``) gives the rows, the model, the loss and the metrics; the exported
model is written by ``rnnimg.checkpoint``, which is all that inference reads.
"""

from rnnimg.train.config import TrainConfig
from rnnimg.train.ray_trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
