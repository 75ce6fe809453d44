"""Merge consecutive clips with the same label into segments, with optional smoothing.

Pure functions over clip rows (dicts with ``clip_index``, ``start_s``, ``end_s``, ``label``,
``score``), testable without decoding anything.
"""

from __future__ import annotations


def merge_segments(clips: list[dict], min_segment_seconds: float = 0.0) -> list[dict]:
    """Segments of one video: runs of consecutive clips (by ``clip_index``) with one label.

    Smoothing: a segment shorter than ``min_segment_seconds`` that has a neighbour within the
    same run of consecutive clips takes the label of its longer neighbour, and equal neighbours
    are merged again; repeated until no short segment can be absorbed. A missing clip (a gap in
    ``clip_index``) always ends a segment.

    Args:
        clips: one video's clip rows, in any order.
        min_segment_seconds: shortest segment to keep as is (0: no smoothing).

    Returns:
        Rows with ``start_s``, ``end_s``, ``label``, ``mean_score`` (mean score of the segment's
        clips that voted for its label) and ``clips`` (clips in the segment), in time order.

    Raises:
        ValueError: ``min_segment_seconds`` is negative.
    """
    if min_segment_seconds < 0:
        raise ValueError(f"min_segment_seconds must be >= 0, got {min_segment_seconds}")
    ordered = sorted(clips, key=lambda c: c["clip_index"])
    # Each segment: [label, [clips...]] ; runs are maximal chains of consecutive clip indices.
    segments: list[list] = []
    for clip in ordered:
        if segments and segments[-1][1][-1]["clip_index"] + 1 == clip["clip_index"] and segments[-1][0] == clip["label"]:
            segments[-1][1].append(clip)
        else:
            segments.append([clip["label"], [clip]])

    def duration(segment) -> float:
        return segment[1][-1]["end_s"] - segment[1][0]["start_s"]

    def adjacent(a, b) -> bool:
        return a[1][-1]["clip_index"] + 1 == b[1][0]["clip_index"]

    changed = min_segment_seconds > 0
    while changed:
        changed = False
        for i, segment in enumerate(segments):
            if duration(segment) >= min_segment_seconds:
                continue
            neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(segments) and (adjacent(segments[j], segment) if j < i else adjacent(segment, segments[j]))]
            if not neighbours:
                continue
            target = max(neighbours, key=lambda j: duration(segments[j]))
            segments[target][1] = sorted(segments[target][1] + segment[1], key=lambda c: c["clip_index"])
            del segments[i]
            # Merge equal-label neighbours that the absorption made adjacent.
            merged: list[list] = []
            for seg in segments:
                if merged and merged[-1][0] == seg[0] and adjacent(merged[-1], seg):
                    merged[-1][1].extend(seg[1])
                else:
                    merged.append(seg)
            segments = merged
            changed = True
            break

    out = []
    for label, members in segments:
        voting = [c["score"] for c in members if c["label"] == label]
        out.append(
            {
                "start_s": members[0]["start_s"],
                "end_s": members[-1]["end_s"],
                "label": label,
                "mean_score": sum(voting) / len(voting) if voting else 0.0,
                "clips": len(members),
            }
        )
    return out
