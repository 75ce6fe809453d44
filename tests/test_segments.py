import pytest

from rnnimg.segments import merge_segments


def clips(labels, clip_seconds=2.0, scores=None, indices=None):
    indices = indices or list(range(len(labels)))
    scores = scores or [0.9] * len(labels)
    return [
        {"clip_index": i, "start_s": i * clip_seconds, "end_s": (i + 1) * clip_seconds, "label": l, "score": s}
        for i, l, s in zip(indices, labels, scores)
    ]


def test_consecutive_equal_labels_merge():
    segments = merge_segments(clips(["a", "a", "b", "b", "b", "a"], scores=[0.8, 0.6, 0.9, 0.9, 0.6, 0.7]))
    assert [(s["label"], s["start_s"], s["end_s"], s["clips"]) for s in segments] == [("a", 0, 4, 2), ("b", 4, 10, 3), ("a", 10, 12, 1)]
    assert segments[0]["mean_score"] == pytest.approx(0.7)
    assert segments[1]["mean_score"] == pytest.approx(0.8)


def test_order_of_input_does_not_matter():
    rows = clips(["a", "b", "b"])
    assert merge_segments(rows[::-1]) == merge_segments(rows)


def test_a_missing_clip_ends_a_segment():
    segments = merge_segments(clips(["a", "a", "a"], indices=[0, 1, 3]))
    assert [(s["start_s"], s["end_s"], s["clips"]) for s in segments] == [(0, 4, 2), (6, 8, 1)]


def test_smoothing_absorbs_short_segments_into_the_longer_neighbour():
    segments = merge_segments(clips(["a", "a", "a", "b", "a", "a", "c", "c"]), min_segment_seconds=3.0)
    assert [(s["label"], s["start_s"], s["end_s"], s["clips"]) for s in segments] == [("a", 0, 12, 6), ("c", 12, 16, 2)]
    # mean_score counts only the clips that voted for the segment's label
    assert segments[0]["mean_score"] == pytest.approx(0.9)


def test_smoothing_never_bridges_a_gap():
    segments = merge_segments(clips(["a", "b"], indices=[0, 5]), min_segment_seconds=10.0)
    assert [s["label"] for s in segments] == ["a", "b"]


def test_negative_minimum_is_refused():
    with pytest.raises(ValueError, match="min_segment_seconds must be >= 0, got -1"):
        merge_segments([], -1)
