"""SuperNI evaluation files and reports: official JSONL files, results JSON, Markdown tables, comparisons.

File formats are those of allenai/natural-instructions at commit 8540acd: ``eval/leaderboard/
create_reference_file.py`` writes one reference record per line, ``eval/automatic/evaluation.py`` reads it with
one prediction per line and writes ``json.dump(all_results, indent=2)``. Every write goes to a temporary file in the
target directory, is flushed to disk, then renamed over the target with `os.replace`, so a reader never sees a
partial file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from itune.fileio import atomic_write_text
from itune.errors import DataFormatError
from itune.eval.metrics import METRICS, TRACKS, category_key

PREDICTIONS_FILE = "predictions.jsonl"
"""Official prediction file name: one ``{"id", "prediction"}`` object per line."""

REFERENCES_FILE = "references.jsonl"
"""Official reference file name: one ``{"id", "references", "task_id", "task_category", "track"}`` per line."""

RESULTS_FILE = "results.json"
"""Results file name: the official ``all_results`` dict, ``json.dump(..., indent=2)``."""

_METRIC_LABELS = {"exact_match": "EM", "rougeL": "ROUGE-L"}
_RESULT_KEY_RE = re.compile(r"^(exact_match|rougeL)_(?:for_(.+)_)?(default|xlingual)_track$")
_TASK_NAME_RE = re.compile(r"^task\d+")


@dataclass(frozen=True)
class EvalRecord:
    """One evaluated instance: its references, where it comes from, and the model output.

    Attributes:
        id: the SuperNI instance id, e.g. ``"task1159-1f85921a609441d3b7a93581c1ccd801"``.
        references: the instance's ``output`` list (at least one string).
        task_id: the task name, e.g. ``"task1159_bard_analogical_reasoning_containers"``.
        task_category: the task's first category, e.g. ``"Word Analogy"``.
        track: ``"default"`` (English) or ``"xlingual"``.
        prediction: the model output, or None when there is none (no prediction line is written, and scoring
            counts the instance as missing, scored as ``""``).
    """

    id: str
    references: tuple[str, ...]
    task_id: str
    task_category: str
    track: str = "default"
    prediction: str | None = None


RecordLike = Union[EvalRecord, Mapping[str, Any]]
"""An `EvalRecord` or a mapping with the same field names (``track`` and ``prediction`` optional)."""


# ------------------------------------------------------------------------------------------------ atomic writes


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# ------------------------------------------------------------------------------------------ official JSONL files


def _field(record: RecordLike, name: str, index: int) -> Any:
    if isinstance(record, EvalRecord):
        return getattr(record, name)
    if not isinstance(record, Mapping):
        raise DataFormatError(f"records[{index}] is {type(record).__name__}, not an EvalRecord or a mapping.")
    if name == "track":
        return record.get("track", "default")
    if name == "prediction":
        return record.get("prediction")
    if name not in record:
        raise DataFormatError(f"records[{index}] (id {record.get('id')!r}) has no {name!r} field.")
    return record[name]


def _to_eval_record(record: RecordLike, index: int) -> EvalRecord:
    record_id = _field(record, "id", index)
    if not isinstance(record_id, str) or not record_id:
        raise DataFormatError(f"records[{index}] has id {record_id!r}; every record needs a non-empty string id.")
    where = f"record {record_id!r}"
    references = _field(record, "references", index)
    if (
        not isinstance(references, (list, tuple))
        or len(references) == 0
        or not all(isinstance(r, str) for r in references)
    ):
        raise DataFormatError(f"{where}: references = {references!r} must be a non-empty list of strings.")
    for name in ("task_id", "task_category"):
        value = _field(record, name, index)
        if not isinstance(value, str) or not value:
            raise DataFormatError(f"{where}: {name} = {value!r} must be a non-empty string.")
    track = _field(record, "track", index)
    if track not in TRACKS:
        raise DataFormatError(f"{where}: track {track!r} is not one of {list(TRACKS)}.")
    prediction = _field(record, "prediction", index)
    if prediction is not None and not isinstance(prediction, str):
        raise DataFormatError(f"{where}: prediction {prediction!r} must be a string or None.")
    return EvalRecord(
        id=record_id,
        references=tuple(references),
        task_id=_field(record, "task_id", index),
        task_category=_field(record, "task_category", index),
        track=track,
        prediction=prediction,
    )


def _validated_records(records: Iterable[RecordLike]) -> list[EvalRecord]:
    validated: list[EvalRecord] = []
    seen: set[str] = set()
    for index, record in enumerate(records):
        eval_record = _to_eval_record(record, index)
        if eval_record.id in seen:
            raise DataFormatError(f"record {eval_record.id!r} appears more than once; ids must be unique.")
        seen.add(eval_record.id)
        validated.append(eval_record)
    return validated


def write_official_files(out_dir: str | os.PathLike[str], records: Iterable[RecordLike]) -> tuple[Path, Path]:
    """Writes ``predictions.jsonl`` and ``references.jsonl`` in the official SuperNI formats.

    ``references.jsonl`` gets one ``{"id", "references", "task_id", "task_category", "track"}`` line per record
    (as ``eval/leaderboard/create_reference_file.py`` at 8540acd writes it); ``predictions.jsonl`` gets one
    ``{"id", "prediction"}`` line per record whose prediction is not None (the format
    ``eval/automatic/evaluation.py`` at 8540acd reads). Every record is validated before anything is written;
    each file is then replaced atomically (references first, predictions second).

    Example:
        ``EvalRecord("task1159-1f85", ("sack",), "task1159_bard", "Word Analogy", "default", "sack")`` writes
        ``{"id": "task1159-1f85", "prediction": "sack"}`` and ``{"id": "task1159-1f85", "references": ["sack"],
        "task_id": "task1159_bard", "task_category": "Word Analogy", "track": "default"}``.

    Args:
        out_dir: the directory to write into (created if needed).
        records: `EvalRecord` objects or mappings with the same field names, in output order.

    Returns:
        ``(predictions_path, references_path)``.

    Raises:
        DataFormatError: a record is malformed or an id repeats (the message names the record id); nothing is
            written in that case.
    """
    validated = _validated_records(records)
    out = Path(out_dir)
    references_path = out / REFERENCES_FILE
    predictions_path = out / PREDICTIONS_FILE
    reference_rows = (
        {
            "id": r.id,
            "references": list(r.references),
            "task_id": r.task_id,
            "task_category": r.task_category,
            "track": r.track,
        }
        for r in validated
    )
    prediction_rows = ({"id": r.id, "prediction": r.prediction} for r in validated if r.prediction is not None)
    atomic_write_text(references_path, _jsonl(reference_rows))
    atomic_write_text(predictions_path, _jsonl(prediction_rows))
    return predictions_path, references_path


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """Yields ``(line_number, object)`` for every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{line_number}: not valid JSON ({error.msg}).") from error
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}.")
            yield line_number, row


