"""Best-fit-decreasing bin packing of samples into rows of at most `max_length` tokens: the trainer packs its
batches with it (`--packing true`) and `mhsft data inspect` reports how full the rows would be."""

from __future__ import annotations

from collections.abc import Sequence

from sortedcontainers import SortedList


def pack_bfd(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing: pack sample indices into bins of capacity `max_length`.

    Samples are placed longest first (ties by index), each into the open bin whose remaining room is the
    smallest that still fits it (ties: the oldest bin), else into a new bin. The open bins live in a sorted
    list keyed by (room, bin id), so every placement is one O(log n) search: O(n log n) overall.
    Deterministic. Bins come out in creation order, each listing its indices in placement order.
    Samples must already be truncated to `max_length` (a longer or empty one is the caller's bug)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if order and (lengths[order[0]] > max_length or lengths[order[-1]] < 1):
        bad = order[0] if lengths[order[0]] > max_length else order[-1]
        raise ValueError(f"sample {bad} has length {lengths[bad]}, outside 1..max_length={max_length}")
    bins: list[list[int]] = []
    open_bins = SortedList()  # (room left, bin id); full bins are dropped
    for i in order:
        n = lengths[i]
        pos = open_bins.bisect_left((n, -1))
        if pos < len(open_bins):
            room, b = open_bins.pop(pos)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            open_bins.add((room - n, b))
    return bins
