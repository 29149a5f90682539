"""Decode grouping: a contiguous cover of the batch in bounded, length-sorted groups."""

from engine.attention import group_by_length


def test_groups_cover_in_order_and_respect_max_group():
    lens = sorted([5, 6, 7, 100, 101, 102, 103, 800, 900, 901])
    groups = group_by_length(lens, overhead_tokens=64, max_group=4)
    flat = [i for a, b in groups for i in range(a, b)]
    assert flat == list(range(len(lens)))
    assert all(1 <= b - a <= 4 for a, b in groups)
    # Short contexts are never padded up to the long ones.
    for a, b in groups:
        assert lens[b - 1] - lens[a] < 200


def test_single_and_empty():
    assert group_by_length([]) == []
    assert group_by_length([10]) == [(0, 1)]
