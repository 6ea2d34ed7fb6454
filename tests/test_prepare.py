"""itune-data prepare on the real SuperNI subset: counts reconcile with the task files; bad input is reported."""

import json
from pathlib import Path

import pytest

from itune.data.prepare import PrepareOptions, prepare_superni
from itune.data.shards import open_split, read_manifest, verify, write_manifest
from itune.errors import ConfigError, DataFormatError
from tests.conftest import MISTRAL, SUPERNI


def _task_counts(split):
    names = (SUPERNI / "splits" / f"{split}_tasks.txt").read_text().split()
    return {n: len(json.loads((SUPERNI / "tasks" / f"{n}.json").read_text())["Instances"]) for n in names}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("superni") / "data"
    m = prepare_superni(PrepareOptions(SUPERNI, MISTRAL, out, seq_len=512))
    return out, m


def test_counts_reconcile_with_task_files(prepared):
    out, m = prepared
    train, test = _task_counts("train"), _task_counts("test")
    assert sum(train.values()) == 322 and sum(test.values()) == 529
    for split, counts in (("train", train), ("test", test)):
        info = m["splits"][split]
        c = info["counts"]
        assert c["read"] == sum(counts.values())
        assert c["read"] == c["written"] + sum(c["rejected"].values())
        assert info["examples_per_task"] == counts  # nothing rejected in this subset
        assert info["tasks"] == list(counts)
    assert m["heldout_tasks"] == list(test)
    assert verify(out) == []


def test_rows_layout(prepared):
    out, m = prepared
    t = open_split(out, "train")
    assert t.num_rows == m["splits"]["train"]["rows"]
    tokens = 0
    for r in range(t.num_rows):
        ids, labels, pos = (t[c][r].as_py() for c in ("input_ids", "labels", "position_ids"))
        lens = t["example_lengths"][r].as_py()
        assert len(ids) == len(labels) == len(pos) == 512
        start = 0
        for n in lens:  # every example starts with BOS at position 0, untrained, and ends with a trained EOS
            assert ids[start] == 1 and pos[start] == 0 and labels[start] == -100
            assert pos[start:start + n] == list(range(n))
            assert labels[start + n - 1] == ids[start + n - 1] == 2
            start += n
        assert all(x == -100 for x in labels[start:])  # padding is never trained
        assert pos[start:] == list(range(512 - start))  # the padding tail counts from 0 too
        tokens += start
    assert tokens == m["splits"]["train"]["tokens"]
    assert m["splits"]["train"]["packing_efficiency"] == round(tokens / (512 * t.num_rows), 6)


def test_eval_instances_first_100_per_task(prepared):
    out, m = prepared
    recs = [json.loads(x) for x in (out / "test_eval.jsonl").read_text().splitlines()]
    assert len(recs) == m["splits"]["test"]["eval_instances"] == 529  # every test task here has <= 100
    task = json.loads((SUPERNI / "tasks" / "task1159_bard_analogical_reasoning_containers.json").read_text())
    mine = [r for r in recs if r["task_id"] == "task1159_bard_analogical_reasoning_containers"]
    assert [r["id"] for r in mine] == [i["id"] for i in task["Instances"]]
    assert [r["references"] for r in mine] == [i["output"] for i in task["Instances"]]
    assert mine[0]["task_category"] == "Word Analogy"


def test_readable_with_pyarrow_mmap_and_datasets(prepared):
    out, m = prepared
    from datasets import Dataset

    shard = out / m["splits"]["train"]["shards"][0]["file"]
    ds = Dataset.from_file(str(shard))
    assert len(ds) == m["splits"]["train"]["shards"][0]["rows"]
    t = open_split(out, "train")
    assert ds[0]["input_ids"] == t["input_ids"][0].as_py()


def test_refuses_existing_output(prepared):
    out, _ = prepared
    with pytest.raises(ConfigError, match="already holds prepared data"):
        prepare_superni(PrepareOptions(SUPERNI, MISTRAL, out, seq_len=512))


def _tiny_superni(root: Path, instances, name="task001_x"):
    (root / "tasks").mkdir(parents=True)
    (root / "splits").mkdir()
    task = {"Definition": ["Copy."], "Categories": ["Copying"], "Positive Examples": [{"input": "a", "output": "a"}],
            "Instances": instances}
    (root / "tasks" / f"{name}.json").write_text(json.dumps(task))
    (root / "splits" / "train_tasks.txt").write_text(name + "\n")
    (root / "splits" / "test_tasks.txt").write_text("")


