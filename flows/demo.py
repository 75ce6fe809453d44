"""The whole product on embedded defaults: synthetic archive -> train -> label -> accuracy -> review page.

    make demo            # or: python flows/demo.py --out demo-output [-v]

Runs the ``train-crnn`` and ``label-videos`` Prefect flows in this process (no Prefect server,
no credentials; Ray starts in-process), on a local folder by default or any ``s3://`` prefix.
Progress goes to stderr (a bar per phase on a terminal, else a line per epoch and per committed
shard); Ray's own output and Prefect's per-task lines only with ``-v``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def quiet_prefect() -> None:
    """Prefect's flow-run lines only: no per-task "Finished in state Completed()", no temporary-server notices.

    Set before Prefect is imported (it reads its logging settings then); the environment wins.
    """
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "INFO")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="where everything goes (folder or s3:// prefix)")
    parser.add_argument("--videos", type=int, default=1000, help="labelled synthetic videos (default 1000)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="also show Ray's own output and Prefect's per-task lines")
    args = parser.parse_args()

    from rnnimg.runtime import set_verbose

    set_verbose(args.verbose)
    if not args.verbose:
        quiet_prefect()
    # Imported now: Prefect reads its logging settings at import.
    from label_videos import LabelParams, label_videos
    from train_crnn import TrainParams, train_crnn

    from rnnimg import storage
    from rnnimg.report import build_report
    from rnnimg.synth import SynthConfig, make_archive

    started = time.perf_counter()
    archive = storage.join(args.out, "archive")
    manifest = storage.join(archive, "manifest.parquet")
    if not storage.exists(manifest):
        make_archive(archive, SynthConfig(videos=args.videos, unlabelled=4, seed=args.seed))
    # One video the decoder cannot read: it must come out as a failed row, not a crash.
    storage.write_bytes(storage.join(archive, "videos", "unlabelled", "broken.mp4"), b"this is not a video")
    print(f"[1/4] synthetic archive: {manifest}  ({time.perf_counter() - started:.0f} s)")

    trained = train_crnn(TrainParams(manifest=manifest, out=storage.join(args.out, "train"), epochs=args.epochs, workers=args.workers, name="demo"))
    print(f"[2/4] model: {trained['model']}  best val_acc={trained['best']['val_acc']:.3f}  ({time.perf_counter() - started:.0f} s)")

    labels_out = storage.join(args.out, "labels")
    to_label = [storage.join(archive, "videos", "test"), storage.join(archive, "videos", "unlabelled")]
    # full=True: label everything again, not only what is new since the last demo run.
    summary = label_videos(LabelParams(videos=to_label, model=trained["model"], out=labels_out, truth=manifest, full=True))
    print(f"[3/4] labels: {labels_out}  ({time.perf_counter() - started:.0f} s)")
    # The review page of the current labels: players, clickable label timelines, the review queue.
    report = build_report(labels_out, storage.join(args.out, "report"))
    print(f"[4/4] review page: {report.html}  ({time.perf_counter() - started:.0f} s)")

    print()
    print(f"archive   {archive}  (manifest {manifest})")
    print(f"model     {trained['model']}  (checkpoints {trained['run']})")
    run_out = summary["out"]
    print(f"tables    {storage.join(run_out, 'clips')}  {storage.join(run_out, 'segments')}  {storage.join(run_out, 'videos')}  {storage.join(run_out, 'run.json')}")
    print(f"videos    {summary['videos']}: {summary['ok']} ok, {summary['partial']} partial, {summary['failed']} failed; {summary['clips']} clips")
    print(f"test-split clip accuracy: {summary['test_clip_accuracy']:.3f} over {summary['test_clips']} clips")
    print(f"review queue: {report.low_confidence_clips} clips with score below {report.threshold:g}")
    print(f"total {time.perf_counter() - started:.0f} s")
    print()
    print(f"review page {report.html}")
    if storage.is_s3(report.html):
        local = os.path.basename(args.out.rstrip("/")) + "-report"
        print(f"  open it: aws s3 cp --recursive {report.out} {local} && xdg-open {local}/index.html")
    else:
        folder = os.path.dirname(os.path.abspath(report.html))
        print(f"  open it: xdg-open {os.path.abspath(report.html)}   (or any browser: file://{os.path.abspath(report.html)})")
        print(f"  over ssh: python -m http.server 8000 --directory {os.path.dirname(folder)}  then http://localhost:8000/{os.path.basename(folder)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
