"""Labelling cost against archive size, and what the driver pays, measured side by side.

One run labels archives of 10^2, 10^3 and 10^4 one-second synthetic videos (copies of
``--distinct`` separately encoded 96x64 H.264 videos) with an untrained default classifier on a
local Ray, each job in a fresh driver process, twice: with this checkout's code and with the
code of ``--baseline-ref`` (a git worktree of that commit, put first on ``PYTHONPATH`` of the
driver and of the Ray workers it starts). For every job it records the wall time, the CPU of
the driver and of every process of the job (psutil over the process tree), and the driver's
peak RSS, and (this code) the CPU of the coordinator actors that run the pipeline. Printed:
per-video wall and CPU at 10^4 against 10^3 (target within 1.25x), the driver's peak RSS at
10^4 against 10^3 (target within 1.25x), the driver's CPU per clip of this code against the
baseline's (target 10x lower), what the coordinator pays instead, and the fixed start-up cost
(the intercept of a straight line through wall time against videos). The largest archive is
labelled once more with ``--coordinators`` pipelines (one replica each).

A second part simulates planning at internet scale without decoding: a synthetic listing of
``--simulate`` URIs goes through sharding and the driver's commit bookkeeping
(``rnnimg.label.commit_stream`` with synthetic records and a committer that writes nothing),
with the time and peak memory of each step.

    .venv/bin/python bench/label_scale.py                        # about 10 minutes on 2 cores
    .venv/bin/python bench/label_scale.py --sizes 100 1000 --simulate 100000

Results go to a section of ``bench/RESULTS.md`` (``--write``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from machine import cpu_model  # noqa: E402  (bench/machine.py)

RESULTS = HERE / "RESULTS.md"
SECTION = "## Labelling at scale: cost per video and the driver (issue 15, `bench/label_scale.py`)"


def make_archive(folder: Path, videos: int, distinct: int) -> Path:
    """``videos`` one-second 96x64 H.264 files, copies of ``distinct`` different encodes."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from tests.media import write_video

    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for k in range(distinct):
        path = folder.parent / f"source-{k:03d}.mp4"
        if not path.exists():
            rng = np.random.default_rng(k)
            base = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
            frames = np.stack([np.roll(base, 3 * t * (1 if k % 2 else -1), axis=1) for t in range(12)])
            write_video(str(path), frames, fps=12)
        sources.append(path)
    for i in range(videos):
        target = folder / f"v{i:06d}.mp4"
        if not target.exists():
            shutil.copyfile(sources[i % distinct], target)
    return folder


def child(folder: str, model: str, out: str, coordinators: str = "1") -> None:
    """Run in a fresh process: one label job; print "ready" once Ray is up, then its measurements as JSON.

    The driver's CPU is its own (every thread of it, ``getrusage``) from the call of ``label`` to its
    return; the CPU of the whole process tree is sampled by the parent (``run_job``), so that no
    sampler runs inside the driver it measures.
    """
    import rnnimg
    from rnnimg.label import LabelConfig, label
    from rnnimg.runtime import ensure_ray

    ensure_ray(None)
    print("ready", flush=True)
    wall = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF)
    k = int(coordinators)  # k > 1: this code's k pipelines, each with one replica
    result = label(folder, model, out, LabelConfig(actors=k, coordinators=k) if k > 1 else LabelConfig())
    after = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - wall
    print(json.dumps({
        "code": os.path.dirname(rnnimg.__file__), "videos": result.videos, "ok": result.ok, "clips": result.clips, "wall": wall,
        "driver_cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "driver_rss_mb": after.ru_maxrss / 1024,
        # Where the pipeline runs in coordinator actors (this code): their CPU, which the driver no longer pays.
        "coordinator_cpu": getattr(result, "coordinator_cpu_s", None),
    }), flush=True)


def run_job(folder: Path, model: str, out: Path, pythonpath: str | None, coordinators: int = 1) -> dict:
    """One label job in a fresh driver process; the CPU of its whole process tree sampled from here."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on the path for TreeCPU; nothing is started)
    from label_throughput import TreeCPU  # bench/label_throughput.py

    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(folder), model, str(out), str(coordinators)], env=env,
                                stdout=subprocess.PIPE,
                                stderr=errors, text=True, cwd=str(HERE))
        line = proc.stdout.readline()
        result = None
        if line.strip() == "ready":
            with TreeCPU(root=proc.pid) as cpu:  # from the call of label() to its measurements
                for line in proc.stdout:  # Ray's driver may print its raylets' messages on stdout first
                    if line.startswith("{"):
                        result = json.loads(line)
                        break
        proc.stdout.read()
        if proc.wait() or result is None:
            errors.seek(0)
            raise RuntimeError(f"label job failed ({proc.returncode}):\n{errors.read()[-3000:]}")
    return {**result, "cpu": cpu.seconds}


def baseline_tree(ref: str, where: Path) -> Path:
    """A worktree of ``ref`` (its ``rnnimg`` package is what the baseline jobs import)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref], check=True, capture_output=True)
    return where


