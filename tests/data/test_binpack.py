"""mhsft/data/binpack.py: best-fit-decreasing packing, against the textbook algorithm and first fit."""

from __future__ import annotations

import random
import time

import pytest

from mhsft.data.binpack import pack_bfd


def _reference_bfd(lengths, cap):
    """Quadratic textbook best-fit-decreasing, to check the fast one against."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
        else:
            b = len(bins)
            bins.append([])
            room.append(cap)
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def _first_fit(lengths, cap):
    room = []
    for n in lengths:
        for b, r in enumerate(room):
            if r >= n:
                room[b] -= n
                break
        else:
            room.append(cap - n)
    return len(room)


@pytest.mark.parametrize("seed", range(5))
def test_pack_bfd_properties(seed):
    rng = random.Random(seed)
    cap = rng.choice([16, 100, 512])
    lengths = [rng.randint(1, cap) for _ in range(rng.randint(1, 300))]
    bins = pack_bfd(lengths, cap)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    assert bins == _reference_bfd(lengths, cap)
    assert len(bins) <= _first_fit(lengths, cap)
    assert pack_bfd(lengths, cap) == bins  # deterministic


def test_pack_bfd_beats_first_fit():
    lengths = [3, 3, 3, 7, 7, 7]
    assert _first_fit(lengths, 10) == 4
    bins = pack_bfd(lengths, 10)
    assert len(bins) == 3 and all(sorted(lengths[i] for i in b) == [3, 7] for b in bins)
    # best fit, not first fit: the 1 goes to the bin with 1 left (bin 1), not the first that fits (bin 0)
    assert pack_bfd([4, 4, 3, 3, 3, 1], 10) == [[0, 1], [2, 3, 4, 5]]


def test_pack_bfd_rejects_bad_lengths():
    assert pack_bfd([], 8) == []
    for bad in ([9, 1], [0, 3]):
        with pytest.raises(ValueError, match="outside 1..max_length"):
            pack_bfd(bad, 8)


def test_pack_bfd_fast():
    rng = random.Random(0)
    lengths = [rng.randint(1, 4096) for _ in range(100_000)]
    t = time.perf_counter()
    bins = pack_bfd(lengths, 4096)
    assert time.perf_counter() - t < 2.0
    assert len(bins) < 1.01 * sum(lengths) / 4096 + 1  # BFD leaves almost no room on such data
