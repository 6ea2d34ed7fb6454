"""Best-fit-decreasing packing of examples into rows of ``seq_len`` tokens.

Each row holds whole examples; a row's examples never attend to each other because ``position_ids`` restart at 0
for every example (see ``docs`` in README, "Packed rows"). Padding fills the end of a row as its own run of
positions with labels -100.

Worked example (seq_len 8, lengths [5, 4, 3, 2])::

    sorted decreasing: 5, 4, 3, 2
    5 -> new row A (3 left); 4 -> new row B (4 left); 3 -> best fit A (0 left); 2 -> best fit B (2 left)
    rows: A = [0, 2] (8 tokens), B = [1, 3] (6 tokens + 2 pad); efficiency 14/16 = 0.875
"""

from __future__ import annotations

import bisect
import heapq

import numpy as np


def best_fit_decreasing(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Packs example indices into rows.

    Args:
        lengths: token count of each example (each must be in [1, seq_len]); a list or an integer array.
        seq_len: row capacity in tokens.

    Returns:
        Rows as lists of example indices, in order of creation; within a row, indices in placement order.
        Deterministic: ties in length are broken by index, ties in remaining space by row creation order.

    Raises:
        ValueError: an example is empty or longer than ``seq_len``.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    bad = np.flatnonzero((lens < 1) | (lens > seq_len))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"example {i} has {lens[i]} tokens; every example must have 1..{seq_len} (seq_len) tokens")
    order = np.lexsort((np.arange(len(lens)), -lens)).tolist()  # length decreasing, then index
    lengths = lens.tolist()
    rows: list[list[int]] = []
    # open rows by remaining space: a min-heap of row indices per space, and the sorted list of spaces that have
    # open rows; the best fit is the smallest space >= n, and among its rows the oldest
    by_space: dict[int, list[int]] = {}
    spaces: list[int] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            heap = by_space[space]
            row = heapq.heappop(heap)
            if not heap:
                del by_space[space]
                del spaces[k]
            rows[row].append(i)
            space -= n
        else:
            row = len(rows)
            rows.append([i])
            space = seq_len - n
        if space > 0:
            heap = by_space.get(space)
            if heap is None:
                by_space[space] = [row]
                bisect.insort(spaces, space)
            else:
                heapq.heappush(heap, row)
    return rows


def position_ids_for(example_lengths: list[int], seq_len: int) -> list[int]:
    """Position ids of a packed row: 0..n-1 for each example, then 0..p-1 for the padding tail.

    >>> position_ids_for([3, 2], 7)
    [0, 1, 2, 0, 1, 0, 1]
    """
    pos: list[int] = []
    for n in example_lengths:
        pos.extend(range(n))
    pos.extend(range(seq_len - len(pos)))
    return pos
