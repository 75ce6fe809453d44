"""Reading video and Parquet from S3 through rnnimg.storage, against local disk.

Video: makes a 640x360 H.264 MP4 (PyAV, ``--seconds`` long, the muxer's default layout: the
index at the end, so the demuxer seeks to the end and back), uploads it to a moto S3 server
this script starts in a child process on 127.0.0.1 (dummy keys, us-east-1), then decodes every
frame sequentially with PyAV

* from local disk (``av.open(path)``: FFmpeg's own file I/O), the reference;
* through ``rnnimg.storage.open_input`` for each read-ahead block size x s3fs cache type
  (``storage.S3_VIDEO_BLOCK_SIZE`` / ``storage.S3_VIDEO_CACHE`` set per row);
* through what ``open_input`` was before s3fs: pyarrow's S3 file under a 1 MiB ``io.BufferedReader``.

Rounds are interleaved (every configuration once per round, ``--repeats`` rounds) so that a
burst of load from other jobs hits all rows alike; a row's time is its median, its ratio that
median over the local median. ``GETs`` and ``fetched`` are the s3fs cache's misses and bytes
requested, for one decode.

Parquet: writes and reads a table of ``--parquet-mb`` (about) through pyarrow's own S3 client
(``pyarrow.fs.S3FileSystem``) and through s3fs (``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``),
medians of ``--repeats`` rounds.

    python bench/s3_read.py                      # writes bench/RESULTS_storage.md
    python bench/s3_read.py --seconds 10 --repeats 3 --out /tmp/s3.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402  (bench/machine.py)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from rnnimg import storage  # noqa: E402

WIDTH, HEIGHT, FPS = 640, 360, 25


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def human(n: float) -> str:
    return f"{n / (1 << 20):.3g} MiB" if n >= 1 << 20 else f"{n / (1 << 10):g} KiB"


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in a child process (so that it does not share this process's GIL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"moto server did not listen on port {port} within 60 s")


def make_video(path: str, seconds: float) -> str:
    """640x360 H.264 at 1 Mbit/s (libx264, preset veryfast; a usual rate for 360p): moving gradients, a moving square and grain."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    grain = rng.integers(-12, 13, size=(8, HEIGHT, WIDTH, 1), dtype=np.int16)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate = 1_000_000
        stream.options = {"preset": "veryfast"}
        for i in range(int(seconds * FPS)):
            t = i / FPS
            r = 127 + 100 * np.sin(xx / 40 + t * 2.0)
            g = 127 + 100 * np.sin(yy / 30 - t * 1.3)
            b = 127 + 100 * np.sin((xx + yy) / 60 + t * 0.7)
            frame = np.stack([r, g, b], axis=-1).astype(np.int16) + grain[i % 8]
            x0, y0 = int((t * 80) % (WIDTH - 80)), int((t * 50) % (HEIGHT - 80))
            frame[y0:y0 + 80, x0:x0 + 80] = (255, 255, 255)
            video_frame = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_all(source) -> int:
    """Decode every video frame (no colour conversion: the I/O share is as large as it gets)."""
    with av.open(source) as container:
        return sum(1 for _ in container.decode(video=0))


def pyarrow_native_s3() -> pafs.S3FileSystem:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    return pafs.S3FileSystem(region="us-east-1", scheme="http", endpoint_override=endpoint.split("://", 1)[1],
                             force_virtual_addressing=False)


class _PyarrowRaw:
    """What ``open_input`` was before s3fs: a pyarrow S3 file under ``io.BufferedReader``."""

    @staticmethod
    def open(inner_path: str):
        import io

        native = pyarrow_native_s3().open_input_file(inner_path)

        class Raw(io.RawIOBase):
            def readable(self):
                return True

            def seekable(self):
                return True

            def readinto(self, buffer):
                data = native.read(len(buffer))
                buffer[: len(data)] = data
                return len(data)

            def seek(self, offset, whence=io.SEEK_SET):
                return native.seek(offset, whence)

            def tell(self):
                return native.tell()

        return io.BufferedReader(Raw(), buffer_size=1 << 20)


