"""itune-data prepare --input: per-source counts reconcile, rejects, bad-record policy, --no-pack, real files."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.cli import main
from itune.data.prepare import PrepareOptions, SourcesOptions, prepare_sources, prepare_superni
from itune.data.shards import open_split, read_manifest, verify
from itune.errors import ConfigError, DataFormatError
from tests.conftest import MISTRAL
from tests.test_prepare import _tiny_superni
from tests.test_sources import ALPACA_LIBRE, SHAREGPT_DUMMY, _jsonl

X = -100


def _opts(inputs, out, **kw):
    return SourcesOptions(inputs=inputs, tokenizer=MISTRAL, out_dir=out, seq_len=kw.pop("seq_len", 64), **kw)


@pytest.fixture
def files(tmp_path):
    a = _jsonl(tmp_path / "alp.jsonl", [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say yo.", "output": ""},                       # line 2: empty response
        "not json",                                                     # line 3
        {"instruction": "Add.", "input": "2 3", "output": "5"},
    ])
    s = tmp_path / "chat.json"
    s.write_text(json.dumps([
        {"id": "c0", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "c1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "x"}]},
    ]))
    p = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"prompt": ["Q: 2+3?\nA:"], "completion": [" 5"]}), p)
    return a, s, p


def test_counts_per_source_and_rejects(tmp_path, files):
    a, s, p = files
    out = tmp_path / "out"
    m = prepare_sources(_opts([a, s, p], out, on_error="skip"))
    assert [(x["name"], x["format"], x["template"], x["counts"]) for x in m["sources"]] == [
        ("alp", "alpaca", "alpaca", {"read": 4, "written": 2, "rejected": {"empty_assistant": 1, "invalid_json": 1}}),
        ("chat", "sharegpt", "chat", {"read": 2, "written": 1, "rejected": {"unknown_role": 1}}),
        ("pc", "prompt_completion", "completion", {"read": 1, "written": 1, "rejected": {}}),
    ]
    for x, f in zip(m["sources"], (a, s, p)):
        assert x["path"] == str(f) and x["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert m["source_files"][str(f)] == x["sha256"]
    info = m["splits"]["train"]
    assert info["counts"] == {"read": 7, "written": 4,
                              "rejected": {"empty_assistant": 1, "invalid_json": 1, "unknown_role": 1}}
    assert info["tasks"] == ["alp", "chat", "pc"] and m["heldout_tasks"] == []
    assert info["examples_per_task"] == {"alp": 2, "chat": 1, "pc": 1}
    assert "eval_file" not in info and m["template"] == "per_source" and m["packing"] == "best_fit_decreasing"
    assert set(m["tokenizer"]) == {"path", "fingerprint", "vocab_size", "bos_id", "eos_id", "pad_id"}
    assert verify(out) == []
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["record"], r["reason"]) for r in rejects] == [
        (f"{a}:2", "empty_assistant"), (f"{a}:3", "invalid_json"), (f"{s}: record 1", "unknown_role")]
    assert rejects[0]["message"] == "empty 'output': nothing to train on" and rejects[2]["source"] == str(s)
    # exact layout of the prompt/completion example: one row holds it with its own positions
    t = open_split(out, "train")
    rows = {tuple(t["example_ids"][r].as_py()): r for r in range(t.num_rows)}
    assert sum(len(k) for k in rows) == 4
    r = next(r for k, r in rows.items() if "pc.parquet:#0" in k)
    ids, labels = t["input_ids"][r].as_py(), t["labels"][r].as_py()
    k = t["example_ids"][r].as_py().index("pc.parquet:#0")
    start = sum(t["example_lengths"][r].as_py()[:k])
    assert ids[start:start + 14] == [1, 1954, 29515, 29473, 29518, 29574, 29538, 29572, 781, 29509, 29515, 29473,
                                     29550, 2]
    assert labels[start:start + 14] == [X] * 11 + [29473, 29550, 2]
    assert t["position_ids"][r].as_py()[start:start + 14] == list(range(14))


def test_on_error_raise_names_file_and_line(tmp_path, files):
    a, _, _ = files
    with pytest.raises(DataFormatError) as e:
        prepare_sources(_opts([a], tmp_path / "out"))
    assert str(e.value).startswith(f"{a}:2: empty 'output': nothing to train on")
    assert "--on-error skip" in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_max_bad_fraction(tmp_path, files):
    a, _, _ = files  # 2 bad of 4 records
    with pytest.raises(DataFormatError, match=r"2 of 4 records \(50.00%\) are bad, above --max-bad-fraction 0.4"):
        prepare_sources(_opts([a], tmp_path / "o1", on_error="skip", max_bad_fraction=0.4))
    assert not (tmp_path / "o1" / "manifest.json").exists() and (tmp_path / "o1" / "rejects.jsonl").is_file()
    m = prepare_sources(_opts([a], tmp_path / "o2", on_error="skip", max_bad_fraction=0.5))
    assert m["splits"]["train"]["counts"]["written"] == 2
    with pytest.raises(ConfigError, match="max_bad_fraction applies with on_error='skip' only"):
        prepare_sources(_opts([a], tmp_path / "o3", max_bad_fraction=0.5))


def test_options_are_checked_before_work(tmp_path, files):
    a, s, _ = files
    with pytest.raises(ConfigError) as e:
        prepare_sources(_opts([a, tmp_path / "missing.jsonl"], tmp_path / "o", template="vicuna", on_error="maybe"))
    msg = str(e.value)
    assert "missing.jsonl: input file not found" in msg and "template 'vicuna'" in msg and "on_error 'maybe'" in msg
    odd = _jsonl(tmp_path / "odd.jsonl", [{"q": 1}])
    with pytest.raises(DataFormatError, match=r"odd.jsonl: cannot tell the format from the first record's keys \['q'"):
        prepare_sources(_opts([s, odd], tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_template_and_train_on_options(tmp_path, files):
    _, s, _ = files
    m = prepare_sources(_opts([s], tmp_path / "o", on_error="skip", template="tokenizer", train_on="last"))
    assert m["template"] == "tokenizer" and m["source"]["train_on"] == "last"
    t = open_split(tmp_path / "o", "train")
    n = t["example_lengths"][0].as_py()[0]
    assert t["input_ids"][0].as_py()[:n] == [1, 3, 16127, 4, 23325, 29576, 2]
    assert t["labels"][0].as_py()[:n] == [X] * 4 + [23325, 29576, 2]


def test_no_pack_one_example_per_row(tmp_path, files):
    a, s, p = files
    m = prepare_sources(_opts([a, s, p], tmp_path / "o", on_error="skip", pack=False))
    info = m["splits"]["train"]
    assert m["packing"] == "none" and info["rows"] == info["counts"]["written"] == 4
    t = open_split(tmp_path / "o", "train")
    assert all(len(x) == 1 for x in t["example_lengths"].to_pylist())
    assert info["packing_efficiency"] == round(info["tokens"] / (4 * 64), 6)
    packed = prepare_sources(_opts([a, s, p], tmp_path / "p", on_error="skip"))["splits"]["train"]
    assert packed["rows"] < info["rows"] and packed["tokens"] == info["tokens"]
    assert packed["trainable_tokens"] == info["trainable_tokens"]
    assert verify(tmp_path / "o") == []


def test_superni_no_pack(tmp_path):
    _tiny_superni(tmp_path / "sn", [{"id": "a", "input": "x", "output": ["x"]}, {"id": "b", "input": "y",
                                                                                 "output": ["y"]}])
    m = prepare_superni(PrepareOptions(tmp_path / "sn", MISTRAL, tmp_path / "out", seq_len=64, pack=False))
    assert m["packing"] == "none" and m["splits"]["train"]["rows"] == 2


def test_real_files_counts_reconcile(tmp_path):
    out = tmp_path / "real"
    m = prepare_sources(SourcesOptions([ALPACA_LIBRE, SHAREGPT_DUMMY], MISTRAL, out, seq_len=512, on_error="skip",
                                       max_bad_fraction=0.01))
    alp, sg = m["sources"]
    assert (alp["format"], alp["template"], alp["counts"]) == (
        "alpaca", "alpaca", {"read": 1205, "written": 1199, "rejected": {"empty_assistant": 6}})
    assert (sg["format"], sg["template"], sg["counts"]) == (
        "sharegpt", "chat", {"read": 500, "written": 500, "rejected": {}})
    info = m["splits"]["train"]
    c = info["counts"]
    assert c == {"read": 1705, "written": 1699, "rejected": {"empty_assistant": 6}}
    assert info["examples_per_task"] == {"alpaca_libre_tasks_v3": 1199, "dummy_conversation": 500}
    assert verify(out) == []
    t = open_split(out, "train")
    labels, ids = t["labels"].to_pylist(), t["input_ids"].to_pylist()
    assert sum(1 for row in labels for x in row if x != X) == info["trainable_tokens"]
    # one trained EOS per assistant turn: 1199 alpaca responses + 1000 gpt turns
    assert sum(1 for row_l, row_i in zip(labels, ids) for x, i in zip(row_l, row_i) if x == 2 and i == 2) == 2199
    assert sum(x.count(1) for x in ids) == 1699  # one BOS per example
    assert len(set(sum(t["example_ids"].to_pylist(), []))) == 1699
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["record"].rsplit(":", 1)[1] for r in rejects] == ["539", "566", "567", "867", "914", "1021"]


def test_cli_inputs(tmp_path, files, capsys):
    a, s, p = files
    q = _jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because."}])
    rc = main(["prepare", "--input", str(q), "--field", "prompt=question", "--field", "completion=answer",
               "--tokenizer", str(MISTRAL), "--seq-len", "64", "--out", str(tmp_path / "o"), "--no-pack"])
    assert rc == 0
    m = read_manifest(tmp_path / "o")
    assert m["source"]["fields"] == {"prompt": "question", "completion": "answer"} and m["packing"] == "none"
    assert m["sources"][0]["format"] == "prompt_completion" and m["template"] == "completion"
    assert "read 1 = written 1 + rejected 0" in capsys.readouterr().out
    rc = main(["prepare", "--input", str(a), "--tokenizer", str(MISTRAL), "--out", str(tmp_path / "o2")])
    assert rc == 2 and f"{a}:2: empty 'output'" in capsys.readouterr().err
    rc = main(["prepare", "--input", str(a), "--input", str(s), "--format", "auto", "--template", "chat",
               "--on-error", "skip", "--max-bad-fraction", "0.5", "--tokenizer", str(MISTRAL), "--seq-len", "64",
               "--out", str(tmp_path / "o3")])
    assert rc == 0 and read_manifest(tmp_path / "o3")["template"] == "chat"
    assert main(["prepare", "--superni", "x", "--input", str(a), "--tokenizer", "t", "--out", "o"]) == 2
    assert "either --superni DIR or one or more --input FILE" in capsys.readouterr().err
    assert main(["prepare", "--superni", "x", "--template", "chat", "--tokenizer", "t", "--out", "o"]) == 2
    assert "--template apply to --input files only" in capsys.readouterr().err