def test_rejects_are_counted_and_written(tmp_path):
    _tiny_superni(tmp_path / "sn", [
        {"id": "a", "input": "x", "output": ["x"]},
        {"id": "b", "input": "y", "output": [""]},          # empty output
        {"id": "c", "input": 3, "output": ["z"]},           # malformed input
        {"id": "d", "input": "w " * 400, "output": ["w " * 300]},  # response cannot fit in 64 tokens
    ])
    m = prepare_superni(PrepareOptions(tmp_path / "sn", MISTRAL, tmp_path / "out", seq_len=64))
    c = m["splits"]["train"]["counts"]
    assert c == {"read": 4, "written": 1, "rejected": {"empty_output": 1, "malformed": 1, "too_long": 1}}
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["empty_output", "malformed", "too_long"]
    assert rejects[1]["record"].endswith("task001_x.json: Instances[2]")


def test_bad_json_names_file_and_line(tmp_path):
    _tiny_superni(tmp_path / "sn", [])
    (tmp_path / "sn" / "tasks" / "task001_x.json").write_text('{"Definition": ["a"],\n "Instances": [,]}')
    with pytest.raises(DataFormatError, match=r"task001_x.json:2: not valid JSON"):
        prepare_superni(PrepareOptions(tmp_path / "sn", MISTRAL, tmp_path / "out", seq_len=64))


def test_missing_task_file_and_overlapping_splits(tmp_path):
    _tiny_superni(tmp_path / "sn", [])
    (tmp_path / "sn" / "splits" / "test_tasks.txt").write_text("task999_missing\n")
    with pytest.raises(DataFormatError, match="task999_missing.*no task file"):
        prepare_superni(PrepareOptions(tmp_path / "sn", MISTRAL, tmp_path / "out", seq_len=64))
    (tmp_path / "sn" / "splits" / "test_tasks.txt").write_text("task001_x\n")
    with pytest.raises(ConfigError, match="both the train and the test split"):
        prepare_superni(PrepareOptions(tmp_path / "sn", MISTRAL, tmp_path / "out2", seq_len=64))