def bench_video(uri: str, local_path: str, block_sizes: list[int], caches: list[str], repeats: int) -> list[dict]:
    configs = [{"name": "local disk (av.open(path))"}, {"name": "local disk, Python file (av.open(open(path)))", "python_file": True}]
    configs += [{"name": f"s3fs {cache}, {human(bs)}", "cache": cache, "block": bs} for cache in caches for bs in block_sizes]
    configs.append({"name": "before: pyarrow S3 + BufferedReader 1 MiB", "pyarrow": True})
    frames_expected = decode_all(local_path)
    for config in configs:
        config["times"] = []
    for round_ in range(repeats + 1):  # round 0 warms every path up and is not counted
        for config in configs[round_ % len(configs):] + configs[:round_ % len(configs)]:  # each row leads a round in turn
            stats = None
            start, cpu_start = time.perf_counter(), time.process_time()
            if "cache" in config:
                storage.S3_VIDEO_CACHE = config["cache"]
                with storage.open_input(uri, buffer_size=config["block"]) as f:
                    frames = decode_all(f)
                    stats = (f.cache.miss_count, f.cache.total_requested_bytes)
            elif config.get("python_file"):
                with open(local_path, "rb") as f:
                    frames = decode_all(f)
            elif config.get("pyarrow"):
                with _PyarrowRaw.open(uri[len("s3://"):]) as f:
                    frames = decode_all(f)
            else:
                frames = decode_all(local_path)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if frames != frames_expected:
                raise RuntimeError(f"{config['name']}: decoded {frames} frames, expected {frames_expected}")
            if round_:
                config["times"].append(elapsed)
                config.setdefault("cpu", []).append(cpu)
                config["stats"] = stats
        print(f"round {round_}/{repeats} done", flush=True)
    reference, reference_best = statistics.median(configs[0]["times"]), min(configs[0]["times"])
    for config in configs:
        config["median"], config["best"] = statistics.median(config["times"]), min(config["times"])
        config["cpu_median"] = statistics.median(config["cpu"])
        config["ratio"], config["best_ratio"] = config["median"] / reference, config["best"] / reference_best
    return configs


