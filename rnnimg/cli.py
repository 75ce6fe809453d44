"""The ``rnnimg`` command.

    rnnimg synth OUT [--videos N] [--seed S]
    rnnimg train MANIFEST --out OUT [--epochs E] [--workers W] [--name RUN]
    rnnimg label VIDEOS [VIDEOS ...] --model MODEL --out OUT
    rnnimg report LABELS --out REPORT
    rnnimg generate MODEL (--from VIDEO --seconds S | --label L --seed N) --out OUT.mp4

Every location takes a local path or ``s3://bucket/prefix`` (endpoint from AWS_ENDPOINT_URL,
credentials from the standard AWS chain). Bad arguments and missing inputs end with one line
on stderr and exit status 2; nothing is printed as a traceback.

stdout gets the command's JSON summary; stderr its progress (``rnnimg.progress``): a bar on a
terminal, else one line per epoch (train) or per committed shard (label). Ray's own logs,
warnings and progress bars stay in its log files unless ``-v`` (``rnnimg -v train ...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points to --help."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _model_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> ``(key, value)``, VALUE as JSON when it parses (``3``, ``false``, ``[16, 32]``), else the text."""
    import json

    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a model config field, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    from rnnimg.tasks import names

    task_names = names()
    parser = _Parser(
        prog="rnnimg",
        description="Train recurrent video models (CRNN) with Ray Train and label video archives with Ray Data. "
        "Locations are local paths or s3://bucket/prefix.",
    )
    verbose_help = ("also show Ray's own logs, warnings and progress bars, and rnnimg's INFO lines; progress is then "
                    "plain lines (default: Ray's output stays in its log files, errors are always shown)")
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("synth", help="make a labelled synthetic motion archive (H.264 videos + manifest)",
                       description="Write OUT/videos/<split>/*.mp4 and OUT/manifest.parquet (video_uri, label, split). "
                       "Each video shows a disc moving left or right over a drifting, cluttered background.")
    p.add_argument("out", metavar="OUT", help="where the archive and its manifest go (folder or s3:// prefix)")
    p.add_argument("--task", choices=task_names, default="classify", help="the task the archive is for (default classify)")
    p.add_argument("--videos", type=_positive_int, default=240, help="labelled videos, split 70/15/15 into train/val/test (default 240)")
    p.add_argument("--unlabelled", type=_non_negative_int, default=4, help="extra videos without a label, split 'unlabelled' (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same archive (default 0)")
    p.add_argument("--seconds", type=_positive_float, default=4.0, help="length of each video in seconds (default 4)")
    p.add_argument("--fps", type=_positive_int, default=12, help="frame rate of the videos (default 12)")
    p.add_argument("--images", action="store_true",
                   help="still images (PNG) instead of videos, for a task that has such an archive (segment: the ReNet task)")

    p = sub.add_parser("train", help="train a CRNN with Ray Train and export the best model",
                       description="Train on the manifest's 'train' split, validate on 'val' every epoch, checkpoint to "
                       "OUT/ray/RUN every epoch and export the best model to OUT/model (model.safetensors, config.json, "
                       "labels.json, metrics.json) with its evaluation report (report.md, confusion.png, curves.png). "
                       "Each worker reads its own shard of the manifest and decodes clips on the fly. A failed worker is "
                       "replaced and the run goes on from the last checkpoint; rerunning with the same --out and --name "
                       "resumes at the next epoch. GPUs are used when the Ray cluster has them (--cpu/--gpu force it).")
    p.add_argument("manifest", metavar="MANIFEST", help="manifest table (.parquet/.csv) with video_uri, label, split")
    p.add_argument("--task", choices=task_names, default="classify", help="what the model learns to predict (default classify)")
    p.add_argument("--out", required=True, help="where checkpoints and the exported model go (folder or s3:// prefix)")
    p.add_argument("--epochs", type=_positive_int, default=12, help="passes over the training videos (default 12)")
    p.add_argument("--workers", type=_positive_int, default=2, help="Ray Train workers, DDP (default 2)")
    p.add_argument("--name", default="crnn", help="run name; the same name resumes (default crnn)")
    p.add_argument("--wait", action="store_true",
                   help="if another run of this --out and --name is training, wait for it to finish instead of failing at once")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="clips per step per worker (default 16)")
    p.add_argument("--lr", type=_positive_float, default=3e-3, help="peak AdamW learning rate (default 0.003)")
    p.add_argument("--lr-schedule", choices=("cosine", "step", "constant"), default="cosine",
                   help="after warmup: cosine to 5%% of --lr, step (x0.1 at 50%% and 75%% of the run), or constant (default cosine)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear learning-rate warmup in epochs, fractions allowed, 0 for none (default: 5%% of the run)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--clips-per-video", type=_positive_int, default=1, help="random clips per training video per epoch (default 1)")
    p.add_argument("--augment", action="store_true",
                   help="jitter training clips: colour channels, brightness, contrast, a small shift; never a flip or time reversal "
                   "(default: clips as decoded)")
    # Model options default to None: only those given reach the task's model config, whose own
    # defaults apply otherwise (the defaults named below are the classifier's).
    p.add_argument("--rnn", choices=("lstm", "gru"), default=None, help="recurrent layer type (default lstm)")
    p.add_argument("--rnn-impl", choices=("torch", "reference"), default=None,
                   help="classify: torch: torch.nn kernels; reference: rnnimg.nn cells written from the equations (default torch)")
    p.add_argument("--rnn-hidden", type=_positive_int, default=None, help="classify: hidden size of the recurrent layer (default 128)")
    p.add_argument("--backbone", choices=("small", "resnet18", "resnet34", "resnet50"), default=None,
                   help="classify: per-frame CNN: the small built-in one, or a torchvision ResNet (needs torchvision) (default small)")
    p.add_argument("--backbone-weights", default=None,
                   help="classify: initial backbone weights: a .safetensors or weights-only torch state dict file or store URL "
                   "(default: random init; nothing is downloaded)")
    p.add_argument("--frame-size", type=_positive_int, default=None, help="frames are resized to this many pixels square (default 64)")
    p.add_argument("--frames-per-clip", type=_positive_int, default=None, help="frames sampled per clip (default: the task's; classify 8)")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE", type=_model_option,
                   help="any field of the task's model config, repeatable; VALUE is read as JSON when it parses, else as text "
                   "(e.g. segment's ReNet still-image model: --model-option spatial=renet --model-option temporal=false "
                   "--frames-per-clip 1)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", action="store_true", help="train on GPUs (fails on a local Ray without one)")
    device.add_argument("--cpu", action="store_true", help="train on CPUs even where the cluster has GPUs")
    p.add_argument("--gpus-per-worker", type=_positive_float, default=1.0,
                   help="GPUs each worker reserves on GPU; below 1 packs workers onto a GPU (default 1)")
    p.add_argument("--cpus-per-worker", type=_positive_float, default=None,
                   help="CPUs each worker reserves (default: 1 + --loader-workers)")
    p.add_argument("--loader-workers", type=_non_negative_int, default=0,
                   help="decoding processes per worker (torch DataLoader); 0 decodes in the training process (default 0)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast or fp32; auto: bf16 on GPU, fp32 on CPU (default auto)")
    p.add_argument("--placement", choices=("pack", "spread"), default="pack",
                   help="where the workers go on a multi-node cluster: pack (as few nodes as fit) or spread (over the nodes) (default pack)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker failures recovered from the last checkpoint before the run fails, -1 for no limit (default 2)")
    p.add_argument("--keep-checkpoints", type=_positive_int, default=2, help="best checkpoints kept, by validation accuracy (default 2)")
    p.add_argument("--shuffle-frames", action="store_true",
                   help="ablation: shuffle the frame order inside every clip (the model should then fall to chance)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")

    p = sub.add_parser("label", help="label videos with a trained model into Parquet tables (Ray Data)",
                       description="Decode clips with PyAV in Ray tasks, run the model in a Ray actor pool and write "
                       "OUT/clips (one row per clip) and OUT/videos (one row per video: ok/partial/failed). "
                       "Rerunning the same command resumes: committed shards are skipped.")
    p.add_argument("videos", metavar="VIDEOS", nargs="+",
                   help="one or more: a folder or prefix of videos, one video, or a manifest table (.parquet/.csv)")
    p.add_argument("--model", required=True, help="exported model folder (OUT/model of `rnnimg train`)")
    p.add_argument("--out", required=True, help="where the tables go (folder or s3:// prefix)")
    p.add_argument("--split", action="append", dest="splits", metavar="SPLIT",
                   help="with a manifest: label only rows of this split (repeatable)")
    p.add_argument("--run-id", default=None, help="name of the run (default: new, or the one already in --out)")
    p.add_argument("--allow-prefix", action="append", dest="allow_prefixes", metavar="PREFIX", default=None,
                   help="a location a manifest may also name (repeatable); by default an s3:// manifest may name only "
                   "videos of its own bucket, the others become failed rows with error_type 'refused'")
    p.add_argument("--extensions", default=None, metavar="EXT[,EXT...]",
                   help="file extensions that are videos in a folder listing, e.g. .mp4,.mkv (default: every extension "
                   "the installed FFmpeg demuxes as video); files skipped are counted in the summary")
    p.add_argument("--stride-seconds", type=_positive_float, default=None, help="distance between clip starts (default: the model's)")
    p.add_argument("--videos-per-shard", type=_positive_int, default=32, help="videos committed together, the unit of resume (default 32)")
    p.add_argument("--range-seconds", type=_positive_float, default=600.0,
                   help="seconds of video per decode task: a longer video is split into ranges decoded in parallel, shorter ones are packed together (default 600)")
    p.add_argument("--min-segment-seconds", type=float, default=0.0,
                   help="segments shorter than this are absorbed by a neighbouring segment (default 0: no smoothing)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="clips per model call (default 32)")
    p.add_argument("--actors", type=_positive_int, default=1, help="model replicas in the actor pool (default 1)")
    p.add_argument("--coordinators", type=_positive_int, default=1,
                   help="pipelines, each run by its own Ray actor for a share of the shards and of the replicas (at most --actors; "
                        "default 1). The driver only waits: on a large cluster several coordinators spread the bookkeeping")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="model precision: bf16 (autocast on GPU; on CPU the weights in bf16, fast where the CPU has "
                        "AVX512-BF16 or AMX) or fp32; auto: bf16 on GPU, fp32 on CPU, as in training (default auto)")
    p.add_argument("--embeddings", action="store_true",
                   help="also write each clip's recurrent features (float16, the state after its last frame) as an 'embedding' "
                   "column of the clips table (classify)")
    p.add_argument("--truth", default=None, help="manifest with true labels: print the clip accuracy on its test split")
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")

    p = sub.add_parser("report", help="summarise label tables with Dask: per label (or mask area), per video, review queue, HTML",
                       description="Read LABELS (the --out of `rnnimg label`, or the base folder of the label-videos flow) "
                       "partition by partition with Dask; the report follows the model's task. Classification: "
                       "REPORT/labels.parquet (per label: clips, duration, videos), REPORT/videos/ (per video: dominant label "
                       "and its share), REPORT/review/ (clips scoring below --threshold). Segmentation (masks): REPORT/videos/ "
                       "(per video: frames, mean and max mask area), REPORT/areas.parquet (area histogram), mask overlays on "
                       "decoded frames and the area timeline. Both: REPORT/summary.json and REPORT/index.html (plots embedded).")
    p.add_argument("labels", metavar="LABELS", help="label tables: a labelling output or a label-videos base (folder or s3:// prefix)")
    p.add_argument("--out", required=True, help="where the report goes (folder or s3:// prefix)")
    p.add_argument("--threshold", type=_positive_float, default=0.6, help="clips scoring below this go to the review queue (default 0.6)")
    p.add_argument("--timeline-videos", type=_non_negative_int, default=20,
                   help="videos drawn in the label timeline, the first by URI (default 20)")
    p.add_argument("--model-id", default=None, help="with a label-videos base: the model to report (default: the latest run's)")
    p.add_argument("--overlay-videos", type=_non_negative_int, default=4,
                   help="segmentation: videos drawn with their masks over decoded frames, the first by URI (default 4)")

    p = sub.add_parser("generate", help="roll a next-frame model (task predict) forward into an H.264 video",
                       description="With --from: the model reads the video's first frames and predicts the rest up to --seconds; "
                       "OUT shows the truth (left) and the frames read then predicted (right). With --label: a conditioned "
                       "model generates a clip of that class from the first frames of a fresh moving-digits sequence drawn "
                       "from --seed.")
    p.add_argument("model", metavar="MODEL", help="exported model folder of task predict (OUT/model of `rnnimg train --task predict`)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="video", metavar="VIDEO", help="the video to start from (local path or s3:// URL)")
    source.add_argument("--label", default=None, help="class to generate, with a conditioned model (e.g. up-left)")
    p.add_argument("--seconds", type=_positive_float, default=4.0, help="with --from: seconds of video to show, read and predicted (default 4)")
    p.add_argument("--seed", type=int, default=0, help="with --label: draws the first frame's digits and places (default 0)")
    p.add_argument("--out", required=True, help="the video to write (.mp4; local path or s3:// URL)")
    for command in sub.choices.values():  # -v after the command too: `rnnimg train -v ...`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    return parser


def _run(args) -> dict:
    if args.command == "synth":
        from rnnimg.tasks import get, names

        task = get(args.task)
        options = {"seconds": args.seconds, "fps": args.fps}
        if args.images:
            if "images" not in task.synth_options:
                raise ValueError(f"task {args.task!r} has no still-image archive (--images is for: "
                                 f"{', '.join(n for n in names() if 'images' in get(n).synth_options) or 'no task'})")
            options = {"images": True}
        manifest = task.synth(args.out, args.videos, args.unlabelled, args.seed, **options)
        return {"manifest": manifest, "videos": args.videos + args.unlabelled, "task": args.task}

    if args.command == "train":
        from rnnimg.tasks import get
        from rnnimg.train import TrainConfig, train

        flags = {"rnn_type": args.rnn, "rnn_impl": args.rnn_impl, "rnn_hidden": args.rnn_hidden, "backbone": args.backbone,
                 "backbone_weights": args.backbone_weights, "frame_size": args.frame_size, "frames_per_clip": args.frames_per_clip}
        overrides = {k: v for k, v in flags.items() if v is not None}
        overrides.update(dict(args.model_option))
        model_config = get(args.task).model_config(args.manifest, **overrides)
        train_config = TrainConfig(
            epochs=args.epochs, workers=args.workers, batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule,
            warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, clips_per_video=args.clips_per_video,
            augment=args.augment, use_gpu=True if args.gpu else False if args.cpu else None,
            gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker, loader_workers=args.loader_workers,
            precision=args.precision, max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints, seed=args.seed,
            shuffle_frames=args.shuffle_frames, placement=args.placement.upper(),
        )
        result = train(args.manifest, args.out, args.name, train_config, model_config, ray_address=args.ray_address, task=args.task,
                       wait=args.wait)
        print(result.report_markdown, file=sys.stderr)
        scalars = {k: v for k, v in result.evaluation.items() if isinstance(v, (int, float, str))}
        return {"task": result.task, "model": result.model_uri, "run": result.run_uri, "report": result.report_uri,
                "best": result.metrics, "evaluation": scalars}

    if args.command == "label":
        from rnnimg.label import LabelConfig, clip_accuracy, label

        config = LabelConfig(videos_per_shard=args.videos_per_shard, batch_size=args.batch_size, actors=args.actors,
                             coordinators=args.coordinators, stride_seconds=args.stride_seconds, range_seconds=args.range_seconds,
                             min_segment_seconds=args.min_segment_seconds, precision=args.precision, embeddings=args.embeddings)
        extensions = [e.strip() for e in args.extensions.split(",") if e.strip()] if args.extensions else None
        result = label(args.videos, args.model, args.out, config, splits=args.splits, run_id=args.run_id, ray_address=args.ray_address,
                       allow_prefixes=args.allow_prefixes, extensions=extensions)
        summary = result.summary()
        if args.truth:
            accuracy, clips = clip_accuracy(args.out, args.truth)
            summary["test_clip_accuracy"], summary["test_clips"] = accuracy, clips
        return summary

    if args.command == "report":
        from rnnimg.report import ReportConfig, build_report

        config = ReportConfig(threshold=args.threshold, timeline_videos=args.timeline_videos, overlay_videos=args.overlay_videos)
        return build_report(args.labels, args.out, config, model_id=args.model_id).summary()

    if args.command == "generate":
        from rnnimg.generate import from_label, from_video

        if args.video:
            return from_video(args.model, args.video, args.seconds, args.out)
        return from_label(args.model, args.label, args.seed, args.out)
    raise AssertionError(args.command)


def configure_output(verbose: bool) -> None:
    """rnnimg's log level, and how much of Ray's own output is shown (``rnnimg.runtime.set_verbose``), before Ray starts."""
    from rnnimg.runtime import set_verbose

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    set_verbose(verbose)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_output(args.verbose)
    from rnnimg.label import LabelError
    from rnnimg.manifest import ManifestError
    from rnnimg.runtime import ClusterUnreachable
    from rnnimg.storage import StorageError
    from rnnimg.store_lock import LockHeld, LockLost

    ray_before = _ray_running()
    try:
        summary = _run(args)
    except (ValueError, FileNotFoundError, LabelError, ManifestError, StorageError, ClusterUnreachable, PermissionError, LockHeld,
            LockLost) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"rnnimg {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    if not ray_before and _ray_running():
        # Ray's log thread prints worker and raylet lines on stdout (a node lost mid-run, a retried task) until
        # Ray stops; stopped first, the JSON summary is the last thing on stdout, for `| jq` and scripts.
        import ray

        ray.shutdown()
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _ray_running() -> bool:
    """Whether this process is connected to Ray (without importing it when no command has)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


if __name__ == "__main__":
    sys.exit(main())
