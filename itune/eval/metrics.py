"""Official Super-NaturalInstructions (SuperNI) automatic evaluation: exact match and ROUGE-L.

A faithful re-implementation of ``eval/automatic/evaluation.py`` in allenai/natural-instructions at commit
8540acd (8540acd3faaea51b4a379570b542e9123904cac2); the scoring rules are summarised in
``shared/notes/superni-eval.md``. Every function here gives the same numbers and the same result keys as the
official script on the inputs that script accepts. Where the official script crashes or silently misbehaves, this
module raises a typed error naming the record instead, or (for a track with no instances) skips the track:

* a track with no reference records is skipped (the official script divides by zero);
* a duplicate reference id, a reference record with an unknown ``track``, a record lacking ``task_category`` or
  ``task_id`` when the first record of its track has one, an empty reference list, or a prediction that is not a
  string raises `itune.errors.DataFormatError` (a `ValueError`);
* the GPT-2 tokenizer of the xlingual track is read from a local directory given by the caller, loaded lazily and
  only when an xlingual record is scored (the official script downloads "gpt2" at import time).

This module is pure Python: it never imports torch, transformers or deepspeed.
"""

from __future__ import annotations

import functools
import logging
import os
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

from rouge_score import rouge_scorer

from itune.errors import ConfigError, DataFormatError

logger = logging.getLogger(__name__)

OFFICIAL_SOURCE = "allenai/natural-instructions eval/automatic/evaluation.py at commit 8540acd"
"""Where the scoring rules of this module come from."""

TRACKS: tuple[str, ...] = ("default", "xlingual")
"""SuperNI evaluation tracks, in the order the official script scores them."""

METRICS: tuple[str, ...] = ("exact_match", "rougeL")
"""Metric names, in the order the official script reports them."""

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_GPT2_SPACE = "Ġ"  # byte-level BPE marker of a leading space

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------- exact match


def normalize_answer(s: str) -> str:
    """Normalises an answer for exact match: SQuAD v1.1 normalisation without removing articles.

    Steps, in order: lowercase; delete every character of `string.punctuation` (ASCII only, so ``’``, ``“`` and
    ``—`` are kept); collapse runs of whitespace to one space and strip both ends. Articles (a/an/the) are kept.

    Source: ``normalize_answer`` in allenai/natural-instructions eval/automatic/evaluation.py at commit 8540acd.

    Example:
        >>> normalize_answer("  The  Cat, sat!\\n")
        'the cat sat'

    Args:
        s: the text to normalise.

    Returns:
        The normalised text.
    """
    lowered = s.lower()
    without_punctuation = "".join(ch for ch in lowered if ch not in _ASCII_PUNCTUATION)
    return " ".join(without_punctuation.split())


def exact_match(prediction: str, ground_truth: str) -> bool:
    """Whether prediction and reference are equal after `normalize_answer`.

    Source: ``exact_match_score`` in allenai/natural-instructions eval/automatic/evaluation.py at commit 8540acd.

    Args:
        prediction: the model output.
        ground_truth: one reference answer.

    Returns:
        True when the normalised strings are equal (two empty strings are an exact match).
    """
    return normalize_answer(prediction) == normalize_answer(ground_truth)


# ------------------------------------------------------------------------------------------------------ ROUGE-L


