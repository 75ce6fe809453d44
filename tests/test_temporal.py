"""The recurrent layer does the work: frame order carries the class, and only the order.

The same CRNN, trained and evaluated on the synthetic motion task with plain PyTorch
(``train_one_epoch`` / ``evaluate``), learns it from ordered clips and stays near chance
(at most 1/K + 0.15) when the frames of every clip are shuffled.
"""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from rnnimg.manifest import labelled_rows, read_manifest
from rnnimg.models.crnn import CRNN, CRNNConfig
from rnnimg.synth import SynthConfig, make_archive
from rnnimg.tasks import get as get_task
from rnnimg.train.config import TrainConfig
from rnnimg.train.data import iter_batches, iter_clips
from rnnimg.train.loop import evaluate, make_optimizer, train_one_epoch

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def motion_archive(tmp_path_factory):
    return make_archive(str(tmp_path_factory.mktemp("motion")), SynthConfig(videos=400, unlabelled=0, seed=11))


def fit_and_score(manifest: str, shuffle_frames: bool, epochs: int = 6) -> float:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = read_manifest(manifest)
    config = CRNNConfig()
    train_config = TrainConfig(epochs=epochs, clips_per_video=2, shuffle_frames=shuffle_frames)
    task = get_task("classify")
    train_rows = labelled_rows(rows, "train", config.labels) + labelled_rows(rows, "val", config.labels)
    test_rows = labelled_rows(rows, "test", config.labels)
    model = CRNN(config)
    steps = int(np.ceil(len(train_rows) * train_config.clips_per_video / train_config.batch_size))
    optimizer, scheduler = make_optimizer(model, train_config, steps * epochs)
    for epoch in range(epochs):
        rng = np.random.default_rng([0, epoch])
        clips = iter_clips(train_rows, task, config, train=True, rng=rng, clips_per_video=2, shuffle_frames=shuffle_frames, augment=True)
        train_one_epoch(model, optimizer, iter_batches(clips, 16, shuffle_buffer=64, rng=rng), "cpu", task, config, scheduler)
    clips = iter_clips(test_rows, task, config, train=False, rng=np.random.default_rng(1), shuffle_frames=shuffle_frames)
    return task.summarize(evaluate(model, iter_batches(clips, 32), "cpu", task, config))["acc"]


def test_ordered_frames_learn_the_motion_and_shuffled_frames_stay_at_chance(motion_archive):
    # The two trainings are independent: one process each, one core each.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        ordered_run = pool.submit(fit_and_score, motion_archive, False)
        shuffled_run = pool.submit(fit_and_score, motion_archive, True)
        ordered, shuffled = ordered_run.result(), shuffled_run.result()
    chance_bound = 1 / 2 + 0.15
    print(f"test clip accuracy: ordered {ordered:.3f}, frame-shuffled {shuffled:.3f} (bound {chance_bound:.2f})")
    assert ordered >= 0.85
    assert shuffled <= chance_bound
