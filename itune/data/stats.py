"""Length and packing statistics of a prepared split, and their plot (``itune-data stats``).

:func:`length_stats` reads the shards of one split (see :mod:`itune.data.shards`) and returns exact numbers:
counts, example lengths and histograms as plain lists. :func:`write_stats_png` draws them; matplotlib is imported
inside it, so importing this module stays light (no matplotlib, no torch).

Worked example (``seq_len`` 8, two rows): row 0 holds examples of 5 and 2 tokens (7 real tokens, 1 padding),
row 1 one example of 4 tokens::

    examples 3, rows 2, tokens 11, packing efficiency 11 / (2 * 8) = 0.6875
    row fill: 7/8 = 0.875 and 4/8 = 0.5
    example length: mean 11/3, median 4, max 5
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from itune.data.shards import open_split, read_manifest
from itune.fileio import atomic_open

IGNORE_INDEX = -100


def int_edges(hi: int, bins: int) -> list[int]:
    """Integer bin edges ``0, w, 2w, ...`` with ``w = ceil(hi / bins)``; the last edge is ``>= hi``."""
    width = max(1, -(-hi // bins))
    n = max(1, -(-hi // width))
    return [i * width for i in range(n + 1)]


def int_histogram(values: np.ndarray, edges: list[int]) -> list[int]:
    """Counts per bin ``[edges[i], edges[i + 1])``, the last bin closed (numpy's convention); values in
    ``[0, edges[-1]]``."""
    width, n = edges[1] - edges[0], len(edges) - 1
    idx = np.minimum(values // width, n - 1)
    return np.bincount(idx, minlength=n).astype(int).tolist()


def length_stats(data_dir: str | Path, split: str = "train", bins: int = 32, fill_bins: int = 20) -> dict:
    """Exact length and packing statistics of one prepared split.

    Args:
        data_dir: a prepared directory (``manifest.json`` + shards).
        split: split name in the manifest (``train``, ``test``).
        bins: bins of the token histograms; integer edges from 0 to ``seq_len`` (width ``ceil(seq_len / bins)``).
        fill_bins: bins of the row fill histogram over ``[0, 1]`` (width ``1 / fill_bins``).

    Returns:
        ``{"data_dir", "split", "seq_len", "examples", "rows", "tokens", "trainable_tokens", "padding_tokens",
        "packing_efficiency", "example_length": {"mean", "median", "min", "max"}, "length_histogram",
        "fill_histogram", "trainable_histogram"}``. ``tokens`` counts real tokens (the sum of ``example_lengths``);
        ``packing_efficiency = tokens / (rows * seq_len)`` rounded to 6 digits like the manifest's.
        Each histogram is ``{"edges": [n + 1], "counts": [n]}``, bins ``[lo, hi)`` with the last one closed:
        ``length_histogram`` tokens per example, ``trainable_histogram`` trained tokens (labels != -100) per
        example, ``fill_histogram`` real tokens per row / ``seq_len``.

    Raises:
        ManifestError: no manifest in ``data_dir``, an unknown split, or shards that disagree with the manifest.
    """
    m = read_manifest(data_dir)
    seq_len = int(m["seq_len"])
    t = open_split(data_dir, split)
    rows = t.num_rows
    lengths_col = t["example_lengths"].combine_chunks()
    lengths = np.asarray(lengths_col.flatten().to_numpy(zero_copy_only=False), dtype=np.int64)  # [examples]
    per_row = np.asarray(pc.list_value_length(lengths_col).to_numpy(zero_copy_only=False), dtype=np.int64)  # [rows]
    row_tokens = np.zeros(rows, dtype=np.int64)                                               # [rows]
    if rows:
        row_of = np.repeat(np.arange(rows), per_row)                                          # [examples]
        np.add.at(row_tokens, row_of, lengths)
        # example start inside its row, then in the flat [rows * seq_len] label array
        offset = np.cumsum(lengths) - lengths - np.repeat(np.cumsum(row_tokens) - row_tokens, per_row)
        starts = row_of * seq_len + offset
        labels = np.asarray(t["labels"].combine_chunks().flatten().to_numpy(zero_copy_only=False))
        trained = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])                   # [rows*seq_len + 1]
        trainable = trained[starts + lengths] - trained[starts]                              # [examples]
    else:
        trainable = np.zeros(0, dtype=np.int64)
    tokens = int(lengths.sum())
    edges = int_edges(seq_len, bins)
    fill_counts = np.bincount(np.minimum(row_tokens * fill_bins // seq_len, fill_bins - 1),
                              minlength=fill_bins).astype(int).tolist()
    n = int(lengths.size)
    return {
        "data_dir": str(data_dir),
        "split": split,
        "seq_len": seq_len,
        "examples": n,
        "rows": rows,
        "tokens": tokens,
        "trainable_tokens": int(trainable.sum()),
        "padding_tokens": rows * seq_len - tokens,
        "packing_efficiency": round(tokens / (rows * seq_len), 6) if rows else 0.0,
        "example_length": {
            "mean": tokens / n if n else 0.0,
            "median": float(np.median(lengths)) if n else 0.0,
            "min": int(lengths.min()) if n else 0,
            "max": int(lengths.max()) if n else 0,
        },
        "length_histogram": {"edges": edges, "counts": int_histogram(lengths, edges)},
        "fill_histogram": {"edges": [i / fill_bins for i in range(fill_bins + 1)], "counts": fill_counts},
        "trainable_histogram": {"edges": edges, "counts": int_histogram(trainable, edges)},
    }


def write_stats_png(stats: dict, path: str | Path) -> Path:
    """Draws the three histograms of :func:`length_stats` side by side and writes them as a PNG, atomically
    (temporary file in the same directory, then ``os.replace``); creates the parent directory.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(15, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = [
        ("length_histogram", "tokens per example", "examples",
         f"example length (mean {stats['example_length']['mean']:.1f}, median "
         f"{stats['example_length']['median']:g}, max {stats['example_length']['max']})"),
        ("fill_histogram", "real tokens per row / seq_len", "rows",
         f"row fill (packing efficiency {stats['packing_efficiency']:.4f})"),
        ("trainable_histogram", "trained tokens per example (labels != -100)", "examples",
         f"trained tokens per example ({stats['trainable_tokens']} in all)"),
    ]
    for ax, (key, xlabel, ylabel, title) in zip(axes, panels):
        h = stats[key]
        ax.stairs(h["counts"], h["edges"], fill=True, alpha=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{stats['data_dir']} [{stats['split']}]: {stats['examples']} examples, {stats['rows']} rows of "
                 f"{stats['seq_len']} tokens, {stats['tokens']} tokens")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path