def _row_id(path: Path, line_number: int, row: Mapping[str, Any], seen: set[str]) -> str:
    row_id = row.get("id")
    if not isinstance(row_id, str) or not row_id:
        raise DataFormatError(f"{path}:{line_number}: id {row_id!r} must be a non-empty string.")
    if row_id in seen:
        raise DataFormatError(f"{path}:{line_number}: id {row_id!r} appears more than once.")
    seen.add(row_id)
    return row_id


def read_predictions(path: str | os.PathLike[str]) -> dict[str, str]:
    """Reads an official ``predictions.jsonl`` into ``{id: prediction}``.

    Args:
        path: the JSONL file.

    Returns:
        Record id -> prediction, in file order.

    Raises:
        DataFormatError: a line is not a JSON object, an id is missing or repeated, or a prediction is not a
            string (the message gives file, line and id).
    """
    path = Path(path)
    predictions: dict[str, str] = {}
    seen: set[str] = set()
    for line_number, row in _read_jsonl(path):
        row_id = _row_id(path, line_number, row, seen)
        prediction = row.get("prediction")
        if not isinstance(prediction, str):
            raise DataFormatError(
                f"{path}:{line_number}: record {row_id!r} has prediction {prediction!r}; it must be a string."
            )
        predictions[row_id] = prediction
    return predictions


