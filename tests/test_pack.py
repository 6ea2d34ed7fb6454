"""Best-fit-decreasing packing: golden outputs and properties."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from itune.data.pack import best_fit_decreasing, position_ids_for


def test_docstring_example():
    assert best_fit_decreasing([5, 4, 3, 2], 8) == [[0, 2], [1, 3]]


def test_best_fit_chooses_tightest_row():
    # decreasing: 6 opens row 0 (4 free), 5 opens row 1 (5 free), the other 5 fills row 1, the 4 fills row 0
    assert best_fit_decreasing([6, 5, 4, 5], 10) == [[0, 2], [1, 3]]


def test_ties_are_deterministic():
    assert best_fit_decreasing([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]


def test_rejects_empty_and_too_long():
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        best_fit_decreasing([1, 9], 8)
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):
        best_fit_decreasing([0], 8)


def test_position_ids_restart_per_example_and_for_padding():
    assert position_ids_for([3, 2], 7) == [0, 1, 2, 0, 1, 0, 1]
    assert position_ids_for([4], 4) == [0, 1, 2, 3]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=200), st.integers(64, 128))
def test_every_example_placed_once_and_rows_fit(lengths, seq_len):
    rows = best_fit_decreasing(lengths, seq_len)
    placed = sorted(i for r in rows for i in r)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= seq_len for r in rows)
    # best fit never leaves two rows that could be merged into one
    loads = sorted(sum(lengths[i] for i in r) for r in rows)
    assert len(loads) < 2 or loads[0] + loads[1] > seq_len


def _reference_bfd(lengths, seq_len):
    """The definition, plainly: examples by length decreasing (then index); each goes to the open row with the
    least space that fits it (the oldest row among equals), else to a new row."""
    rows, space = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if space[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (space[r], r))
            rows[r].append(i)
            space[r] -= lengths[i]
        else:
            rows.append([i])
            space.append(seq_len - lengths[i])
    return rows


def test_best_fit_decreasing_equals_the_plain_definition_on_random_lengths():
    import random

    rnd = random.Random(0)
    for _ in range(300):
        seq_len = rnd.choice([8, 16, 64, 2048])
        lengths = [rnd.randint(1, seq_len) if rnd.random() < 0.5 else rnd.choice([1, 3, seq_len // 2, seq_len])
                   for _ in range(rnd.randint(0, 150))]
        assert best_fit_decreasing(lengths, seq_len) == _reference_bfd(lengths, seq_len)