def test_verify_detects_tampering(tmp_path):
    _tiny_superni(tmp_path / "sn", [{"id": "a", "input": "x", "output": ["x"]}])
    out = tmp_path / "out"
    prepare_superni(PrepareOptions(tmp_path / "sn", MISTRAL, out, seq_len=64))
    shard = out / read_manifest(out)["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("checksum" in p for p in verify(out))


def _rewrite_train_shard(out, change):
    """Rewrites the first train shard with ``change(columns) -> columns`` (python lists per column) and records
    its new sha256 in the manifest, as a tampering that keeps the checksums consistent would."""
    import hashlib

    import pyarrow as pa

    from itune.data.shards import SCHEMA

    m = read_manifest(out)
    entry = m["splits"]["train"]["shards"][0]
    t = pa.ipc.open_stream(pa.memory_map(str(out / entry["file"]), "r")).read_all()
    cols = change({k: t[k].to_pylist() for k in SCHEMA.names})
    with pa.OSFile(str(out / entry["file"]), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as w:
        w.write_table(pa.table(cols, schema=SCHEMA))
    entry["sha256"] = hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest()
    return write_manifest(out, m)  # consistent: the integrity record is recomputed


@pytest.fixture
def small_prepared(tmp_path):
    _tiny_superni(tmp_path / "sn", [{"id": str(i), "input": f"x{i}", "output": [f"y{i}"]} for i in range(3)])
    out = tmp_path / "out"
    prepare_superni(PrepareOptions(tmp_path / "sn", MISTRAL, out, seq_len=64))
    assert verify(out) == []
    return out


def _cut(rows):
    return [r[:-1] for r in rows]


@pytest.mark.parametrize("change, problem", [
    (lambda c: {**c, "input_ids": _cut(c["input_ids"]), "labels": _cut(c["labels"]),
                "position_ids": _cut(c["position_ids"])}, "train: input_ids rows whose length is not seq_len 64"),
    (lambda c: {**c, "labels": _cut(c["labels"])}, "train: labels rows whose length is not seq_len 64"),
    (lambda c: {**c, "position_ids": [r + [0] for r in c["position_ids"]]},
     "train: position_ids rows whose length is not seq_len 64"),
    (lambda c: {**c, "example_ids": [r[:-1] for r in c["example_ids"]]},
     "train: rows whose example_ids and example_lengths differ in number"),
    (lambda c: {**c, "example_lengths": [[n + 64 for n in r] for r in c["example_lengths"]]},
     "train: example_lengths below 1 or adding up to more than seq_len 64 in a row"),
    (lambda c: {**c, "example_lengths": [[0] + r for r in c["example_lengths"]],
                "example_ids": [["z"] + r for r in c["example_ids"]]},
     "train: example_lengths below 1 or adding up to more than seq_len 64 in a row"),
    (lambda c: {**c, "input_ids": [[None] + r[1:] for r in c["input_ids"]]}, "train: nulls in ['input_ids']"),
])
def test_verify_checks_the_row_layout_behind_a_matching_checksum(small_prepared, change, problem):
    """A shard rewritten with its new sha256 in the manifest (so the checksums agree) is still checked: every token
    column has seq_len tokens per row, one id per example, example lengths that fit, no nulls."""
    _rewrite_train_shard(small_prepared, change)
    assert problem in verify(small_prepared)


def test_verify_checks_example_and_token_counts_and_the_eval_file(small_prepared):
    m = _rewrite_train_shard(small_prepared, lambda c: c)
    assert verify(small_prepared) == []
    m["splits"]["train"]["examples"] += 1
    m["splits"]["train"]["tokens"] += 2
    write_manifest(small_prepared, m)
    n, tokens = m["splits"]["train"]["examples"], m["splits"]["train"]["tokens"]
    assert verify(small_prepared) == [f"train: {n - 1} examples in rows, manifest says {n}",
                                      f"train: {tokens - 2} tokens in rows, manifest says {tokens}"]


def test_verify_checks_the_heldout_eval_file(tmp_path):
    _tiny_superni(tmp_path / "sn", [{"id": "a", "input": "x", "output": ["y"]}])
    task = {"Definition": ["Copy."], "Categories": ["C"], "Positive Examples": [],
            "Instances": [{"id": "t", "input": "a", "output": ["b"]}]}
    (tmp_path / "sn" / "tasks" / "task002_y.json").write_text(json.dumps(task))
    (tmp_path / "sn" / "splits" / "test_tasks.txt").write_text("task002_y\n")
    out = tmp_path / "out"
    prepare_superni(PrepareOptions(tmp_path / "sn", MISTRAL, out, seq_len=64))
    assert verify(out) == []
    with open(out / "test_eval.jsonl", "a") as f:
        f.write("\n")
    assert verify(out) == [f"{out / 'test_eval.jsonl'}: checksum differs from the manifest (the file changed after "
                           "preparation)"]
    (out / "test_eval.jsonl").unlink()
    assert verify(out) == [f"{out / 'test_eval.jsonl'}: missing"]


def test_a_manifest_missing_keys_is_named_not_a_key_error(small_prepared, capsys):
    from data_tools.cli import main
    from itune.errors import ManifestError

    m = read_manifest(small_prepared)
    del m["splits"]["train"]["shards"][0]["sha256"]
    del m["seq_len"]
    write_manifest(small_prepared, m)
    with pytest.raises(ManifestError, match=r"not a complete manifest \(seq_len missing or not int; "
                                            r"splits.train.shards\[0\].sha256 missing or not str\)"):
        verify(small_prepared)
    for cmd in (["verify"], ["inspect"], ["stats"]):
        assert main(cmd + [str(small_prepared)]) == 2
        assert "not a complete manifest" in capsys.readouterr().err
    intact = json.loads((small_prepared / "manifest.json").read_text())
    intact["seq_len"], intact["splits"]["train"]["shards"][0]["sha256"] = 64, "0" * 64
    del intact["tokenizer"]["path"]
    write_manifest(small_prepared, intact)
    assert main(["inspect", str(small_prepared)]) == 2
    assert "the manifest names no tokenizer path" in capsys.readouterr().err