def read_references(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads an official ``references.jsonl`` into a list of reference records.

    Records are returned as written (a record without ``track`` keeps none; scoring treats it as default).

    Args:
        path: the JSONL file.

    Returns:
        The records, in file order.

    Raises:
        DataFormatError: a line is not a JSON object, an id is missing or repeated, or ``references`` is not a
            non-empty list of strings (the message gives file, line and id).
    """
    path = Path(path)
    references: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line_number, row in _read_jsonl(path):
        row_id = _row_id(path, line_number, row, seen)
        gold = row.get("references")
        if not isinstance(gold, list) or len(gold) == 0 or not all(isinstance(g, str) for g in gold):
            raise DataFormatError(
                f"{path}:{line_number}: record {row_id!r} has references {gold!r}; it must be a non-empty list "
                "of strings."
            )
        references.append(row)
    return references


def read_official_files(out_dir: str | os.PathLike[str]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Reads the ``predictions.jsonl`` and ``references.jsonl`` that `write_official_files` wrote.

    The result is exactly the input of `itune.eval.metrics.score_superni`.

    Args:
        out_dir: the directory holding both files.

    Returns:
        ``(predictions, references)``: ``{id: prediction}`` and the list of reference records.

    Raises:
        FileNotFoundError: a file is missing.
        DataFormatError: a file is malformed (see `read_predictions`, `read_references`).
    """
    out = Path(out_dir)
    return read_predictions(out / PREDICTIONS_FILE), read_references(out / REFERENCES_FILE)


# ------------------------------------------------------------------------------------------------- results JSON


def write_results(path: str | os.PathLike[str], results: Mapping[str, float]) -> Path:
    """Writes results as the official ``--output_file`` does: ``json.dump(all_results, indent=2)``, atomically.

    Only the mapping's keys are written (a `SuperNIResults` attribute such as the missing ids is not).

    Args:
        path: the results file, e.g. ``<run>/results.json``.
        results: metric key -> value.

    Returns:
        The path written.
    """
    path = Path(path)
    atomic_write_text(path, json.dumps(dict(results), indent=2))
    return path


def read_results(path: str | os.PathLike[str]) -> dict[str, float]:
    """Reads a results file written by `write_results` (or by the official script).

    Raises:
        DataFormatError: the file is not a JSON object of numbers.
    """
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}: not valid JSON ({error.msg}).") from error
    if not isinstance(results, dict):
        raise DataFormatError(f"{path}: expected a JSON object of metric -> value, got {type(results).__name__}.")
    for key, value in results.items():
        _number(value, f"{path}: {key!r}")
    return results