class XlingualTokenizer:
    """The tokenizer of the xlingual track: GPT-2 byte-level BPE tokens with the leading ``Ġ`` stripped.

    Mirrors ``GPTTokenizer`` of the official script, which calls ``AutoTokenizer.from_pretrained("gpt2")``
    ``.tokenize(s)`` and then ``t.lstrip("Ġ")`` on every token (no lowercasing, no stemming). Here the tokenizer
    is read with the `tokenizers` library from ``<path>/tokenizer.json`` on the first call of `tokenize`, so
    nothing is downloaded and transformers is not imported. ``encode(s, add_special_tokens=False).tokens`` gives
    the same token strings as the Hugging Face ``.tokenize(s)``.

    Source: ``GPTTokenizer`` in allenai/natural-instructions eval/automatic/evaluation.py at commit 8540acd.

    Args:
        path: a tokenizer directory holding ``tokenizer.json`` (the official track uses GPT-2's).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._tokenizer: Any = None
        self._scorer: rouge_scorer.RougeScorer | None = None

    def _load(self) -> Any:
        if self._tokenizer is None:
            file = self.path / "tokenizer.json"
            if not file.is_file():
                raise ConfigError(
                    f"xlingual tokenizer: {file} does not exist. Pass a GPT-2-style tokenizer directory "
                    "(one holding tokenizer.json, e.g. a local copy of the Hugging Face 'gpt2' tokenizer)."
                )
            from tokenizers import Tokenizer  # deferred: only the xlingual track needs it

            self._tokenizer = Tokenizer.from_file(str(file))
        return self._tokenizer

    def tokenize(self, text: str) -> list[str]:
        """Splits text into byte-level BPE token strings with the leading ``Ġ`` characters removed.

        Args:
            text: the text to tokenize.

        Returns:
            The token strings, e.g. ``["Hello", "world"]`` for ``"Hello world"``.

        Raises:
            ConfigError: ``tokenizer.json`` is missing from the directory.
        """
        tokens = self._load().encode(text, add_special_tokens=False).tokens
        return [token.lstrip(_GPT2_SPACE) for token in tokens]

    @property
    def scorer(self) -> rouge_scorer.RougeScorer:
        """A ``RougeScorer(['rougeL'], tokenizer=self)``, built once per tokenizer."""
        if self._scorer is None:
            self._scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=self)
        return self._scorer


XlingualTokenizerArg = Union[str, os.PathLike, XlingualTokenizer, None]
"""A tokenizer directory, an `XlingualTokenizer`, or None (default track only)."""


@functools.lru_cache(maxsize=1)
def _default_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@functools.lru_cache(maxsize=None)
def _xlingual_tokenizer_for(resolved_path: str) -> XlingualTokenizer:
    return XlingualTokenizer(resolved_path)


def _xlingual_scorer(xlingual_tokenizer: str | os.PathLike[str] | XlingualTokenizer) -> rouge_scorer.RougeScorer:
    if isinstance(xlingual_tokenizer, XlingualTokenizer):
        return xlingual_tokenizer.scorer
    return _xlingual_tokenizer_for(str(Path(xlingual_tokenizer).resolve())).scorer


def _missing_xlingual_tokenizer(where: str) -> ConfigError:
    return ConfigError(
        f"{where}: the xlingual track needs a GPT-2-style tokenizer; pass xlingual_tokenizer=<tokenizer directory "
        "holding tokenizer.json> (the official script uses the Hugging Face 'gpt2' tokenizer)."
    )


def rouge_l(prediction: str, ground_truth: str, xlingual_tokenizer: XlingualTokenizerArg = None) -> float:
    """Sentence-level ROUGE-L F-measure between a prediction and one reference.

    Default (English) track, ``xlingual_tokenizer=None``: rouge_score's ``RougeScorer(['rougeL'],
    use_stemmer=True)``; its tokenizer lowercases, turns every character outside ``[a-z0-9]`` into a space (so
    punctuation and non-ASCII letters are dropped: "Khloé" -> "khlo"), splits on whitespace and Porter-stems
    tokens longer than 3 characters. Xlingual track: a scorer over `XlingualTokenizer` tokens, no stemming.

    F = 2PR / (P + R) with P = LCS / len(prediction tokens) and R = LCS / len(reference tokens); F is 0 when
    either side has no tokens (so two empty strings score 0).

    Source: ``rouge`` in allenai/natural-instructions eval/automatic/evaluation.py at commit 8540acd, which calls
    ``scorer.score(target=ground_truth, prediction=prediction)["rougeL"].fmeasure``.

    Example:
        >>> rouge_l("the dog ran", "a dog ran")  # LCS = 2 of 3 tokens each: P = R = F = 2/3
        0.6666666666666666

    Args:
        prediction: the model output.
        ground_truth: one reference answer.
        xlingual_tokenizer: None for the default track; for the xlingual track a GPT-2-style tokenizer directory
            (holding ``tokenizer.json``, loaded lazily and cached per resolved path) or an `XlingualTokenizer`.

    Returns:
        The F-measure in [0, 1].

    Raises:
        ConfigError: the xlingual tokenizer directory has no ``tokenizer.json``.
    """
    scorer = _default_scorer() if xlingual_tokenizer is None else _xlingual_scorer(xlingual_tokenizer)
    return scorer.score(target=ground_truth, prediction=prediction)["rougeL"].fmeasure


# -------------------------------------------------------------------------------------------------- aggregation


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], T], prediction: str, ground_truths: Sequence[str]
) -> T:
    """The best score of a prediction over all references of an instance.

    Source: ``metric_max_over_ground_truths`` in allenai/natural-instructions eval/automatic/evaluation.py at
    commit 8540acd.

    Example:
        >>> metric_max_over_ground_truths(exact_match, "Bottle.", ["jug", "bottle"])
        True

    Args:
        metric_fn: ``metric_fn(prediction, ground_truth)``, e.g. `exact_match` or `rouge_l`.
        prediction: the model output.
        ground_truths: the references of the instance (at least one).

    Returns:
        ``max(metric_fn(prediction, g) for g in ground_truths)``.

    Raises:
        ValueError: ``ground_truths`` is empty.
    """
    if len(ground_truths) == 0:
        raise ValueError("metric_max_over_ground_truths: the instance has no references (empty list)")
    return max(metric_fn(prediction, ground_truth) for ground_truth in ground_truths)


def _check_instances(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise DataFormatError(
            f"{len(predictions)} predictions but {len(references)} references; give exactly one prediction "
            "per reference list."
        )
    if len(references) == 0:
        raise DataFormatError("no instances to score: predictions and references are empty.")
    for index, (prediction, gold) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise DataFormatError(
                f"predictions[{index}] is {type(prediction).__name__} {prediction!r}, not str; score a missing "
                "prediction as the empty string."
            )
        if not isinstance(gold, list):
            raise DataFormatError(
                f"references[{index}] is {type(gold).__name__} {gold!r}, not a list; wrap a single reference as "
                "[reference]."
            )
        if len(gold) == 0 or not all(isinstance(g, str) for g in gold):
            raise DataFormatError(f"references[{index}] = {gold!r} must be a non-empty list of strings.")


def compute_metrics(
    predictions: Sequence[str],
    references: Sequence[list[str]],
    xlingual: bool = False,
    xlingual_tokenizer: XlingualTokenizerArg = None,
) -> dict[str, float]:
    """Exact match and ROUGE-L, micro-averaged over instances, in percent.

    Per instance, each metric is the max over that instance's references; the corpus value is
    ``round(100 * sum / n_instances, 4)``.

    Source: ``compute_metrics`` in allenai/natural-instructions eval/automatic/evaluation.py at commit 8540acd.

    Example:
        >>> compute_metrics(["sack", "a bag"], [["sack"], ["bag"]])  # EM (1+0)/2; RL (1 + 2/3)/2
        {'exact_match': 50.0, 'rougeL': 83.3333}

    Args:
        predictions: one model output per instance.
        references: one list of reference strings per instance (must be a `list`, as the official script
            asserts).
        xlingual: score ROUGE-L with the xlingual tokenizer instead of the default English one.
        xlingual_tokenizer: the GPT-2-style tokenizer directory (or `XlingualTokenizer`); required when
            ``xlingual`` is True, ignored otherwise.

    Returns:
        ``{"exact_match": float, "rougeL": float}``, each in [0, 100] rounded to 4 decimals.

    Raises:
        DataFormatError: lengths differ, there are no instances, a prediction is not a string, or a reference
            is not a non-empty list of strings (the message names the index).
        ConfigError: ``xlingual`` is True and no tokenizer was given, or its directory lacks tokenizer.json.
    """
    _check_instances(predictions, references)
    if xlingual and xlingual_tokenizer is None:
        raise _missing_xlingual_tokenizer("compute_metrics(xlingual=True)")
    tokenizer = xlingual_tokenizer if xlingual else None
    rouge_fn = functools.partial(rouge_l, xlingual_tokenizer=tokenizer)
    em_total, rouge_total = 0, 0.0
    for prediction, gold in zip(predictions, references):
        em_total += metric_max_over_ground_truths(exact_match, prediction, gold)
        rouge_total += metric_max_over_ground_truths(rouge_fn, prediction, gold)
    metrics = {
        "exact_match": 100.0 * em_total / len(references),
        "rougeL": 100.0 * rouge_total / len(references),
    }
    return {name: round(value, 4) for name, value in metrics.items()}


def compute_grouped_metrics(
    predictions: Sequence[str],
    references: Sequence[list[str]],
    groups: Sequence[str],
    xlingual: bool = False,
    xlingual_tokenizer: XlingualTokenizerArg = None,
) -> dict[str, float]:
    """`compute_metrics` restricted to the instances of each group (a task or a category).

    Groups appear in the order of their first instance; within a group, exact_match comes before rougeL.

    Source: ``compute_grouped_metrics`` in allenai/natural-instructions eval/automatic/evaluation.py at commit
    8540acd.

    Example:
        >>> compute_grouped_metrics(["sack", "x", "bag"], [["sack"], ["jar"], ["bag"]], ["t1", "t2", "t1"])
        {'exact_match_for_t1': 100.0, 'rougeL_for_t1': 100.0, 'exact_match_for_t2': 0.0, 'rougeL_for_t2': 0.0}

    Args:
        predictions: one model output per instance.
        references: one list of reference strings per instance.
        groups: one group name per instance.
        xlingual: score ROUGE-L with the xlingual tokenizer.
        xlingual_tokenizer: required when ``xlingual`` is True (see `compute_metrics`).

    Returns:
        ``{f"{metric}_for_{group}": value}`` with values in [0, 100] rounded to 4 decimals.

    Raises:
        DataFormatError: the three sequences differ in length, or an instance is malformed.
        ConfigError: ``xlingual`` is True and no tokenizer was given.
    """
    if not len(predictions) == len(references) == len(groups):
        raise DataFormatError(
            f"{len(predictions)} predictions, {len(references)} references and {len(groups)} groups; give one "
            "group per instance."
        )
    by_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    results: dict[str, float] = {}
    for group, indices in by_group.items():
        group_metrics = compute_metrics(
            [predictions[i] for i in indices],
            [references[i] for i in indices],
            xlingual=xlingual,
            xlingual_tokenizer=xlingual_tokenizer,
        )
        for metric, value in group_metrics.items():
            results[f"{metric}_for_{group}"] = value
    return results


# ------------------------------------------------------------------------------------------------ SuperNI files


def category_key(category: str) -> str:
    """The group name of a task category in result keys: lowercase, words joined by ``_``.

    Example:
        >>> category_key("Textual Entailment")
        'textual_entailment'
    """
    return "_".join(category.lower().split())


class SuperNIResults(dict[str, float]):
    """The official ``all_results`` dict, plus the ids of reference records that had no prediction.

    As a dict it holds exactly the official keys and values (``json.dump(results, indent=2)`` writes the file the
    official ``--output_file`` would); the missing ids are an attribute, never a key. ``dict(results)`` or
    ``results.copy()`` keeps only the official keys.

    Attributes:
        missing_prediction_ids: ids of reference records without a prediction (each scored as ``""``): the
            default track's, then the xlingual track's, each in reference order.
    """

    def __init__(self, metrics: Mapping[str, float], missing_prediction_ids: Sequence[str] = ()) -> None:
        super().__init__(metrics)
        self.missing_prediction_ids: tuple[str, ...] = tuple(missing_prediction_ids)

    @property
    def num_missing_predictions(self) -> int:
        """How many reference records had no prediction."""
        return len(self.missing_prediction_ids)


def _record_id(record: Any, index: int) -> str:
    if not isinstance(record, Mapping):
        raise DataFormatError(f"references[{index}] is {type(record).__name__}, not a mapping (a JSON object).")
    record_id = record.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise DataFormatError(f"references[{index}] has id {record_id!r}; every record needs a non-empty string id.")
    return record_id


def _normalize_reference(record: Mapping[str, Any], record_id: str) -> dict[str, Any]:
    gold = record.get("references")
    if not isinstance(gold, list) or len(gold) == 0 or not all(isinstance(g, str) for g in gold):
        raise DataFormatError(
            f"reference record {record_id!r}: 'references' = {gold!r} must be a non-empty list of strings."
        )
    track = record.get("track", "default")
    if track not in TRACKS:
        raise DataFormatError(f"reference record {record_id!r}: track {track!r} is not one of {list(TRACKS)}.")
    for field in ("task_id", "task_category"):
        if field in record and not isinstance(record[field], str):
            raise DataFormatError(
                f"reference record {record_id!r}: {field} = {record[field]!r} must be a string."
            )
    return {**record, "track": track}


def _validate_references(references: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    records = []
    for index, record in enumerate(references):
        record_id = _record_id(record, index)
        if record_id in seen:
            raise DataFormatError(f"reference record {record_id!r} appears more than once; ids must be unique.")
        seen.add(record_id)
        records.append(_normalize_reference(record, record_id))
    return records


def _validate_predictions(predictions: Mapping[str, str]) -> None:
    for record_id, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise DataFormatError(
                f"prediction for record {record_id!r} is {type(prediction).__name__} {prediction!r}, not str."
            )


def _group_names(records: Sequence[Mapping[str, Any]], field: str) -> list[str] | None:
    """The per-instance group names for ``field``, or None when the track's first record lacks it."""
    if field not in records[0]:
        return None
    for record in records:
        if field not in record:
            raise DataFormatError(
                f"reference record {record['id']!r} has no {field!r}, but the first record of its track "
                f"({records[0]['id']!r}) has one; give every record a {field} or none."
            )
    if field == "task_category":
        return [category_key(record[field]) for record in records]
    return [record[field] for record in records]


