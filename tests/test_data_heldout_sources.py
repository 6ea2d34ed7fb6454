"""Held-out tasks from any source format: examples whose --task-field value is named go to split 'test' with
evaluation instances rendered by the training renderer; none of them reaches 'train'."""

import json

import pytest

from itune.data.prepare import SourcesOptions, prepare_sources
from itune.data.render import render_prompt
from itune.data.sources import read_source
from itune.data.tokenizer import TextTokenizer
from itune.errors import ConfigError
from itune.eval.run import load_eval_records
from tests.conftest import MISTRAL


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_heldout_split_by_field(tmp_path):
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w, "category": c}
            for c, words in (("greet", ["hi", "hello", "hey"]), ("count", ["one", "two"]), ("spell", ["a", "b"]))
            for w in words]
    rows.append({"instruction": "Bad.", "input": "", "output": "", "category": "greet"})  # empty output
    f = _write(tmp_path / "mix.jsonl", rows)
    m = prepare_sources(SourcesOptions([f], MISTRAL, tmp_path / "out", seq_len=128, on_error="skip",
                                       task_field="category", heldout_tasks=["count", "spell"]))
    assert m["heldout_tasks"] == ["count", "spell"]
    tr, te = m["splits"]["train"], m["splits"]["test"]
    assert tr["tasks"] == ["greet"] and te["tasks"] == ["count", "spell"]
    assert tr["counts"] == {"read": 4, "written": 3, "rejected": {"empty_assistant": 1}}
    assert te["counts"] == {"read": 4, "written": 4, "rejected": {}}
    assert tr["counts"]["read"] + te["counts"]["read"] == 8  # every input line is accounted for
    recs = load_eval_records(tmp_path / "out", "test")
    assert [(r["task_id"], r["references"]) for r in recs] == [
        ("count", ["one"]), ("count", ["two"]), ("spell", ["a"]), ("spell", ["b"])]
    tok = TextTokenizer.load(MISTRAL)
    examples = [e for e, _, _ in read_source(f, "alpaca", task_field="category") if e and e.task == "count"]
    assert recs[0]["prompt_ids"] == render_prompt(examples[0], tok, "alpaca")


def test_heldout_needs_task_field_and_existing_tasks(tmp_path):
    f = _write(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c", "task": "t1"}])
    with pytest.raises(ConfigError, match="need --task-field"):
        prepare_sources(SourcesOptions([f], MISTRAL, tmp_path / "o1", seq_len=64, heldout_tasks=["t1"]))
    with pytest.raises(ConfigError, match=r"held-out tasks \['t9'\] have no example"):
        prepare_sources(SourcesOptions([f], MISTRAL, tmp_path / "o2", seq_len=64, task_field="task",
                                       heldout_tasks=["t9"]))