# ---------------------------------------------------------------------------------------------------- Markdown


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataFormatError(f"{where} = {value!r} is not a finite number.")
    return float(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _group_levels(records: Iterable[RecordLike]) -> dict[str, str]:
    """Group name in result keys -> ``"task"`` or ``"category"``, from the records' ``task_id`` and
    ``task_category`` (as `itune.eval.metrics.score_superni` names groups). A name that is both a task id and a
    category key is a task: its task key was written last, so the value is the task's."""
    levels: dict[str, str] = {}
    for index, record in enumerate(records):
        for name, level in (("task_category", "category"), ("task_id", "task")):
            if isinstance(record, EvalRecord):
                value = getattr(record, name)
            elif isinstance(record, Mapping):
                value = record.get(name)
            else:
                raise DataFormatError(f"records[{index}] is {type(record).__name__}, not an EvalRecord or a mapping.")
            if isinstance(value, str) and value:
                group = category_key(value) if level == "category" else value
                if level == "task" or group not in levels:
                    levels[group] = level
    return levels


def _parse_result_key(key: str, levels: Mapping[str, str] | None = None) -> tuple[str, str, str, str]:
    """Splits an official result key into ``(track, level, name, metric)``; level is overall/category/task.

    ``levels`` (from `_group_levels`) labels a group; without it a name starting with ``task<digits>`` is a task.
    """
    match = _RESULT_KEY_RE.match(key)
    if match is None:
        raise DataFormatError(
            f"result key {key!r} is not an official SuperNI key ({{metric}}_{{track}}_track or "
            "{metric}_for_{group}_{track}_track)."
        )
    metric, group, track = match.groups()
    if group is None:
        return track, "overall", "all", metric
    if levels is None:
        level = "task" if _TASK_NAME_RE.match(group) else "category"
    elif group in levels:
        level = levels[group]
    else:
        raise DataFormatError(
            f"result key {key!r} names group {group!r}, which is neither a task_id nor a task category of the "
            "records given; pass the records these results were scored from."
        )
    return track, level, group, metric


def markdown_table(results: Mapping[str, float], records: Iterable[RecordLike] | None = None) -> str:
    """Renders SuperNI results as a Markdown table with EM and ROUGE-L columns.

    One row per track and group: for each track present (default, then xlingual) the overall row, then the
    category rows, then the task rows, each sorted by name. A group is a task when it is the ``task_id`` of one of
    ``records``, a category when it is the category key of one of their ``task_category`` values (a name that is
    both is a task); without ``records`` a group whose name starts with ``task<digits>`` is a task (SuperNI
    naming). Values are printed with 4 decimals; a metric absent for a row shows ``-``.

    Example:
        ``{"exact_match_default_track": 50.0, "rougeL_default_track": 86.1111}`` renders as::

            | Track | Level | Name | EM | ROUGE-L |
            |---|---|---|---:|---:|
            | default | overall | all | 50.0000 | 86.1111 |

    Args:
        results: the official results dict (e.g. from `itune.eval.metrics.score_superni`).
        records: the evaluated instances the results were scored from: `EvalRecord` objects or mappings with
            ``task_id`` and ``task_category`` (reference records, ``references.jsonl`` rows or eval records).

    Returns:
        The table, ending with a newline.

    Raises:
        DataFormatError: a key is not an official result key, a value is not a finite number, or (with
            ``records``) a group is neither a task id nor a category of the records.
    """
    levels = None if records is None else _group_levels(records)
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for key, value in results.items():
        track, level, name, metric = _parse_result_key(key, levels)
        rows.setdefault((track, level, name), {})[metric] = _number(value, f"result {key!r}")
    track_order = {track: i for i, track in enumerate(TRACKS)}
    level_order = {"overall": 0, "category": 1, "task": 2}
    ordered = sorted(rows, key=lambda row: (track_order[row[0]], level_order[row[1]], row[2]))
    lines = [
        "| Track | Level | Name | " + " | ".join(_METRIC_LABELS[m] for m in METRICS) + " |",
        "|---|---|---|" + "---:|" * len(METRICS),
    ]
    for track, level, name in ordered:
        values = " | ".join(_fmt(rows[(track, level, name)].get(m)) for m in METRICS)
        lines.append(f"| {track} | {level} | {_cell(name)} | {values} |")
    return "\n".join(lines) + "\n"


def compare_results(
    a: Mapping[str, float], b: Mapping[str, float], label_a: str = "a", label_b: str = "b"
) -> str:
    """Renders two results dicts side by side with the difference ``b - a``, as a Markdown table.

    One row per key present in both, in ``a``'s order; values with 4 decimals, the delta rounded to 4
    decimals with an explicit sign. Keys found in only one of the two are counted in a note below the table.

    Example:
        ``compare_results({"rougeL_default_track": 40.0}, {"rougeL_default_track": 42.5}, "base", "tuned")``::

            | Metric | base | tuned | Delta (tuned - base) |
            |---|---:|---:|---:|
            | rougeL_default_track | 40.0000 | 42.5000 | +2.5000 |

    Args:
        a: the baseline results.
        b: the results compared with the baseline.
        label_a: column header for ``a``.
        label_b: column header for ``b``.

    Returns:
        The table (and the note, if any), ending with a newline.

    Raises:
        DataFormatError: a shared key's value is not a finite number.
    """
    la, lb = _cell(label_a), _cell(label_b)
    lines = [f"| Metric | {la} | {lb} | Delta ({lb} - {la}) |", "|---|---:|---:|---:|"]
    for key in a:
        if key not in b:
            continue
        value_a = _number(a[key], f"{label_a} {key!r}")
        value_b = _number(b[key], f"{label_b} {key!r}")
        delta = round(value_b - value_a, 4) + 0.0  # + 0.0 turns -0.0 into 0.0
        lines.append(f"| {_cell(key)} | {value_a:.4f} | {value_b:.4f} | {delta:+.4f} |")
    only_a = sum(1 for key in a if key not in b)
    only_b = sum(1 for key in b if key not in a)
    if only_a or only_b:
        lines.append("")
        lines.append(f"Not compared: {only_a} keys only in {la}, {only_b} keys only in {lb}.")
    return "\n".join(lines) + "\n"