def bench_parquet(bucket: str, megabytes: float, repeats: int) -> tuple[list[dict], int, int]:
    rng = np.random.default_rng(1)
    rows = int(megabytes * (1 << 20) / 40)
    table = pa.table({
        "video_uri": [f"s3://archive/videos/{i // 50:06d}.mp4" for i in range(rows)],
        "start_s": np.arange(rows, dtype=np.float64) % 50 * 2.0,
        "score": rng.random(rows),
        "label": rng.integers(0, 10, rows),
    })
    s3fs_fs, _ = storage.fsspec_resolve(f"{bucket}/x")
    clients = [("pyarrow's own S3 client (pyarrow.fs.S3FileSystem)", pyarrow_native_s3()),
               ("s3fs (PyFileSystem(FSSpecHandler(s3fs)))", pafs.PyFileSystem(pafs.FSSpecHandler(s3fs_fs)))]
    results = [{"name": name, "fs": fs, "write": [], "read": []} for name, fs in clients]
    path = f"{bucket[len('s3://'):]}/parquet/table.parquet"
    size = 0
    for round_ in range(repeats + 1):
        for result in results:
            fs = result["fs"]
            start = time.perf_counter()
            pq.write_table(table, path, filesystem=fs, compression="zstd")
            written = time.perf_counter()
            back = pq.read_table(path, filesystem=fs)
            read = time.perf_counter()
            if not back.equals(table):
                raise RuntimeError(f"{result['name']}: the table read back differs")
            size = fs.get_file_info(path).size
            if round_:
                result["write"].append(written - start)
                result["read"].append(read - written)
    for result in results:
        result["write_median"] = statistics.median(result["write"])
        result["read_median"] = statistics.median(result["read"])
    return results, rows, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=25.0, help="length of the test video")
    parser.add_argument("--repeats", type=int, default=9, help="counted rounds (one warm-up round more)")
    parser.add_argument("--block-sizes", default="256K,1M,4M", help="read-ahead block sizes to try")
    parser.add_argument("--caches", default="readahead,background,blockcache", help="s3fs cache types to try")
    parser.add_argument("--parquet-mb", type=float, default=16.0, help="size of the Parquet table in memory, about")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS_storage.md"))
    args = parser.parse_args()

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"})
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    load_before = os.getloadavg()
    server, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import boto3  # the test dependency that creates the bucket (rnnimg.storage never creates one)

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            local = make_video(os.path.join(tmp, "video.mp4"), args.seconds)
            size = os.path.getsize(local)
            uri = "s3://bench/videos/video.mp4"
            with open(local, "rb") as f:
                storage.write_bytes(uri, f.read())
            print(f"video: {size} bytes, {args.seconds:g} s at {FPS} fps; decoding ...", flush=True)
            video = bench_video(uri, local, [parse_size(s) for s in args.block_sizes.split(",")],
                                args.caches.split(","), args.repeats)
        parquet, rows, parquet_size = bench_parquet("s3://bench", args.parquet_mb, args.repeats)
    finally:
        server.terminate()
        server.wait(timeout=30)
    load_after = os.getloadavg()

    import fsspec
    import s3fs

    lines = [
        "# Reading video and Parquet from S3 through rnnimg.storage",
        "",
        f"Measured {datetime.date.today()} by `python bench/s3_read.py --seconds {args.seconds:g} --repeats {args.repeats}` "
        f"on {cpu_model()}, {os.cpu_count()} cores (Python {sys.version.split()[0]}, PyAV {av.__version__}, "
        f"s3fs {s3fs.__version__}, fsspec {fsspec.__version__}, pyarrow {pa.__version__}). "
        f"Load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} "
        "(a shared machine: other jobs slow every row alike, rounds are interleaved).",
        "",
        f"S3 is moto's server in a child process on 127.0.0.1. The video: {WIDTH}x{HEIGHT} H.264 (libx264, 1 Mbit/s), "
        f"{args.seconds:g} s at {FPS} fps, {size / (1 << 20):.2f} MiB, index at the end of the file. "
        "Time: wall seconds to decode every frame once (no colour conversion); CPU: this process's CPU seconds "
        "(PyAV, s3fs and its threads; moto's are not in it), medians of the rounds.",
        "",
        "| read path | median s | / local median | best s | / local best | CPU s (this process) | every round, s | GETs | requested |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config in video:
        gets, fetched = config["stats"] if config.get("stats") else ("", None)
        lines.append(f"| {config['name']} | {config['median']:.3f} | {config['ratio']:.2f} | {config['best']:.3f} | "
                     f"{config['best_ratio']:.2f} | {config['cpu_median']:.3f} | {', '.join(f'{t:.2f}' for t in config['times'])} | {gets} | "
                     f"{human(fetched) if fetched else ''} |")
    best = min((c for c in video if "cache" in c), key=lambda c: c["median"])
    lines += ["", f"Fastest s3fs row by median: {best['name']}, {best['ratio']:.2f}x local disk "
              f"({best['best_ratio']:.2f}x by best round). `requested`: bytes the cache asked for (S3 sends no more "
              "than the file holds).", "",
              f"Parquet: a table of {rows} rows (4 columns), {parquet_size / (1 << 20):.2f} MiB as zstd Parquet; "
              "write = `pq.write_table` to S3, read = `pq.read_table` from S3, medians.", "",
              "| client | write, s | read, s | write + read, s |", "|---|---|---|---|"]
    for result in parquet:
        lines.append(f"| {result['name']} | {result['write_median']:.3f} | {result['read_median']:.3f} | "
                     f"{result['write_median'] + result['read_median']:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