def simulate(listed: int, per_shard: int) -> dict:
    """Listing, sharding and the driver's commit bookkeeping for ``listed`` URIs, no decoding."""
    import numpy as np

    from rnnimg import tasks
    from rnnimg.label import RECORD_COLUMNS, Tally, commit_stream  # Tally: progress that only counts, as a coordinator keeps it
    from rnnimg.manifest import VideoRow, shards

    steps = {}

    def step(name, fn):
        started = time.perf_counter()
        value = fn()
        steps[name] = {"seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        return value

    rows = step("listing", lambda: [VideoRow(video_uri=f"s3://archive/videos/{i // 1000:04d}/v{i:07d}.mp4", size=1000 + i, version=str(i))
                                    for i in range(listed)])
    all_shards = step("sharding", lambda: shards(rows, per_shard))

    def records():
        """What the workers send: per video a status row and one record of its single clip, shard after shard."""
        for index, shard in enumerate(all_shards):
            n = len(shard)
            uris = np.array([r.video_uri for r in shard], dtype=object)
            base = {"shard": np.full(n, index, np.int64), "video_uri": uris, "range_index": np.zeros(n, np.int64),
                    "ranges_total": np.ones(n, np.int64), "error_type": np.array([""] * n, dtype=object),
                    "error": np.array([""] * n, dtype=object), "duration_s": np.ones(n), "clips": np.ones(n, np.int64)}
            yield {**base, "is_status": np.ones(n, bool), "status": np.array(["ok"] * n, dtype=object),
                   "clip_indices": np.array([""] * n, dtype=object), "part": np.array([""] * n, dtype=object)}
            yield {**base, "is_status": np.zeros(n, bool), "status": np.array([""] * n, dtype=object),
                   "clip_indices": np.array(["[0]"] * n, dtype=object), "part": np.array([f"part-{index}"] * n, dtype=object)}

    assert set(RECORD_COLUMNS) == set(next(records()))

    class Lock:
        def check(self):
            pass

        def fence(self):
            return None

    committed = []
    step("commit bookkeeping", lambda: commit_stream(records(), "unused", {"run_id": "r", "model_id": "m"}, tasks.get("classify"),
                                                     all_shards, list(range(len(all_shards))), 0.0, Lock(),
                                                     submit=lambda *args: committed.append(args[1]), progress=Tally()))
    assert committed == list(range(len(all_shards)))
    return {"listed": listed, "shards": len(all_shards), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=4, metavar=("FOLDER", "MODEL", "OUT", "COORDINATORS"), help=argparse.SUPPRESS)
    parser.add_argument("--coordinators", type=int, default=2,
                        help="also label the largest archive with this many coordinators and replicas (default 2; 1: skip)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="archive sizes, videos (default 100 1000 10000)")
    parser.add_argument("--distinct", type=int, default=20, help="separately encoded videos the archive copies (default 20)")
    parser.add_argument("--baseline-ref", default="e9f44e6", help="git commit of the baseline: the driver-side commits (default e9f44e6)")
    parser.add_argument("--no-baseline", action="store_true", help="measure this checkout only")
    parser.add_argument("--simulate", type=int, default=1_000_000, help="listed URIs in the planning simulation (default 10^6; 0: skip)")
    parser.add_argument("--write", action="store_true", help="write the results into bench/RESULTS.md")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    sys.path.insert(0, str(ROOT))
    from tests.media import export_untrained_model

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(prefix="label-scale-") as tmp:
        tmp = Path(tmp)
        model = export_untrained_model(str(tmp / "model"))
        arms = {"this code": None}
        if not args.no_baseline:
            arms[f"baseline {args.baseline_ref}"] = str(baseline_tree(args.baseline_ref, tmp / "baseline"))
        results: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
        for size in sorted(args.sizes):
            folder = make_archive(tmp / "archives" / f"n{size}", size, args.distinct)
            for arm, path in arms.items():  # side by side: each size with each code before the next size
                result = run_job(folder, model, tmp / "out", path)
                results[arm][size] = result
                print(f"{arm:>22} {size:>6} videos: {result['wall']:7.1f} s wall, {result['cpu']:7.1f} CPU-s, driver "
                      f"{result['driver_cpu']:6.1f} CPU-s, {result['driver_rss_mb']:6.0f} MB peak ({result['code']})", flush=True)
        many = f"this code, {args.coordinators} coordinators"
        if args.coordinators > 1:  # the largest archive again, the pipeline split over k coordinators with a replica each
            size = max(args.sizes)
            results[many] = {size: run_job(tmp / "archives" / f"n{size}", model, tmp / "out", None, args.coordinators)}
            print(f"{many:>22} {size:>6} videos: {results[many][size]['wall']:7.1f} s wall", flush=True)
        if not args.no_baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "baseline")], capture_output=True)

        say(SECTION)
        say(f"Measured {datetime.date.today()} by `python bench/label_scale.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` on "
            f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}; a fresh driver process per job, local Ray, "
            f"untrained default classifier, 1-s 96x64 H.264 videos (one 2-s clip of 8 frames each), default `LabelConfig`.")
        say()
        say("| code | videos | wall s | wall ms/video | CPU-s | CPU ms/video | driver CPU-s | driver ms/clip | driver peak RSS MB | "
            "coordinator CPU-s | coordinator ms/clip |")
        say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for arm, by_size in results.items():
            for size, r in sorted(by_size.items()):
                coord = r.get("coordinator_cpu")
                say(f"| {arm} | {size} | {r['wall']:.1f} | {1000 * r['wall'] / size:.2f} | {r['cpu']:.1f} | {1000 * r['cpu'] / size:.2f} | "
                    f"{r['driver_cpu']:.2f} | {1000 * r['driver_cpu'] / max(r['clips'], 1):.3f} | {r['driver_rss_mb']:.0f} | "
                    + (f"{coord:.2f} | {1000 * coord / max(r['clips'], 1):.3f} |" if coord is not None else "- | - |"))
        ours = results["this code"]
        sizes = sorted(ours)
        say()
        if len(sizes) >= 2:
            small, large = sizes[-2], sizes[-1]
            wall_ratio = (ours[large]["wall"] / large) / (ours[small]["wall"] / small)
            cpu_ratio = (ours[large]["cpu"] / large) / (ours[small]["cpu"] / small)
            rss_ratio = ours[large]["driver_rss_mb"] / ours[small]["driver_rss_mb"]
            import numpy as np

            slope, intercept = np.polyfit(sizes, [ours[s]["wall"] for s in sizes], 1)
            say(f"- Per video at {large} against {small}: wall **{wall_ratio:.2f}x**, CPU **{cpu_ratio:.2f}x** (target <= 1.25x).")
            say(f"- Driver peak RSS at {large} against {small}: **{rss_ratio:.2f}x** (target <= 1.25x).")
            say(f"- Fixed start-up cost (intercept of wall = a + b x videos over {sizes}): **{intercept:.1f} s**; marginal "
                f"{1000 * slope:.2f} ms of wall per video.")
        if len(sizes) >= 2:
            # The driver's fixed cost (Ray start-up, the model's config, the listing's set-up) is
            # seconds; what grows with the archive is the marginal cost between the two largest sizes.
            small, large = sizes[-2], sizes[-1]

            def marginal(r: dict) -> float:
                return (r[large]["driver_cpu"] - r[small]["driver_cpu"]) / max(r[large]["clips"] - r[small]["clips"], 1)

            for arm in results:
                if arm.startswith("baseline"):
                    base, new = marginal(results[arm]), marginal(ours)
                    say(f"- Driver CPU per clip, marginal from {small} to {large} videos: {arm} {1000 * base:.3f} ms, this code "
                        f"{1000 * new:.3f} ms: **{base / new if new > 0 else float('inf'):.1f}x** lower (target >= 10x).")
                    say(f"- This code's driver CPU per clip at {large} videos, all of it (start-up included): "
                        f"{1000 * ours[large]['driver_cpu'] / ours[large]['clips']:.3f} ms against the baseline's "
                        f"{1000 * results[arm][large]['driver_cpu'] / results[arm][large]['clips']:.3f} ms: "
                        f"**{results[arm][large]['driver_cpu'] / max(ours[large]['driver_cpu'], 1e-9):.1f}x** lower.")
            if ours[large].get("coordinator_cpu") is not None:
                coord = (ours[large]["coordinator_cpu"] - ours[small]["coordinator_cpu"]) / max(ours[large]["clips"] - ours[small]["clips"], 1)
                say(f"- The pipeline's bookkeeping moved to the coordinator actor (one here, `LabelConfig.coordinators`): "
                    f"{1000 * coord:.3f} ms of its CPU per clip, marginal from {small} to {large} videos; with k coordinators each "
                    f"pays its share of the clips.")
            if many in results:
                r = results[many][large]
                say(f"- With {args.coordinators} coordinators (and as many replicas) at {large} videos: wall {r['wall']:.1f} s, driver "
                    f"{r['driver_cpu']:.2f} CPU-s, the coordinators {r['coordinator_cpu']:.2f} CPU-s together "
                    f"({1000 * r['coordinator_cpu'] / args.coordinators / r['clips']:.3f} ms per clip each, on average).")
        if args.simulate:
            sim = simulate(args.simulate, 32)
            say()
            say(f"Planning simulated for {sim['listed']:,} listed URIs ({sim['shards']:,} shards of 32; no decoding, records as the "
                f"workers send them, a committer that writes nothing), in this process (the listing and sharding are the driver's; "
                f"the commit bookkeeping is a coordinator's, each of k coordinators doing 1/k of it):")
            say()
            say("| step | seconds | process peak RSS after, MB |")
            say("|---|---:|---:|")
            for name, step in sim["steps"].items():
                say(f"| {name} | {step['seconds']} | {step['peak_rss_mb']} |")
    if args.write:
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        body = "\n".join(lines) + "\n"
        if SECTION in text:
            start = text.index(SECTION)
            end = text.find("\n## ", start + len(SECTION))
            text = text[:start] + body + (text[end + 1:] if end != -1 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + body
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
