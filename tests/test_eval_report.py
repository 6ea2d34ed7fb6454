"""SuperNI files and reports (itune.eval.report): exact file contents, round trips, tables, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from itune.errors import DataFormatError
from itune.eval import report
from itune.eval.metrics import score_superni
from itune.eval.report import (
    EvalRecord,
    compare_results,
    markdown_table,
    read_official_files,
    read_predictions,
    read_references,
    read_results,
    write_official_files,
    write_results,
)


def _records() -> list:
    return [
        EvalRecord("task1159-a", ("sack",), "task1159_bard", "Word Analogy", "default", "sack"),
        # A mapping without track (-> default) and without a prediction (-> no prediction line).
        {
            "id": "task1159-b",
            "references": ["jug", "bottle"],
            "task_id": "task1159_bard",
            "task_category": "Word Analogy",
        },
        {
            "id": "task9001-c",
            "references": ["Khloé"],
            "task_id": "task9001_names",
            "task_category": "Named Entity Recognition",
            "track": "xlingual",
            "prediction": "Khloé “K”",
        },
    ]


def test_write_official_files_exact_contents(tmp_path):
    predictions_path, references_path = write_official_files(tmp_path / "eval", _records())
    assert predictions_path == tmp_path / "eval" / "predictions.jsonl"
    assert references_path == tmp_path / "eval" / "references.jsonl"
    assert predictions_path.read_text(encoding="utf-8") == (
        '{"id": "task1159-a", "prediction": "sack"}\n'
        '{"id": "task9001-c", "prediction": "Khloé “K”"}\n'
    )
    assert references_path.read_text(encoding="utf-8") == (
        '{"id": "task1159-a", "references": ["sack"], "task_id": "task1159_bard", '
        '"task_category": "Word Analogy", "track": "default"}\n'
        '{"id": "task1159-b", "references": ["jug", "bottle"], "task_id": "task1159_bard", '
        '"task_category": "Word Analogy", "track": "default"}\n'
        '{"id": "task9001-c", "references": ["Khloé"], "task_id": "task9001_names", '
        '"task_category": "Named Entity Recognition", "track": "xlingual"}\n'
    )
    # Atomic writes leave no temporary files behind.
    assert sorted(os.listdir(tmp_path / "eval")) == ["predictions.jsonl", "references.jsonl"]


def test_official_files_round_trip(tmp_path):
    write_official_files(tmp_path, _records())
    predictions, references = read_official_files(tmp_path)
    assert predictions == {"task1159-a": "sack", "task9001-c": "Khloé “K”"}
    assert references == [
        {
            "id": "task1159-a",
            "references": ["sack"],
            "task_id": "task1159_bard",
            "task_category": "Word Analogy",
            "track": "default",
        },
        {
            "id": "task1159-b",
            "references": ["jug", "bottle"],
            "task_id": "task1159_bard",
            "task_category": "Word Analogy",
            "track": "default",
        },
        {
            "id": "task9001-c",
            "references": ["Khloé"],
            "task_id": "task9001_names",
            "task_category": "Named Entity Recognition",
            "track": "xlingual",
        },
    ]


def test_round_trip_scores_missing_prediction_as_empty(tmp_path):
    write_official_files(tmp_path, _records()[:2])
    results = score_superni(*read_official_files(tmp_path))
    # task1159-a: EM 1, RL 1; task1159-b has no prediction line -> "" -> EM 0, RL 0. 100 * 1/2 = 50.0.
    assert results["exact_match_default_track"] == 50.0
    assert results["rougeL_default_track"] == 50.0
    assert results.missing_prediction_ids == ("task1159-b",)


def test_invalid_record_writes_nothing(tmp_path):
    write_official_files(tmp_path, _records())
    before = {name: (tmp_path / name).read_text(encoding="utf-8") for name in os.listdir(tmp_path)}
    bad = _records() + [{"id": "task1159-z", "references": ["box"], "task_category": "Word Analogy"}]
    with pytest.raises(DataFormatError, match=r"records\[3\] \(id 'task1159-z'\) has no 'task_id'"):
        write_official_files(tmp_path, bad)
    with pytest.raises(DataFormatError, match="'task1159-a' appears more than once"):
        write_official_files(tmp_path, _records() + _records()[:1])
    with pytest.raises(DataFormatError, match="record 'task1159-y': track 'English'"):
        write_official_files(tmp_path, [EvalRecord("task1159-y", ("x",), "t", "C", "English", "x")])
    with pytest.raises(DataFormatError, match="record 'task1159-y': references = \\(\\)"):
        write_official_files(tmp_path, [EvalRecord("task1159-y", (), "t", "C")])
    after = {name: (tmp_path / name).read_text(encoding="utf-8") for name in os.listdir(tmp_path)}
    assert after == before


def test_failed_replace_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = write_results(tmp_path / "results.json", {"rougeL_default_track": 1.0})
    old = path.read_text(encoding="utf-8")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_results(path, {"rougeL_default_track": 2.0})
    assert path.read_text(encoding="utf-8") == old
    assert os.listdir(tmp_path) == ["results.json"]


def test_read_errors_name_file_line_and_id(tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", "prediction": \n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"predictions.jsonl:2: not valid JSON"):
        read_predictions(predictions)
    predictions.write_text('{"id": "a", "prediction": "x"}\n{"id": "a", "prediction": "y"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"predictions.jsonl:2: id 'a' appears more than once"):
        read_predictions(predictions)
    predictions.write_text('{"id": "a", "prediction": null}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"predictions.jsonl:1: record 'a' has prediction None"):
        read_predictions(predictions)
    references = tmp_path / "references.jsonl"
    references.write_text('\n{"id": "a", "references": "sack"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"references.jsonl:2: record 'a' has references 'sack'"):
        read_references(references)


def test_reference_without_track_reads_as_written(tmp_path):
    references = tmp_path / "references.jsonl"
    references.write_text('{"id": "a", "references": ["jar"]}\n', encoding="utf-8")
    assert read_references(references) == [{"id": "a", "references": ["jar"]}]


def test_results_file_is_the_official_json_dump(tmp_path):
    refs = [{"id": "a", "references": ["sack"]}, {"id": "b", "references": ["bag"]}]
    results = score_superni({"a": "sack"}, refs)
    path = write_results(tmp_path / "run" / "results.json", results)
    assert path.read_text(encoding="utf-8") == json.dumps(
        {"exact_match_default_track": 50.0, "rougeL_default_track": 50.0}, indent=2
    )
    assert read_results(path) == {"exact_match_default_track": 50.0, "rougeL_default_track": 50.0}
    path.write_text('{"rougeL_default_track": "high"}', encoding="utf-8")
    with pytest.raises(DataFormatError, match="'rougeL_default_track' = 'high' is not a finite number"):
        read_results(path)


# ---------------------------------------------------------------------------------------------------- Markdown


def test_markdown_table_rows_and_columns():
    results = {
        "exact_match_default_track": 42.8571,
        "rougeL_default_track": 73.8095,
        "exact_match_for_word_analogy_default_track": 42.8571,
        "rougeL_for_word_analogy_default_track": 73.8095,
        "exact_match_for_textual_entailment_default_track": 25.0,
        "rougeL_for_textual_entailment_default_track": 25.0,
        "exact_match_for_task1159_bard_default_track": 42.8571,
        "rougeL_for_task1159_bard_default_track": 73.8095,
        "exact_match_for_task001_small_default_track": 100.0,
        "rougeL_for_task001_small_default_track": 100.0,
        "exact_match_xlingual_track": 50.0,
        "rougeL_xlingual_track": 75.0,
    }
    assert markdown_table(results) == (
        "| Track | Level | Name | EM | ROUGE-L |\n"
        "|---|---|---|---:|---:|\n"
        "| default | overall | all | 42.8571 | 73.8095 |\n"
        "| default | category | textual_entailment | 25.0000 | 25.0000 |\n"
        "| default | category | word_analogy | 42.8571 | 73.8095 |\n"
        "| default | task | task001_small | 100.0000 | 100.0000 |\n"
        "| default | task | task1159_bard | 42.8571 | 73.8095 |\n"
        "| xlingual | overall | all | 50.0000 | 75.0000 |\n"
    )


def test_markdown_table_of_scored_results_and_missing_metric():
    refs = [{"id": "a", "references": ["sack"], "task_id": "task1_x", "task_category": "Word Analogy"}]
    # "a sack" vs "sack": EM 0; [a, sack] vs [sack]: LCS 1, P 1/2, R 1, F 2/3 -> 66.6667.
    table = markdown_table(score_superni({"a": "a sack"}, refs))
    assert table.splitlines()[2:] == [
        "| default | overall | all | 0.0000 | 66.6667 |",
        "| default | category | word_analogy | 0.0000 | 66.6667 |",
        "| default | task | task1_x | 0.0000 | 66.6667 |",
    ]
    assert markdown_table({"rougeL_default_track": 12.5}).splitlines()[2] == "| default | overall | all | - | 12.5000 |"


def test_markdown_table_labels_tasks_and_categories_from_the_records():
    refs = [
        {"id": "g1", "references": ["He goes."], "task_id": "Grammarly", "task_category": "Grammar Error Correction"},
        {"id": "g2", "references": ["They go."], "task_id": "Grammarly", "task_category": "Grammar Error Correction"},
        {"id": "t1", "references": ["sack"], "task_id": "task1159_bard", "task_category": "Word Analogy"},
    ]
    scores = score_superni({"g1": "He goes.", "g2": "", "t1": "sack"}, refs)
    assert list(scores) == [  # the official keys, unchanged
        "exact_match_default_track", "rougeL_default_track",
        "exact_match_for_grammar_error_correction_default_track", "rougeL_for_grammar_error_correction_default_track",
        "exact_match_for_word_analogy_default_track", "rougeL_for_word_analogy_default_track",
        "exact_match_for_Grammarly_default_track", "rougeL_for_Grammarly_default_track",
        "exact_match_for_task1159_bard_default_track", "rougeL_for_task1159_bard_default_track",
    ]
    expected = (
        "| Track | Level | Name | EM | ROUGE-L |\n"
        "|---|---|---|---:|---:|\n"
        "| default | overall | all | 66.6667 | 66.6667 |\n"
        "| default | category | grammar_error_correction | 50.0000 | 50.0000 |\n"
        "| default | category | word_analogy | 100.0000 | 100.0000 |\n"
        "| default | task | Grammarly | 50.0000 | 50.0000 |\n"
        "| default | task | task1159_bard | 100.0000 | 100.0000 |\n"
    )
    assert markdown_table(dict(scores), refs) == expected
    as_records = [EvalRecord(r["id"], tuple(r["references"]), r["task_id"], r["task_category"]) for r in refs]
    assert markdown_table(dict(scores), as_records) == expected
    # a task whose id equals a category key has one result key (the task's, written last): a task row
    same = [{"id": "q", "references": ["a"], "task_id": "qa", "task_category": "QA"}]
    assert markdown_table(dict(score_superni({"q": "a"}, same)), same).splitlines()[2:] == [
        "| default | overall | all | 100.0000 | 100.0000 |",
        "| default | task | qa | 100.0000 | 100.0000 |",
    ]


def test_markdown_table_refuses_a_group_the_records_do_not_name():
    refs = [{"id": "g1", "references": ["x"], "task_id": "Grammarly", "task_category": "Grammar Error Correction"}]
    with pytest.raises(DataFormatError) as error:
        markdown_table({"rougeL_for_task1_x_default_track": 1.0}, refs)
    assert str(error.value) == (
        "result key 'rougeL_for_task1_x_default_track' names group 'task1_x', which is neither a task_id nor a task "
        "category of the records given; pass the records these results were scored from."
    )


def test_markdown_table_rejects_unknown_keys():
    with pytest.raises(DataFormatError, match="result key 'accuracy' is not an official SuperNI key"):
        markdown_table({"accuracy": 1.0})


def test_compare_results_side_by_side_with_delta():
    a = {
        "exact_match_default_track": 33.3333,
        "rougeL_default_track": 55.5556,
        "exact_match_for_task1_default_track": 50.0,
        "rougeL_for_task1_default_track": 0.1 + 0.2,  # 0.30000000000000004
        "only_in_a": 1.0,
    }
    b = {
        "rougeL_default_track": 50.0,
        "exact_match_default_track": 55.5556,
        "exact_match_for_task1_default_track": 50.0,
        "rougeL_for_task1_default_track": 0.3,
        "only_in_b_1": 2.0,
        "only_in_b_2": 3.0,
    }
    # Deltas: 55.5556 - 33.3333 = +22.2223; 50.0 - 55.5556 = -5.5556; 50 - 50 = 0;
    # 0.3 - 0.30000000000000004 = -5.6e-17 -> rounds to -0.0, printed as +0.0000.
    assert compare_results(a, b, "base", "tuned") == (
        "| Metric | base | tuned | Delta (tuned - base) |\n"
        "|---|---:|---:|---:|\n"
        "| exact_match_default_track | 33.3333 | 55.5556 | +22.2223 |\n"
        "| rougeL_default_track | 55.5556 | 50.0000 | -5.5556 |\n"
        "| exact_match_for_task1_default_track | 50.0000 | 50.0000 | +0.0000 |\n"
        "| rougeL_for_task1_default_track | 0.3000 | 0.3000 | +0.0000 |\n"
        "\n"
        "Not compared: 1 keys only in base, 2 keys only in tuned.\n"
    )


def test_compare_results_escapes_labels_and_checks_values():
    table = compare_results({"k": 1.0}, {"k": 2.0}, "run|1", "run|2")
    assert table.splitlines()[0] == "| Metric | run\\|1 | run\\|2 | Delta (run\\|2 - run\\|1) |"
    assert table.splitlines()[2] == "| k | 1.0000 | 2.0000 | +1.0000 |"
    with pytest.raises(DataFormatError, match="run2 'k' = None is not a finite number"):
        compare_results({"k": 1.0}, {"k": None}, "run1", "run2")


def test_compare_cli_stops_quietly_when_its_reader_closes_the_pipe(tmp_path):
    """``itune-eval --compare A B | head -4`` (as in the demo script, under ``set -o pipefail``): when the reader
    has gone, the command exits 0 without a traceback instead of failing with BrokenPipeError."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    paths = []
    for name, v in (("a", 1.0), ("b", 2.0)):
        p = tmp_path / name / "results.json"
        p.parent.mkdir()
        report.write_results(p, {f"rougeL_for_task{i:05d}_default_track": v for i in range(3000)})
        paths.append(str(p))
    exe = shutil.which("itune-eval", path=str(Path(sys.executable).parent)) or "itune-eval"
    full = subprocess.run([exe, "--compare", *paths], capture_output=True, text=True, timeout=120)
    assert full.returncode == 0 and len(full.stdout) > 200_000  # more than any pipe buffer holds
    proc = subprocess.Popen([exe, "--compare", *paths], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""