def _score_track(
    track: str,
    records: Sequence[Mapping[str, Any]],
    predictions: Mapping[str, str],
    xlingual_tokenizer: XlingualTokenizerArg,
) -> tuple[dict[str, float], list[str]]:
    missing = [record["id"] for record in records if record["id"] not in predictions]
    if missing:
        logger.warning(
            "No prediction for %d instances of the %s track. Use empty string as prediction.", len(missing), track
        )
    preds = [predictions.get(record["id"], "") for record in records]
    golds = [record["references"] for record in records]
    kwargs: dict[str, Any] = {"xlingual": track == "xlingual", "xlingual_tokenizer": xlingual_tokenizer}
    results = {f"{k}_{track}_track": v for k, v in compute_metrics(preds, golds, **kwargs).items()}
    for field in ("task_category", "task_id"):
        groups = _group_names(records, field)
        if groups is not None:
            grouped = compute_grouped_metrics(preds, golds, groups, **kwargs)
            results.update({f"{k}_{track}_track": v for k, v in grouped.items()})
    return results, missing


def score_superni(
    predictions: Mapping[str, str],
    references: Sequence[Mapping[str, Any]],
    xlingual_tokenizer: XlingualTokenizerArg = None,
) -> SuperNIResults:
    """Scores predictions against SuperNI reference records, as the official evaluation script does.

    For each track (``default``, then ``xlingual``; a record without ``track`` is ``default``; a track with no
    records is skipped) the result holds, in this order:

    * ``exact_match_{track}_track`` and ``rougeL_{track}_track`` over all the track's instances;
    * if the track's first record has ``task_category``: ``{metric}_for_{category}_{track}_track`` with
      ``category = "_".join(task_category.lower().split())``, e.g. ``rougeL_for_word_analogy_default_track``;
    * if it has ``task_id``: ``{metric}_for_{task_id}_{track}_track``.

    Every value is a micro average over instances (x100, rounded to 4 decimals; see `compute_metrics`), so a
    category with unequal task sizes is not a mean of its task scores. A reference record with no prediction is
    scored as ``""``; the count is logged (warning) and the ids are returned in
    `SuperNIResults.missing_prediction_ids`, never as a result key. Predictions whose id has no reference record
    are ignored, as in the official script.

    Source: the main block of allenai/natural-instructions eval/automatic/evaluation.py at commit 8540acd.

    Example:
        >>> refs = [{"id": "a", "references": ["sack"], "task_id": "task1", "task_category": "Word Analogy"}]
        >>> dict(score_superni({"a": "Sack."}, refs))  # doctest: +NORMALIZE_WHITESPACE
        {'exact_match_default_track': 100.0, 'rougeL_default_track': 100.0,
         'exact_match_for_word_analogy_default_track': 100.0, 'rougeL_for_word_analogy_default_track': 100.0,
         'exact_match_for_task1_default_track': 100.0, 'rougeL_for_task1_default_track': 100.0}

    Args:
        predictions: record id -> model output (the official ``predictions.jsonl`` as a dict).
        references: reference records ``{"id", "references", "task_id", "task_category", "track"}`` (the
            official ``references.jsonl``); ``task_id``, ``task_category`` and ``track`` are optional.
        xlingual_tokenizer: a GPT-2-style tokenizer directory (or `XlingualTokenizer`); required only when some
            record has ``track == "xlingual"``.

    Returns:
        The official ``all_results`` dict, as a `SuperNIResults` carrying the missing prediction ids.

    Raises:
        DataFormatError: a reference record is malformed or duplicated, or a prediction is not a string (the
            message names the record id). Raised before any scoring.
        ConfigError: an xlingual record is present and ``xlingual_tokenizer`` is None (the message names the
            first such record), or the tokenizer directory has no tokenizer.json.
    """
    records = _validate_references(references)
    _validate_predictions(predictions)
    xlingual_ids = [record["id"] for record in records if record["track"] == "xlingual"]
    if xlingual_ids and xlingual_tokenizer is None:
        raise _missing_xlingual_tokenizer(
            f"reference record {xlingual_ids[0]!r} is on the xlingual track ({len(xlingual_ids)} xlingual records)"
        )
    all_results: dict[str, float] = {}
    all_missing: list[str] = []
    for track in TRACKS:
        track_records = [record for record in records if record["track"] == track]
        if not track_records:
            continue
        results, missing = _score_track(track, track_records, predictions, xlingual_tokenizer)
        all_results.update(results)
        all_missing.extend(missing)
    unused = len(set(predictions) - {record["id"] for record in records})
    if unused:
        logger.info("%d predictions have no reference record and are ignored.", unused)
    return SuperNIResults(all_results, all_missing)
