"""Extra metrics beside the official SuperNI scores: chrF and BLEU (sacrebleu), by which translation tasks are
usually judged. They are reported under their own keys (``results.json`` ``extra_metrics``) and never change the
official ``exact_match`` / ``rougeL`` keys.

Both are sacrebleu's corpus-level defaults (sacrebleu 2.x): chrF = chrF2 (character 6-grams, beta 2; Popović 2015),
BLEU = 4-gram BLEU with the brevity penalty and the ``13a`` tokenizer (Papineni et al. 2002; Post 2018), on a
0-100 scale. An instance's references are all its accepted answers; instances with fewer answers than the task's
most are padded with their first answer, which changes neither metric (chrF takes the best reference per sentence,
BLEU clips n-gram counts by the maximum over references and takes the closest reference length). A missing
prediction counts as an empty string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def _streams(refs: list[list[str]]) -> list[list[str]]:
    most = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else r[0] for r in refs] for k in range(most)]


def chrf_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """``{"chrF": float, "BLEU": float}`` (0-100) of ``predictions`` against their references (one list each)."""
    import sacrebleu

    refs = [list(r) for r in references]
    streams = _streams(refs)
    return {"chrF": round(sacrebleu.corpus_chrf(list(predictions), streams).score, 4),
            "BLEU": round(sacrebleu.corpus_bleu(list(predictions), streams).score, 4)}


def extra_metrics(predictions: Mapping[str, str], records: Sequence[Mapping]) -> dict:
    """chrF and BLEU over all ``records`` (``chrF``, ``BLEU``) and per task (``chrF_for_<task>``,
    ``BLEU_for_<task>``).

    Args:
        predictions: instance id -> predicted text.
        records: eval records with ``id``, ``task_id`` and ``references`` (a non-empty list of strings).
    """
    out = {}
    groups: dict[str, list] = {"": list(records)}
    for r in records:
        groups.setdefault(r["task_id"], []).append(r)
    for task, recs in groups.items():
        scores = chrf_bleu([predictions.get(r["id"], "") for r in recs], [r["references"] for r in recs])
        for k, v in scores.items():
            out[k if not task else f"{k}_for_{task}"] = v
    return out
