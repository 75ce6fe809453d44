"""Labelling throughput against its decode ceiling, and labelling memory on a long video.

On generated H.264 archives (320x240 and 640x360, a keyframe every 30 or 250 frames, 30 fps,
``--videos`` videos of ``--seconds`` each per configuration, the model's plan of 2-second
clips of 8 frames every 2 s), one run measures and prints:

* (a) **ceiling**: ``VideoReader.clips`` decoding exactly the frames the plan needs, one
  process (as one Ray decode task runs it); also without non-reference frame skipping
  (``skip_nonref=False``), to show what skipping buys;
* (b) **label job**: ``rnnimg.label.label`` with an untrained default CRNN on the local Ray
  (decode + model + Parquet): the CPU time of the driver and every Ray process (sampled with
  psutil, split into decode / model / driver / Ray), and the wall time;
* (c) **naive**: decode every frame, convert every frame to RGB, then pick the planned ones;

(a), (c) and a decode-all reference run in one process on the ``--distinct`` separately
encoded videos of each configuration (the copies decode identically); (b) runs on all of them.
The ratios are per CPU-second, with and without a job's fixed cost (model actor start-up,
listing, commits), and also per wall-clock second of (b) on the whole machine against one
process.
* **memory**: peak RSS (``ru_maxrss``) of the decode + model path (``decode_video`` feeding a
  ``Predictor``, no Ray) on one 60-minute 640x360 video and on a 1-minute one, each in a fresh
  subprocess (the long video is a 1-minute encode repeated by remuxing, so it takes seconds to make);
* **conversion**: per kept frame, swscale (one reformatter per video, as the reader does) against
  OpenCV on the YUV planes (``cv2.resize`` + ``cvtColor``), when OpenCV is importable;
* **deblocking**: what skipping H.264's loop filter would save, and how far the frames move.

Frame rates count planned frames (clips x frames per clip). Targets: (b) >= 0.7 x (a) and
(b) >= 2 x (c); memory ratio <= 1.25. Results go to a section of ``bench/RESULTS_label.md``.

    .venv/bin/python bench/label_throughput.py                 # everything (about 3 minutes on 2 cores)
    .venv/bin/python bench/label_throughput.py --videos 4 --seconds 20 --long-minutes 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402  (bench/machine.py)

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "RESULTS_label.md"
SECTION_START = "<!-- label_throughput:start -->"
SECTION_END = "<!-- label_throughput:end -->"
SIZES = ((240, 320), (360, 640))  # (height, width)
GOPS = (30, 250)
FPS = 30


# ----------------------------------------------------------------------------- media


def _frames(count: int, height: int, width: int, seed: int, moving: bool = True):
    """Synthetic camera-like content: a textured background panning, a moving block, sensor noise."""
    import cv2

    rng = np.random.default_rng(seed)
    pan = 2 if moving else 0
    background = cv2.GaussianBlur(rng.integers(0, 256, (height + 32, width + pan * count + 32, 3), dtype=np.uint8), (0, 0), 1.5)
    noise = [rng.integers(0, 12, (height, width, 3), dtype=np.uint8) for _ in range(8)] if moving else None
    for i in range(count):
        dy = 16 + int(12 * np.sin(i / 20)) if moving else 16
        frame = background[dy : dy + height, pan * i : pan * i + width].copy()
        x = int((width - 48) * (0.5 + 0.5 * np.sin(i / 15 + seed)))
        y = int((height - 48) * (0.5 + 0.5 * np.cos(i / 23 + seed)))
        frame[y : y + 48, x : x + 48] = (220, 40, 40)
        if noise is not None:
            cv2.add(frame, noise[i % len(noise)], dst=frame)
        yield frame


def encode(path: str, seconds: float, height: int, width: int, gop: int, seed: int = 0, preset: str = "veryfast",
           crf: int = 18, moving: bool = True) -> str:
    """H.264 (libx264, B-frames as the preset sets them) in MP4, a keyframe every ``gop`` frames."""
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.options = {"preset": preset, "crf": str(crf), "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
                          "threads": "1"}
        for array in _frames(int(seconds * FPS), height, width, seed, moving):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def repeat_remux(src: str, dst: str, times: int) -> str:
    """``src`` played ``times`` times in a row, by copying its packets with shifted timestamps."""
    import av

    with av.open(src) as source:
        in_stream = source.streams.video[0]
        packets = [p for p in source.demux(in_stream) if p.size]
        span = max(p.pts + (p.duration or 0) for p in packets) - min(p.pts for p in packets)
        with av.open(dst, mode="w") as out:
            out_stream = out.add_stream_from_template(in_stream)
            for k in range(times):
                for p in packets:
                    copy = av.Packet(bytes(p))
                    copy.pts, copy.dts, copy.duration = p.pts + k * span, p.dts + k * span, p.duration
                    copy.time_base = in_stream.time_base
                    copy.is_keyframe = p.is_keyframe
                    copy.stream = out_stream
                    out.mux(copy)
    return dst


def _encode_job(job):
    return encode(*job)


def make_archives(root: str, videos: int, seconds: float, workers: int, distinct: int) -> dict[tuple, str]:
    """One folder per (size, gop) configuration of ``videos`` files, of which ``distinct`` are
    separate encodes (in ``workers`` processes) and the rest copies of them (to save time)."""
    folders, jobs = {}, []
    for height, width in SIZES:
        for gop in GOPS:
            folder = os.path.join(root, f"{width}x{height}-gop{gop}")
            os.makedirs(folder)
            folders[(height, width, gop)] = folder
            jobs += [(os.path.join(folder, f"v{k:02d}.mp4"), seconds, height, width, gop, k) for k in range(min(distinct, videos))]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_encode_job, jobs))
    for folder in folders.values():
        for k in range(distinct, videos):
            shutil.copyfile(os.path.join(folder, f"v{k % distinct:02d}.mp4"), os.path.join(folder, f"v{k:02d}.mp4"))
    return folders


# ----------------------------------------------------------------------------- measurements


def _plan(duration_s: float, spec):
    from rnnimg.video.clips import uniform_clips

    return uniform_clips(duration_s, spec)


def ceiling(paths: list[str], spec, frame_size: int, skip_nonref: bool) -> dict:
    """(a): VideoReader.clips over every video, one process."""
    from rnnimg.video.decode import VideoReader

    frames = decoded = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        with VideoReader(path, (frame_size, frame_size)) as reader:
            for _, clip_frames in reader.clips(_plan(reader.duration_s, spec), skip_nonref=skip_nonref):
                frames += len(clip_frames)
            decoded += reader.frames_decoded
    return {"frames": frames, "decoded": decoded, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def decode_all(paths: list[str]) -> dict:
    """Every frame decoded, none converted: what decoding alone costs (the floor of (a) when most
    frames are references)."""
    import av

    decoded = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            decoded += sum(1 for _ in container.decode(stream))
    return {"decoded": decoded, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def naive(paths: list[str], spec) -> dict:
    """(c): every frame decoded and converted to RGB (native size), then the planned ones picked by time."""
    import av

    frames = decoded = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            duration = float(stream.duration * stream.time_base)
            wanted = sorted(t for clip in _plan(duration, spec) for t in clip.timestamps)
            w, prev = 0, None
            for frame in container.decode(stream):
                rgb, t = frame.to_ndarray(format="rgb24"), float(frame.pts * stream.time_base)
                decoded += 1
                while prev is not None and w < len(wanted) and wanted[w] < t:
                    frames, w = frames + 1, w + 1  # prev (already RGB) is the frame shown at wanted[w]
                prev = rgb
            frames += len(wanted) - w
    return {"frames": frames, "decoded": decoded, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


class TreeCPU:
    """CPU seconds used by a process (this one, or ``root``) and all its descendants (Ray's raylet,
    workers, ...) while running.

    Samples every ``interval_s`` so that processes which exit during the run are counted up to
    their last sample. ``by_role`` splits the total by what each process was doing. The sampler is
    a thread of the process that makes it: to measure a driver's own CPU without the sampler's
    (psutil walking the tree costs ~2% of a core), sample it from another process with ``root``.
    """

    def __init__(self, interval_s: float = 0.2, root: int | None = None):
        import psutil  # Ray vendors it (ray/thirdparty_files), importable once ray is imported

        self._psutil = psutil
        self._root = os.getpid() if root is None else root
        self._interval = interval_s
        self._base: dict = {}
        self._last: dict = {}
        self._names: dict = {}
        self._stop = threading.Event()

    def _sample(self) -> dict:
        me = self._psutil.Process(self._root)
        seen = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                key = (proc.pid, proc.create_time())
                seen[key] = times.user + times.system
                name = " ".join(proc.cmdline())
                if (name.startswith("ray::") and "IDLE" not in name) or key not in self._names:
                    self._names[key] = name  # an idle worker keeps the name of what it ran
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                continue
        return seen

    def __enter__(self) -> "TreeCPU":
        self._base = self._sample()
        self._last = dict(self._base)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._last.update(self._sample())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())

    @property
    def seconds(self) -> float:
        return sum(v - self._base.get(k, 0.0) for k, v in self._last.items())

    def by_role(self) -> dict[str, float]:
        """CPU seconds of: decode (probe + decode tasks), model (Predictor actors), driver, ray (the rest)."""
        roles = {"decode": 0.0, "model": 0.0, "driver": 0.0, "ray": 0.0}
        for key, value in self._last.items():
            name = self._names.get(key, "")
            if key[0] == self._root:
                role = "driver"
            elif "Predictor" in name:
                role = "model"
            elif "decode_pack" in name or "plan_videos" in name or name.startswith("ray::IDLE"):
                role = "decode"
            else:
                role = "ray"
            roles[role] += value - self._base.get(key, 0.0)
        return roles


def label_job(folder: str, model: str, out: str, config) -> dict:
    """(b): the whole labelling job on the running local Ray."""
    from rnnimg.label import label

    with TreeCPU() as cpu:
        wall = time.perf_counter()
        result = label(folder, model, out, config)
        wall = time.perf_counter() - wall
    return {"clips": result.clips, "ok": result.ok, "videos": result.videos, "wall": wall, "cpu": cpu.seconds, "roles": cpu.by_role()}


def memory_child(video: str, model: str) -> None:
    """Run in a subprocess: decode_video + Predictor over one whole video; print peak RSS (JSON)."""
    from rnnimg.label import Predictor, decode_video
    from rnnimg.video.clips import ClipSpec

    predictor = Predictor(model, threads=1)
    config = predictor.config
    spec = ClipSpec(config.clip_seconds, config.frames_per_clip, config.stride_seconds)
    batch = {"video_uri": np.array([video], dtype=object), "shard": np.array([0])}
    clips, status, started = 0, None, time.perf_counter()
    for out in decode_video(batch, spec.to_dict(), config.frame_size, 32):
        predicted = predictor(out)
        clips += int((~out["is_status"]).sum())
        for j in np.flatnonzero(out["is_status"]):
            status = str(predicted["status"][j])
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mb": peak_kb / 1024, "clips": clips, "status": status, "seconds": time.perf_counter() - started}))


def memory(video: str, model: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", video, model], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def conversion(path: str, frame_size: int) -> list[tuple[str, float, float]]:
    """Per kept frame: (method, microseconds per frame, max abs difference to swscale bilinear)."""
    import av

    frames = []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % 7 == 0:
                frames.append(frame)
            if len(frames) == 60:
                break
    reformatter = av.video.reformatter.VideoReformatter()

    def swscale(frame):
        return reformatter.reformat(frame, width=frame_size, height=frame_size, format="rgb24").to_ndarray()

    methods = [("swscale bilinear, one reformatter per video (the reader)", swscale),
               ("swscale bilinear, frame.to_ndarray(width=, height=)",
                lambda f: f.to_ndarray(format="rgb24", width=frame_size, height=frame_size))]
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        cv2.setNumThreads(1)

        def planes_to_rgb(frame, interpolation):
            h, w, size = frame.height, frame.width, frame_size
            parts = []
            for k, (ph, pw) in enumerate([(h, w), ((h + 1) // 2, (w + 1) // 2), ((h + 1) // 2, (w + 1) // 2)]):
                plane = np.frombuffer(frame.planes[k], np.uint8).reshape(ph, frame.planes[k].line_size)[:, :pw]
                target = (size, size) if k == 0 else (size // 2, size // 2)
                parts.append(cv2.resize(plane, target, interpolation=interpolation).reshape(-1))
            return cv2.cvtColor(np.concatenate(parts).reshape(size * 3 // 2, size), cv2.COLOR_YUV2RGB_I420)

        methods += [("OpenCV planes: resize INTER_LINEAR + cvtColor", lambda f: planes_to_rgb(f, cv2.INTER_LINEAR)),
                    ("OpenCV planes: resize INTER_AREA + cvtColor", lambda f: planes_to_rgb(f, cv2.INTER_AREA))]
    reference = [swscale(f) for f in frames]
    rows = []
    for name, fn in methods:
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            out = [fn(f) for f in frames]
            best = min(best, (time.process_time() - start) / len(frames))
        diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(out, reference))
        rows.append((name, best * 1e6, diff))
    return rows


def deblocking(path: str, frame_size: int) -> dict:
    """What skipping H.264's deblocking filter would buy, and cost: every frame decoded with and
    without ``skip_loop_filter=all`` (best of 3 CPU times), and the difference of every 7th frame
    at the model's input size. The reader does not skip it; this measures why."""
    import av

    def run(options: dict) -> tuple[float, list[np.ndarray]]:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            stream.codec_context.options = options
            kept, start = [], time.process_time()
            for i, frame in enumerate(container.decode(stream)):
                if i % 7 == 0:
                    kept.append(frame.to_ndarray(format="rgb24", width=frame_size, height=frame_size).astype(np.int16))
            return time.process_time() - start, kept

    exact = min((run({}) for _ in range(3)), key=lambda r: r[0])
    fast = min((run({"skip_loop_filter": "all"}) for _ in range(3)), key=lambda r: r[0])
    diffs = [np.abs(a - b) for a, b in zip(exact[1], fast[1])]
    return {"speedup": exact[0] / fast[0], "mean_diff": float(np.mean([d.mean() for d in diffs])), "max_diff": int(max(d.max() for d in diffs))}


