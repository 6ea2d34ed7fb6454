"""Contamination guard for held-out evaluation.

1. A held-out task that also appears among the training tasks of the evaluated model is refused.
2. n-gram overlap: for each held-out instance, the fraction of its token 13-grams (prompt + first reference) that
   also occur in the training rows; the report gives the fraction of instances above a threshold (13-grams as in
   the GPT-3 paper's contamination study, Brown et al. 2020, appendix C).

Pure Python + pyarrow; no torch.
"""

from __future__ import annotations

from pathlib import Path

from itune.data import shards
from itune.errors import ManifestError

NGRAM = 13


def check_heldout_tasks(heldout_tasks: list[str], train_tasks: list[str], where: str) -> None:
    """Raises ManifestError naming every held-out task that was also trained on."""
    both = sorted(set(heldout_tasks) & set(train_tasks))
    if both:
        raise ManifestError(f"{where}: held-out tasks {both} appear in the training data; their scores would not "
                            "be held-out scores. Evaluate on other tasks or retrain without them")


def _ngrams(ids: list[int], n: int = NGRAM):
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def row_ngrams(ids: list[int], example_lengths: list[int], n: int = NGRAM) -> set:
    """n-grams inside each example of one packed row (never across an example boundary or into padding)."""
    grams: set = set()
    pos = 0
    for length in example_lengths:
        grams |= _ngrams(ids[pos:pos + length], n)
        pos += length
    return grams


def train_ngrams(data_dir: str | Path, split: str = "train", n: int = NGRAM) -> set:
    """Every n-gram of token ids inside one example of the training rows."""
    t = shards.open_split(data_dir, split)
    grams: set = set()
    for ids, lens in zip(t["input_ids"].to_pylist(), t["example_lengths"].to_pylist()):
        grams |= row_ngrams(ids, lens, n)
    return grams


def overlap_report(records: list[dict], reference_ids: list[list[int]], grams: set, threshold: float = 0.5,
                   n: int = NGRAM) -> dict:
    """Fraction of held-out instances whose n-gram overlap with the training rows exceeds ``threshold``.

    Args:
        records: eval records (``prompt_ids``, ``id``).
        reference_ids: token ids of each record's first reference (same order).
        grams: :func:`train_ngrams` of the training data (same tokenizer).

    Returns:
        ``{"ngram": n, "threshold", "instances", "contaminated", "fraction", "ids"}`` (ids: the first 20 above).
    """
    above = []
    for r, ref in zip(records, reference_ids):
        g = _ngrams(list(r["prompt_ids"]) + list(ref), n)
        if g and len(g & grams) / len(g) > threshold:
            above.append(r["id"])
    return {"ngram": n, "threshold": threshold, "instances": len(records), "contaminated": len(above),
            "fraction": round(len(above) / len(records), 6) if records else 0.0, "ids": above[:20]}


def training_record(model_dir: str | Path) -> dict | None:
    """The ``itune_training.json`` of an export (None for checkpoints not exported by itune)."""
    import json

    p = Path(model_dir) / "itune_training.json"
    return json.loads(p.read_text()) if p.is_file() else None
