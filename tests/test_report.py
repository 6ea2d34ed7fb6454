"""itune-report: the plotted numbers (report.png.json) come from the run's metrics, losses and eval results; the
PNG decodes; a directory that is not a run is one line."""

import json

import matplotlib.image

from itune.report import main


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_report_data_and_png(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _write(run / "metrics.jsonl", [
        {"kind": "train", "step": 1, "loss": 3.0, "lr": 0.1, "real_tokens_per_s": 10.0, "memory_gb": 1.0},
        {"kind": "train", "step": 2, "loss": float("nan"), "lr": 0.1, "real_tokens_per_s": 11.0, "memory_gb": 1.5},
        {"kind": "heldout", "step": 2, "loss": 2.5},
        {"kind": "train", "step": 3, "loss": 2.0, "lr": 0.05, "real_tokens_per_s": 12.0, "memory_gb": 1.5}])
    _write(run / "losses.jsonl", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": None, "skipped": True},
                                  {"step": 3, "loss": 2.0}])
    evals = []
    for name, score in (("untrained", 0.0), ("trained", 50.0)):
        d = tmp_path / name
        d.mkdir()
        _write(d / "references.jsonl", [{"id": "a", "task_id": "task1_x", "task_category": "Word Analogy",
                                         "references": ["b"], "track": "default"}])
        (d / "results.json").write_text(json.dumps({"results": {
            "rougeL_default_track": score, "exact_match_default_track": score / 2,
            "rougeL_for_task1_x_default_track": score, "exact_match_for_task1_x_default_track": score / 2,
            "rougeL_for_word_analogy_default_track": score, "exact_match_for_word_analogy_default_track": 0.0}}))
        evals += ["--eval", str(d)]
    out = tmp_path / "r" / "report.png"
    assert main([str(run), *evals, "--out", str(out)]) == 0
    data = json.loads((tmp_path / "r" / "report.png.json").read_text())
    t = data["train"]
    assert t["steps"] == [1, 2, 3] and t["lr"] == [0.1, 0.1, 0.05] and t["memory_gb"] == [1.0, 1.5, 1.5]
    assert t["heldout"] == {"steps": [2], "loss": [2.5]} and t["skipped"] == [2]
    assert [(e["name"], e["rougeL"], e["tasks"], e["categories"]) for e in data["evals"]] == [
        ("untrained", 0.0, {"task1_x": {"rougeL": 0.0, "exact_match": 0.0}},
         {"Word Analogy": {"rougeL": 0.0, "exact_match": 0.0}}),
        ("trained", 50.0, {"task1_x": {"rougeL": 50.0, "exact_match": 25.0}},
         {"Word Analogy": {"rougeL": 50.0, "exact_match": 0.0}})]
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 500 and img.shape[1] > 1000
    assert f"wrote {out}" in capsys.readouterr().out


def test_not_a_run_dir(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: no metrics.jsonl (give the output_dir of a training run)\n"
