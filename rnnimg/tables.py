"""The Parquet schemas of rnnimg's output tables, in one place.

Store layout of a labelling run (``OUT`` is a local folder or ``s3://bucket/prefix``)::

    OUT/clips/shard-00000.parquet      one row per clip (CLIPS; SURPRISE_CLIPS for a next-frame model)
    OUT/videos/shard-00000.parquet     one row per input video (VIDEOS)
    OUT/segments/shard-00000.parquet   runs of consecutive clips with one label (SEGMENTS)
    OUT/masks/shard-00000.parquet      one row per sampled frame of a segmentation model (MASKS)
    OUT/objects/shard-00000.parquet    one row per detection of an objects model: frame, class, box (OBJECTS)
    OUT/tracks/shard-00000.parquet     per video and class of an objects model: first/last seen (TRACKS)
    OUT/_commits/shard-00000.json      completion record of a shard, written last
    OUT/_parts/shard-00000/*.parquet   predicted clip rows staged by the model actors until the shard commits
    OUT/_run/manifest.parquet          the listing of the input, made once per run
    OUT/_run/config.json               run id, model id, model config, clip plan, parameters
    OUT/run.json                       run summary, written at the end

Every table also carries the run's config as Parquet key-value metadata (``rnnimg.run``).
"""

from __future__ import annotations

import json

import pyarrow as pa

CLIPS = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),  # the input video
        pa.field("clip_index", pa.int32(), nullable=False),  # position of the clip in its video, from 0
        pa.field("start_s", pa.float64(), nullable=False),  # clip window start, seconds of presentation time
        pa.field("end_s", pa.float64(), nullable=False),  # clip window end, seconds
        pa.field("label", pa.string(), nullable=False),  # predicted class name
        pa.field("score", pa.float32(), nullable=False),  # softmax probability of that class
        pa.field("model_id", pa.string(), nullable=False),  # first 16 hex digits of the weights' SHA-256
        pa.field("run_id", pa.string(), nullable=False),  # the labelling run
    ]
)

SEGMENTS = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),  # start of the segment's first clip
        pa.field("end_s", pa.float64(), nullable=False),  # end of its last clip
        pa.field("label", pa.string(), nullable=False),
        pa.field("mean_score", pa.float32(), nullable=False),  # mean score of its clips that voted for the label
        pa.field("clips", pa.int32(), nullable=False),  # clips in the segment
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

VIDEO_STATUSES = ("ok", "partial", "failed")

VIDEOS = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),  # the input video
        pa.field("status", pa.string(), nullable=False),  # ok | partial (clips before an error kept) | failed
        pa.field("duration_s", pa.float64()),  # declared duration; null when the file could not be opened
        pa.field("clips", pa.int32(), nullable=False),  # clips labelled (rows in the clips table)
        pa.field("error_type", pa.string()),  # null when ok; e.g. open, no_video_stream, decode, truncated
        pa.field("error", pa.string()),  # null when ok; a one-line reason naming the video
        pa.field("attempt", pa.int32(), nullable=False),  # 1; n for the n-th labelling of an unchanged video that failed transiently
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

MASKS = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),  # the input video
        pa.field("clip_index", pa.int32(), nullable=False),  # the clip the frame was sampled in
        pa.field("frame_time_s", pa.float64(), nullable=False),  # the sampled presentation time, seconds
        pa.field("height", pa.int32(), nullable=False),  # the mask's rows (the model's frame size)
        pa.field("width", pa.int32(), nullable=False),  # the mask's columns
        pa.field("rle", pa.string(), nullable=False),  # JSON list of COCO uncompressed-RLE counts (column-major, zeros first; rnnimg.rle)
        pa.field("area_fraction", pa.float32(), nullable=False),  # share of the frame's pixels in the mask
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


OBJECTS = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),  # the input video
        pa.field("frame_time_s", pa.float64(), nullable=False),  # the sampled presentation time, seconds
        pa.field("label", pa.string(), nullable=False),  # the class detected (one instance per class per frame)
        pa.field("score", pa.float32(), nullable=False),  # presence probability (>= the model's score_threshold)
        pa.field("x0", pa.float32(), nullable=False),  # box left edge, share of the frame width, in [0, 1]
        pa.field("y0", pa.float32(), nullable=False),  # box top edge, share of the frame height
        pa.field("x1", pa.float32(), nullable=False),  # box right edge
        pa.field("y1", pa.float32(), nullable=False),  # box bottom edge
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

TRACKS = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),  # one row per video and class seen in it
        pa.field("first_seen_s", pa.float64(), nullable=False),  # first sampled time with a detection, seconds
        pa.field("last_seen_s", pa.float64(), nullable=False),  # last one
        pa.field("frames", pa.int32(), nullable=False),  # sampled frames with a detection
        pa.field("seconds_seen", pa.float64(), nullable=False),  # those frames times their sampling interval
        pa.field("mean_score", pa.float32(), nullable=False),  # mean score of those detections
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


# The clips table of a next-frame (``predict``) model: a surprise score instead of a class.
SURPRISE_CLIPS = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),  # the input video
        pa.field("clip_index", pa.int32(), nullable=False),  # position of the clip in its video, from 0
        pa.field("start_s", pa.float64(), nullable=False),  # clip window start, seconds of presentation time
        pa.field("end_s", pa.float64(), nullable=False),  # clip window end, seconds
        pa.field("surprise", pa.float32(), nullable=False),  # how unexpected the clip's last frames were, each given the frames
        # before it: the largest per-frame surprisal (nats summed over the pixels; squared error for an MSE-trained model,
        # ``rnnimg.tasks.predict.surprise_measure``); higher = more unexpected
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


def with_run_metadata(schema: pa.Schema, run_config: dict) -> pa.Schema:
    return schema.with_metadata({"rnnimg.run": json.dumps(run_config, sort_keys=True)})


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly ``schema``'s columns, in its order."""
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.table(columns, schema=schema)