# ----------------------------------------------------------------------------- report




def versions() -> str:
    import av
    import ray
    import torch

    ffmpeg = ".".join(str(v) for v in av.library_versions.get("libavcodec", ()))
    return f"Python {platform.python_version()}, PyAV {av.__version__} (libavcodec {ffmpeg}), Ray {ray.__version__}, torch {torch.__version__}, numpy {np.__version__}"


def write_section(text: str) -> None:
    """Replace this script's section of RESULTS_label.md (other sections are kept)."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Labelling throughput and memory\n\n"
    block = f"{SECTION_START}\n{text.rstrip()}\n{SECTION_END}\n"
    if SECTION_START in old and SECTION_END in old:
        head, rest = old.split(SECTION_START, 1)
        new = head + block + rest.split(SECTION_END, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=32, help="videos per configuration for (b), the label job (default 32)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each video (default 30)")
    parser.add_argument("--distinct", type=int, default=4,
                        help="separately encoded videos per configuration; the rest are copies. (a), (c) and decode-all run on these (default 4)")
    parser.add_argument("--long-minutes", type=int, default=60, help="length of the long video of the memory test (default 60)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not update {RESULTS.name}")
    parser.add_argument("--memory-child", nargs=2, metavar=("VIDEO", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from rnnimg.label import LabelConfig
    from rnnimg.models.crnn import CRNNConfig
    from rnnimg.video.clips import ClipSpec
    from tests.media import export_untrained_model

    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="rnnimg-bench-label-")
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    try:
        model = export_untrained_model(os.path.join(work, "model"))
        config = CRNNConfig()
        spec = ClipSpec(config.clip_seconds, config.frames_per_clip, config.stride_seconds)
        print(f"generating {len(SIZES) * len(GOPS)} x {args.videos} videos of {args.seconds:g} s ...", flush=True)
        t = time.perf_counter()
        folders = make_archives(os.path.join(work, "archives"), args.videos, args.seconds, max(1, args.cpus), args.distinct)
        generated_s = time.perf_counter() - t
        bitrates = {key: 8 * sum(os.path.getsize(os.path.join(f, n)) for n in os.listdir(f)) / (args.videos * args.seconds) / 1e6
                    for key, f in folders.items()}

        print("measuring (a) ceiling, (c) naive, decode-all ...", flush=True)
        decode_rows = {}
        for key, folder in folders.items():
            paths = sorted(os.path.join(folder, n) for n in os.listdir(folder))
            # The one-process measurements run on the separately encoded videos: the copies
            # decode identically, and every rate below is per frame or per CPU-second.
            distinct = paths[: max(1, min(args.distinct, len(paths)))]
            decode_rows[key] = {
                "a": ceiling(distinct, spec, config.frame_size, skip_nonref=True),
                "a_noskip": ceiling(distinct, spec, config.frame_size, skip_nonref=False),
                "c": naive(distinct, spec),
                "d": decode_all(distinct),
            }

        print("measuring (b) label job on local Ray ...", flush=True)
        ray.init(num_cpus=args.cpus, log_to_driver=False, include_dashboard=False)
        label_config = LabelConfig()
        # Warm-up: Ray Data's first job starts workers and imports in them. Then the fixed cost of
        # a job (model actor start-up and load, listing, commits): the best of two jobs on one
        # 2-second video.
        tiny = os.path.join(work, "tiny")
        os.makedirs(tiny)
        encode(os.path.join(tiny, "tiny.mp4"), 2.0, 240, 320, 30, preset="ultrafast")
        label_job(tiny, model, os.path.join(work, "labels-warm"), label_config)
        fixed = min((label_job(tiny, model, os.path.join(work, f"labels-tiny-{k}"), label_config) for k in range(2)), key=lambda r: r["wall"])
        job_rows = {key: label_job(folder, model, os.path.join(work, f"labels-{i}"), label_config)
                    for i, (key, folder) in enumerate(folders.items())}
        ray.shutdown()

        print(f"measuring memory: {args.long_minutes}-minute and 1-minute 640x360 videos ...", flush=True)
        minute = encode(os.path.join(work, "minute.mp4"), 60.0, 360, 640, 250, seed=1, preset="ultrafast", crf=30, moving=False)
        long_video = repeat_remux(minute, os.path.join(work, "long.mp4"), args.long_minutes)
        mem_short, mem_long = memory(minute, model), memory(long_video, model)

        first_640 = next(os.path.join(folders[(360, 640, 250)], n) for n in sorted(os.listdir(folders[(360, 640, 250)])))
        conv = conversion(first_640, config.frame_size)
        deblock = deblocking(first_640, config.frame_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    say(f"## Labelling throughput: {cpu_model()}, {os.cpu_count()} cores")
    say()
    say(f"- date: {now}; load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)")
    say(f"- {versions()}")
    say(f"- archives: per configuration {args.videos} H.264 MP4 videos ({args.distinct} encoded separately, the rest copies of them) x "
        f"{args.seconds:g} s at {FPS} fps, libx264 veryfast (3 B-frames), crf 18, fixed GOP; generated in {generated_s:.0f} s")
    say(f"- plan: {spec.frames_per_clip} frames per {spec.clip_seconds:g}-second clip every {spec.stride_seconds:g} s, "
        f"frames resized to {config.frame_size}x{config.frame_size}; the untrained default CRNN")
    say(f"- (a), (c), decode-all: one process, one decoder thread, on the {args.distinct} separately encoded videos of each configuration")
    say(f"- (b): `rnnimg.label.label` with `{label_config}` on a local Ray of {args.cpus} CPUs over all {args.videos} videos, after one "
        "warm-up job; its CPU time is the driver's plus every Ray process's (psutil, sampled every 0.2 s)")
    say(f"- fixed cost of a job (the best of two jobs on one 2-second video: model actor start-up and load, listing, commits): "
        f"{fixed['wall']:.1f} s wall, {fixed['cpu']:.1f} CPU-s; \"steady\" = the job without it")
    say()
    say("Rates, in planned frames (clips x frames per clip) per CPU-second, and per wall-clock second where marked:")
    say()
    say("| config | Mbit/s | (a) decoded / planned | (a) ceiling | (a) no skip | decode-all, no RGB (frames) | (c) naive | "
        "(b) job | (b) steady | (b) job, wall | (b) video s / CPU-s | (b) CPU-s: decode / model / driver / Ray | skip gain | (a) CPU / decode-all CPU |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    per_cpu = {"job / (a)": [], "steady / (a)": [], "job / (c)": [], "steady / (c)": []}
    wall = {"job / (a)": [], "job / (c)": []}
    ratio_rows = []
    for key in folders:
        height, width, gop = key
        (a, a0, c, d), b = (decode_rows[key][k] for k in ("a", "a_noskip", "c", "d")), job_rows[key]
        planned = b["clips"] * spec.frames_per_clip
        a_rate, a0_rate, c_rate = a["frames"] / a["cpu"], a0["frames"] / a0["cpu"], c["frames"] / c["cpu"]
        job_rate = planned / b["cpu"]
        steady_rate = planned / (b["cpu"] - fixed["cpu"]) if b["cpu"] > 1.25 * fixed["cpu"] else float("nan")
        job_wall = planned / b["wall"]
        row = {"job / (a)": job_rate / a_rate, "steady / (a)": steady_rate / a_rate, "job / (c)": job_rate / c_rate, "steady / (c)": steady_rate / c_rate}
        wall_row = {"job / (a)": job_wall / (a["frames"] / a["wall"]), "job / (c)": job_wall / (c["frames"] / c["wall"])}
        for name, value in row.items():
            if not np.isnan(value):
                per_cpu[name].append(value)
        for name, value in wall_row.items():
            wall[name].append(value)
        roles = b["roles"]
        say(f"| {width}x{height} GOP {gop} | {bitrates[key]:.2f} | {a['decoded']}/{a['frames']} | {a_rate:,.0f} | {a0_rate:,.0f} | "
            f"{d['decoded'] / d['cpu']:,.0f} | {c_rate:,.0f} | {job_rate:,.0f} | {steady_rate:,.0f} | {job_wall:,.0f} | "
            f"{args.videos * args.seconds / b['cpu']:.1f} | {roles['decode']:.1f} / {roles['model']:.1f} / {roles['driver']:.1f} / {roles['ray']:.1f} | "
            f"{a_rate / a0_rate:.2f} | {a['cpu'] / d['cpu']:.2f} |")
        ratio_rows.append((f"{width}x{height} GOP {gop}", row, wall_row, a_rate / c_rate))
    say()
    say("Ratios (targets: (b) >= 0.7 x (a), (b) >= 2 x (c)):")
    say()
    say("| config | per CPU-s: (b) job / (a) | (b) steady / (a) | (b) job / (c) | (b) steady / (c) | (a) / (c): the bound on (b) / (c) | "
        f"wall clock, (b) on {args.cpus} CPUs vs one process: (b) / (a) | (b) / (c) |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row, wall_row, bound in ratio_rows:
        say(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row.values()) + f" | {bound:.2f} | {wall_row['job / (a)']:.2f} | {wall_row['job / (c)']:.2f} |")
    say()
    for name, target in (("job / (a)", 0.7), ("steady / (a)", 0.7), ("job / (c)", 2.0), ("steady / (c)", 2.0)):
        if per_cpu[name]:
            say(f"- per CPU-second, (b) {name}: min {min(per_cpu[name]):.2f}, median {statistics.median(per_cpu[name]):.2f} (target >= {target:g})")
        else:
            say(f"- per CPU-second, (b) {name}: n/a (every job was within 25% of the fixed cost; use more or longer videos)")
    for name, target in (("job / (a)", 0.7), ("job / (c)", 2.0)):
        say(f"- wall clock, (b) on {args.cpus} CPUs / one process, {name}: min {min(wall[name]):.2f}, median {statistics.median(wall[name]):.2f} (target >= {target:g})")
    say("- skip gain: (a) with non-reference frame skipping / without it, per CPU-second (> 1: skipping helps)")
    say("- (a) CPU / decode-all CPU: the reader's CPU time against decoding every frame without converting any; near 1 means "
        "the plan needs (nearly) every reference frame decoded, so no reader can beat (c) by much more than (c)'s RGB conversion of "
        "every frame: (a) / (c) bounds (b) / (c) per CPU-second")
    busiest = max(load_at_start, load[0])
    if busiest > (os.cpu_count() or 1):
        say(f"- **the machine was busy** (load up to {busiest:.1f} on {os.cpu_count()} cores): wall-clock rates are unreliable; "
            "the per-CPU-second rates are less affected")
    say()
    ratio = mem_long["peak_rss_mb"] / mem_short["peak_rss_mb"]
    say(f"Memory, decode + model path (`decode_video` -> `Predictor`, one process, no Ray), 640x360 {FPS} fps GOP 250:")
    say()
    say("| video | clips | status | seconds | peak RSS MiB |")
    say("|---|---:|---|---:|---:|")
    say(f"| 1 minute | {mem_short['clips']} | {mem_short['status']} | {mem_short['seconds']:.1f} | {mem_short['peak_rss_mb']:.0f} |")
    say(f"| {args.long_minutes} minutes | {mem_long['clips']} | {mem_long['status']} | {mem_long['seconds']:.1f} | {mem_long['peak_rss_mb']:.0f} |")
    say()
    say(f"- peak RSS ratio {args.long_minutes} min / 1 min: {ratio:.2f} (target <= 1.25)")
    say()
    say(f"Conversion of one kept frame (640x360 -> {config.frame_size}x{config.frame_size} RGB), CPU microseconds, best of 3 over 60 frames:")
    say()
    say("| method | us / frame | max abs diff to the reader's output |")
    say("|---|---:|---:|")
    for name, micros, diff in conv:
        say(f"| {name} | {micros:.0f} | {diff} |")
    say()
    say(f"Skipping the deblocking filter (`skip_loop_filter=all`, not used by the reader), one 640x360 GOP 250 video, every frame: "
        f"{deblock['speedup']:.2f}x less decode CPU; frames at {config.frame_size}x{config.frame_size} differ from the exact ones by "
        f"{deblock['mean_diff']:.2f} levels on average, {deblock['max_diff']} at most.")
    say()
    say(f"Total bench time {time.perf_counter() - started:.0f} s.")
    if not args.no_write:
        write_section("\n".join(lines))
        print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
