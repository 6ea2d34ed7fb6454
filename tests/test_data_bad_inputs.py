"""Bad inputs and options never crash obscurely, never lose records and never write a wrong dataset."""

import json
import os
import re

import pytest

from data_tools.cli import main
from itune.data.pipeline import merge_slices
from itune.data.prepare import PrepareOptions, SourcesOptions, prepare_sources, prepare_superni, slice_from_env
from itune.data.shards import read_manifest, verify
from itune.errors import ConfigError, DataFormatError, ManifestError
from tests.conftest import MISTRAL, SUPERNI
from tests.test_prepare import _tiny_superni
from tests.test_sources import _jsonl


def _opts(out, inputs, **kw):
    return SourcesOptions(inputs=inputs, tokenizer=MISTRAL, out_dir=out, seq_len=kw.pop("seq_len", 64), **kw)


@pytest.fixture
def chats(tmp_path):
    return _jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    ])


def test_template_mismatch_is_a_bad_record(tmp_path, chats):
    with pytest.raises(DataFormatError, match=r"m.jsonl:2: the alpaca template renders one user \+ one assistant"):
        prepare_sources(_opts(tmp_path / "o1", [chats], template="alpaca"))
    with pytest.raises(DataFormatError, match=r"1 of 2 records \(50.00%\) are bad"):
        prepare_sources(_opts(tmp_path / "o2", [chats], template="alpaca", on_error="skip", max_bad_fraction=0.1))
    m = prepare_sources(_opts(tmp_path / "o3", [chats], template="alpaca", on_error="skip"))
    assert m["splits"]["train"]["counts"] == {"read": 2, "written": 1, "rejected": {"template_mismatch": 1}}
    [rej] = [json.loads(x) for x in (tmp_path / "o3" / "rejects.jsonl").read_text().splitlines()]
    assert rej["reason"] == "template_mismatch" and "use --template chat" in rej["message"]


def test_heldout_rejects_count_in_the_test_split_and_eval_ignores_seq_len(tmp_path):
    f = _jsonl(tmp_path / "h.jsonl", [{"prompt": "short", "completion": "a", "cat": "H"},
                                      {"prompt": "long " * 80, "completion": "b", "cat": "H"},
                                      {"prompt": "short", "completion": "c", "cat": "T"}])
    m = prepare_sources(_opts(tmp_path / "o", [f], seq_len=32, overflow="drop", task_field="cat",
                              heldout_tasks=["H"]))
    assert m["splits"]["train"]["counts"] == {"read": 1, "written": 1, "rejected": {}}
    assert m["splits"]["test"]["counts"] == {"read": 2, "written": 1, "rejected": {"too_long": 1}}
    assert m["splits"]["test"]["eval_instances"] == 2  # both held-out instances are evaluated
    [rej] = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert rej["split"] == "test" and rej["record"].endswith("h.jsonl:2")


def test_superni_eval_set_does_not_depend_on_seq_len(tmp_path):
    a = prepare_superni(PrepareOptions(SUPERNI, MISTRAL, tmp_path / "a", seq_len=512))
    b = prepare_superni(PrepareOptions(SUPERNI, MISTRAL, tmp_path / "b", seq_len=128, overflow="drop"))
    assert a["splits"]["test"]["eval_instances"] == b["splits"]["test"]["eval_instances"] == 529
    assert (tmp_path / "a" / "test_eval.jsonl").read_bytes() == (tmp_path / "b" / "test_eval.jsonl").read_bytes()
    te = b["splits"]["test"]
    assert te["counts"]["read"] == 529 and te["counts"]["rejected"]["too_long"] > 0


def test_duplicate_heldout_ids_are_refused(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "p", "completion": "c", "cat": "t1"},
                                      {"id": "a", "prompt": "q", "completion": "d", "cat": "t1"}])
    with pytest.raises(ConfigError) as e:
        prepare_sources(_opts(tmp_path / "o", [f], task_field="cat", heldout_tasks=["t1"]))
    assert str(e.value) == (f"held-out instances share ids (1 ids in all; 'a' at {f}:1; 'a' at {f}:2); scores are "
                            "matched by id, so give every record (every instance of a nested record) a unique 'id' "
                            "field")
    nested = _jsonl(tmp_path / "n.jsonl", [{"name": "t1", "instruction": "Add.", "instances": [
        {"id": "x", "input": "1+1", "output": "2"}, {"id": "x", "input": "2+2", "output": "4"}]}])
    with pytest.raises(ConfigError, match=re.escape(f"'x' at {nested}:1 instances[0]; 'x' at {nested}:1 instances[1])")):
        prepare_sources(_opts(tmp_path / "o2", [nested], heldout_tasks=["t1"]))


@pytest.mark.parametrize("kw, message", [
    ({"max_rows_per_shard": 0}, "max_rows_per_shard 0: must be >= 1"),
    ({"seed": -1}, "seed -1: must be >= 0"),
    ({"num_shards": 0, "shard_index": 0}, "--num-shards 0"),
    ({"max_eval_instances_per_task": -5}, "max_eval_instances_per_task -5: must be >= 1"),
])
def test_bad_numbers_are_refused_before_work(tmp_path, chats, kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        prepare_sources(_opts(tmp_path / "o", [chats], **kw))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kw, message", [
    ({"max_instances_per_task": -1}, "max_instances_per_task -1: must be >= 1"),
    ({"max_eval_instances_per_task": 0}, "max_eval_instances_per_task 0: must be >= 1"),
    ({"num_pos_examples": -1}, "num_pos_examples -1: must be >= 0"),
    ({"max_rows_per_shard": -1}, "max_rows_per_shard -1: must be >= 1"),
])
def test_bad_superni_numbers_are_refused(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        prepare_superni(PrepareOptions(SUPERNI, MISTRAL, tmp_path / "o", **kw))


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "2"])
def test_bad_mixture_weights(tmp_path, chats, weight):
    with pytest.raises(ConfigError, match="must be a finite number >= 0"):
        prepare_sources(_opts(tmp_path / "o", [{"path": chats, "weight": weight}]))
    with pytest.raises(ConfigError, match="name 5 must be a non-empty string"):
        prepare_sources(_opts(tmp_path / "o", [{"path": chats, "name": 5}]))


def test_unencodable_id_or_task_is_a_bad_record(tmp_path):
    f = _jsonl(tmp_path / "s.jsonl", ['{"id": "ok\\ud800", "prompt": "a", "completion": "b"}',
                                      '{"prompt": "a", "completion": "b", "cat": "t\\udc80"}',
                                      {"prompt": "a", "completion": "b", "cat": "fine"}])
    m = prepare_sources(_opts(tmp_path / "o", [f], on_error="skip", task_field="cat"))
    assert m["splits"]["train"]["counts"] == {"read": 3, "written": 1, "rejected": {"invalid_utf8": 2}}


def test_superni_task_with_a_non_string_definition(tmp_path):
    _tiny_superni(tmp_path / "sn", [{"id": "a", "input": "x", "output": ["y"]}])
    p = next((tmp_path / "sn" / "tasks").glob("*.json"))
    t = json.loads(p.read_text())
    t["Definition"] = [5]
    p.write_text(json.dumps(t))
    with pytest.raises(DataFormatError, match="'Definition' must be a list of strings"):
        prepare_superni(PrepareOptions(tmp_path / "sn", MISTRAL, tmp_path / "o", seq_len=64))


def test_slurm_environment_half_set():
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_COUNT is set but SLURM_ARRAY_TASK_ID is not"):
        slice_from_env(None, None, {"SLURM_ARRAY_TASK_COUNT": "2"})
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID 'x' is not an integer"):
        slice_from_env(None, None, {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "x"})


def test_output_path_and_manifest_errors_are_clear(tmp_path, chats, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = ["prepare", "--input", str(chats), "--tokenizer", str(MISTRAL), "--seq-len", "64"]
    assert main(args + ["--out", str(afile)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    out = tmp_path / "o"
    assert main(args + ["--out", str(out)]) == 0
    (out / "manifest.json").write_text("{bad")
    for cmd in (["verify", str(out)], ["inspect", str(out)], ["stats", str(out)]):
        assert main(cmd) == 2
        assert "manifest.json: not valid JSON" in capsys.readouterr().err


def test_overwrite_removes_stale_shards_and_slices(tmp_path, chats):
    out = tmp_path / "o"
    prepare_sources(_opts(out, [chats], max_rows_per_shard=1, pack=False))
    assert len(list(out.glob("train-*.arrow"))) == 2
    prepare_sources(_opts(out, [chats], shard_index=1, num_shards=3, overwrite=True))  # a stale slice
    m = prepare_sources(_opts(out, [chats], overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rejects.jsonl", "train-00000-of-00001.arrow"]
    assert m["splits"]["train"]["rows"] == 1 and verify(out) == []


def test_merge_names_stale_slices_and_checks_token_files(tmp_path, chats):
    out = tmp_path / "o"
    prepare_sources(_opts(out, [chats], shard_index=1, num_shards=3))
    for i in range(2):
        prepare_sources(_opts(out, [chats], shard_index=i, num_shards=2))
    with pytest.raises(ManifestError, match=r"slice-00001-of-00003: from another preparation"):
        merge_slices(out)
    (out / "slices" / "slice-00001-of-00003" / "slice.json").unlink()
    tokens = out / "slices" / "slice-00000-of-00002" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-4])
    with pytest.raises(ManifestError, match=r"tokens.bin: 4 bytes short"):
        merge_slices(out)


def test_relative_tokenizer_path_is_stored_absolute(tmp_path, chats, monkeypatch):
    monkeypatch.chdir(MISTRAL.parent)
    m = prepare_sources(SourcesOptions([chats], MISTRAL.name, tmp_path / "o", seq_len=64))
    path = m["tokenizer"]["path"]
    assert os.path.isabs(path) and os.path.samefile(path, MISTRAL)  # the shared folder may be reached by a link
    assert read_manifest(tmp_path / "o")["tokenizer"]["path"] == path


def test_field_mapped_twice_is_refused():
    from itune.data.sources import parse_field_mapping

    assert parse_field_mapping(["prompt=q", "prompt=q"]) == {"prompt": "q"}
    with pytest.raises(DataFormatError, match="--field prompt: mapped twice \\('q' and 'question'\\)"):
        parse_field_mapping(["prompt=q", "prompt=question"])


def test_ctrl_c_stops_a_multi_process_run_and_a_rerun_is_complete(tmp_path):
    """SIGINT to the whole process group (Ctrl-C) ends a --num-proc 2 run promptly; the rerun is a full dataset."""
    import signal
    import subprocess
    import sys
    import time

    f = _jsonl(tmp_path / "big.jsonl", [{"prompt": f"question {i} " * 40, "completion": f"answer {i}"}
                                        for i in range(120000)])  # about 10 M tokens: several seconds of work
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "data_tools.cli", "prepare", "--input", str(f), "--tokenizer", str(MISTRAL),
           "--seq-len", "2048", "--num-proc", "2", "--out", str(out)]
    # as from an interactive shell: SIGINT at its default (a background job, e.g. under CI, inherits it ignored)
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            t.stat().st_size > 0 for t in (out / "slices").glob("*/tokens.bin")):  # workers are busy
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be interrupted"
    os.killpg(p.pid, signal.SIGINT)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the run did not stop within 30 s of Ctrl-C")
    assert p.returncode != 0 and not (out / "manifest.json").exists()
    m = prepare_sources(_opts(out, [f], seq_len=2048, num_proc=2))
    assert m["splits"]["train"]["counts"] == {"read": 120000, "written": 120000, "rejected": {}}
    assert verify(out) == []


def test_json_python_cannot_hold_is_a_bad_record_not_a_crash(tmp_path):
    """An integer of 5,000 digits (over Python's int-from-string limit) or 100,000 nested arrays (deeper than its
    stack) in one JSONL record is that record's error, named by file and line, and skipped with --on-error skip;
    in a JSON array file it stops the run naming the file."""
    f = tmp_path / "odd.jsonl"
    f.write_text("\n".join([json.dumps({"prompt": "a", "completion": "b"}),
                            '{"prompt": "a", "completion": "b", "n": ' + "9" * 5000 + "}",
                            '{"prompt": "a", "completion": "b", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}",
                            "\ufeff" + json.dumps({"prompt": "c", "completion": "d"})]) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"odd.jsonl:2: JSON this reader cannot hold \(ValueError"):
        prepare_sources(_opts(tmp_path / "o1", [f], format="prompt_completion"))
    m = prepare_sources(_opts(tmp_path / "o2", [f], format="prompt_completion", on_error="skip"))
    assert m["splits"]["train"]["counts"] == {"read": 4, "written": 1, "rejected": {"invalid_json": 3}}
    rejects = [json.loads(x) for x in (tmp_path / "o2" / "rejects.jsonl").read_text().splitlines()]
    assert [r["record"].rsplit(":", 1)[1] for r in rejects] == ["2", "3", "4"]
    assert "RecursionError" in rejects[1]["message"] and "Unexpected UTF-8 BOM" in rejects[2]["message"]
    arr = tmp_path / "deep.json"
    arr.write_text('[{"prompt": "a", "completion": "b", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    with pytest.raises(DataFormatError, match=r"deep.json: JSON this reader cannot hold \(RecursionError"):
        prepare_sources(_opts(tmp_path / "o3", [arr], format="prompt_completion"))


def test_input_file_name_that_is_not_utf8_is_refused(tmp_path, capsys):
    """A file name with bytes that are not UTF-8 (os.fsdecode makes them lone surrogates) would become the task name
    and part of every example id, which Arrow and JSON files cannot hold: refused up front, naming the file."""
    raw = os.fsencode(tmp_path) + b"/bad\xff.jsonl"
    with open(raw, "wb") as f:
        f.write(b'{"prompt": "q", "completion": "a"}\n')
    path = os.fsdecode(raw)
    with pytest.raises(ConfigError, match=r"bad\\udcff.jsonl': the path is not valid UTF-8 .* rename the file"):
        prepare_sources(_opts(tmp_path / "o", [path]))
    assert main(["prepare", "--input", path, "--tokenizer", str(MISTRAL), "--out", str(tmp_path / "o")]) == 2
    assert "the path is not valid UTF-8" in capsys.readouterr().err and not (tmp_path / "o").exists()
    ok = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(ConfigError, match=r"name 'x\\udcff' must be a non-empty string of valid UTF-8"):
        prepare_sources(_opts(tmp_path / "o", [{"path": ok, "name": "x\udcff"}]))


def test_an_input_inside_out_under_an_output_name_is_never_removed(tmp_path, capsys):
    """A preparation clears an earlier run's shards, rejects and eval files from --out before writing: an input that
    lies there under such a name (or under OUT/slices) is refused instead of being deleted; other names are fine."""
    out = tmp_path / "o"
    out.mkdir()
    rec = {"prompt": "q", "completion": "a"}
    for name in ("rejects.jsonl", "test_eval.jsonl", "manifest.json"):
        f = _jsonl(out / name, [rec])
        with pytest.raises(ConfigError, match=f"{name}: this input lies in --out .* under a name that preparation"):
            prepare_sources(_opts(out, [f]))
        assert f.read_bytes() == b'{"prompt": "q", "completion": "a"}\n'  # still there, unchanged
    (out / "slices" / "x").mkdir(parents=True)
    f = _jsonl(out / "slices" / "x" / "d.jsonl", [rec])
    assert main(["prepare", "--input", str(f), "--tokenizer", str(MISTRAL), "--out", str(out)]) == 2
    assert "this input lies in --out" in capsys.readouterr().err and f.is_file()
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard_named = out / "train-00000-of-00001.arrow"
    with pa.OSFile(str(shard_named), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("prompt", pa.string()),
                                                                                   ("completion", pa.string())])) as w:
        w.write_table(pa.table({"prompt": ["q"], "completion": ["a"]}))
    with pytest.raises(ConfigError, match="train-00000-of-00001.arrow: this input lies in --out"):
        prepare_sources(_opts(out, [shard_named]))
    assert shard_named.is_file()
    pq.write_table(pa.table({"prompt": ["q"], "completion": ["a"]}), out / "data.parquet")
    for p in (out / "rejects.jsonl", out / "test_eval.jsonl", out / "manifest.json", shard_named):
        p.unlink()
    m = prepare_sources(_opts(out, [out / "data.parquet"]))  # another name in --out: prepared, and kept
    assert m["splits"]["train"]["counts"]["written"] == 1 and (out / "data.parquet").is_file()


def test_superni_text_that_is_not_utf8_is_rejected_not_a_crash(tmp_path):
    """A SuperNI instance whose id, input or reference holds a lone surrogate escape ("\\ud800", valid JSON that no
    UTF-8 file can hold) is rejected as invalid_utf8, in the train and the held-out split; the same in the task's
    definition is a DataFormatError naming the file; so is a list as an instance id (malformed)."""
    root = tmp_path / "sn"
    _tiny_superni(root, [{"id": "ok", "input": "x", "output": ["y"]},
                         {"id": "bad\ud800", "input": "x", "output": ["y"]},
                         {"id": "in", "input": "x\ud800", "output": ["y"]},
                         {"id": [1], "input": "x", "output": ["y"]}])
    test_task = {"Definition": ["Copy."], "Categories": ["Copying"], "Positive Examples": [],
                 "Instances": [{"id": "t1", "input": "a", "output": ["b"]},
                               {"id": "t2", "input": "a", "output": ["b", "c\ud800"]}]}
    (root / "tasks" / "task002_y.json").write_text(json.dumps(test_task))
    (root / "splits" / "test_tasks.txt").write_text("task002_y\n")
    out = tmp_path / "o"
    m = prepare_superni(PrepareOptions(root, MISTRAL, out, seq_len=64))
    assert m["splits"]["train"]["counts"] == {"read": 4, "written": 1, "rejected": {"invalid_utf8": 2, "malformed": 1}}
    assert m["splits"]["test"]["counts"] == {"read": 2, "written": 1, "rejected": {"invalid_utf8": 1}}
    assert [json.loads(x)["id"] for x in (out / "test_eval.jsonl").read_text().splitlines()] == ["t1"]
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["record"].rsplit(": ", 1)[1]) for r in rejects] == [
        ("invalid_utf8", "Instances[1]"), ("invalid_utf8", "Instances[2]"), ("malformed", "Instances[3]"),
        ("invalid_utf8", "Instances[1]")]
    assert verify(out) == []
    test_task["Definition"] = ["Copy\ud800."]
    (root / "tasks" / "task002_y.json").write_text(json.dumps(test_task))
    with pytest.raises(DataFormatError, match=r"task002_y.json: 'Definition' is not valid UTF-8 text"):
        prepare_superni(PrepareOptions(root, MISTRAL, tmp_path / "o2", seq_len=64))


def test_paths_that_are_not_utf8_are_refused(tmp_path):
    """--out, --tokenizer and --superni paths are written into the manifest: one that is not valid UTF-8 is refused
    before anything is written, naming the option."""
    _tiny_superni(tmp_path / "sn", [{"id": "a", "input": "x", "output": ["y"]}])
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    bad_out = tmp_path / os.fsdecode(b"out\xff")
    with pytest.raises(ConfigError, match=r"--out '.*out\\udcff': the path is not valid UTF-8"):
        prepare_sources(_opts(bad_out, [f]))
    assert not bad_out.exists()
    bad_tok = tmp_path / os.fsdecode(b"tok\xff")
    with pytest.raises(ConfigError, match=r"--tokenizer '.*tok\\udcff': the path is not valid UTF-8"):
        prepare_sources(SourcesOptions(inputs=[f], tokenizer=bad_tok, out_dir=tmp_path / "o", seq_len=64))
    bad_sn = tmp_path / os.fsdecode(b"sn\xff")
    os.rename(tmp_path / "sn", bad_sn)
    with pytest.raises(ConfigError, match=r"--superni '.*sn\\udcff': the path is not valid UTF-8"):
        prepare_superni(PrepareOptions(bad_sn, MISTRAL, tmp_path / "o", seq_len=64))
    assert not (tmp_path / "o").exists()


def test_unusual_blank_lines_and_line_ends_get_their_real_error(tmp_path):
    """A line of non-ASCII whitespace (U+00A0, U+2028) is not blank: it is invalid JSON, not a 'NoneType' record. A
    first line holding only a byte order mark is blank. A file whose records are separated by CR alone is one line
    of invalid JSON, and format detection says so instead of 'empty file'."""
    f = tmp_path / "ws.jsonl"
    f.write_bytes(b'\xef\xbb\xbf\n{"prompt": "q", "completion": "a"}\n\xc2\xa0\n\xe2\x80\xa8\n'
                  b'{"prompt": "q2", "completion": "a2"}\n')
    with pytest.raises(DataFormatError, match=r"ws.jsonl:3: not valid JSON \(Expecting value at column 1\)"):
        prepare_sources(_opts(tmp_path / "o1", [f]))
    m = prepare_sources(_opts(tmp_path / "o2", [f], on_error="skip"))
    assert m["sources"][0]["counts"] == {"read": 4, "written": 2, "rejected": {"invalid_json": 2}}
    rejects = [json.loads(x) for x in (tmp_path / "o2" / "rejects.jsonl").read_text().splitlines()]
    assert [r["record"].rsplit(":", 1)[1] for r in rejects] == ["3", "4"]
    cr = tmp_path / "cr.jsonl"
    cr.write_bytes(b'{"prompt": "q", "completion": "a"}\r{"prompt": "q", "completion": "a"}\r')
    with pytest.raises(DataFormatError, match=r"cr.jsonl: no record could be read; the first problem: "
                                              r".*cr.jsonl:1: not valid JSON \(Extra data at column 36\)"):
        prepare_sources(_opts(tmp_path / "o3", [cr]))


def test_parquet_string_that_is_not_utf8_is_a_bad_record(tmp_path):
    """A Parquet string column holding bytes that are not UTF-8 (writers do not all check) makes that record an
    invalid_utf8 reject, named by its index; the other records of the batch are kept."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    def strings(values: list[bytes]) -> pa.Array:  # unchecked, as a careless writer would store them
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
        return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets),
                                                                pa.py_buffer(b"".join(values))])

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": strings([b"q0", b"q\xff1", b"q2"]), "completion": strings([b"a"] * 3)}), f)
    with pytest.raises(DataFormatError, match=r"d.parquet: record 1: a string field is not valid UTF-8"):
        prepare_sources(_opts(tmp_path / "o1", [f]))
    m = prepare_sources(_opts(tmp_path / "o2", [f], on_error="skip"))
    assert m["sources"][0]["counts"] == {"read": 3, "written": 2, "rejected": {"invalid_utf8": 1}}
    bad_first = tmp_path / "e.parquet"
    pq.write_table(pa.table({"prompt": strings([b"q\xff"]), "completion": strings([b"a"])}), bad_first)
    with pytest.raises(DataFormatError, match=r"e.parquet: no record could be read; the first problem: "
                                              r".*record 0: a string field is not valid UTF-8"):
        prepare_sources(_opts(tmp_path / "o3", [bad_first]))


def test_merge_names_a_damaged_slice(tmp_path, chats):
    """A slice.json without its keys, or an examples.arrow cut short or holding other rows than its slice.json
    records, is named with a way out instead of a KeyError or ArrowInvalid traceback."""
    import pyarrow as pa

    out = tmp_path / "o"
    for i in range(2):
        prepare_sources(_opts(out, [chats], shard_index=i, num_shards=2, chunk_records=1))
    d = out / "slices" / "slice-00001-of-00002"
    summary = (d / "slice.json").read_text()
    (d / "slice.json").write_text("{}")
    with pytest.raises(ManifestError, match=r"slice-00001-of-00002/slice.json: not a slice summary \(missing "
                                            r"\['chunks', 'index', .*\]\); prepare this slice again"):
        merge_slices(out)
    (d / "slice.json").write_text(summary)
    examples = (d / "examples.arrow").read_bytes()
    (d / "examples.arrow").write_bytes(examples[:len(examples) // 2])
    with pytest.raises(ManifestError, match=r"slice-00001-of-00002/examples.arrow: .*prepare this slice again"):
        merge_slices(out)
    t = pa.ipc.open_stream(pa.py_buffer(examples)).read_all()
    with pa.OSFile(str(d / "examples.arrow"), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t.slice(0, t.num_rows - 1))
    with pytest.raises(ManifestError, match=rf"examples.arrow: {t.num_rows - 1} examples \(or another schema\), its "
                                            rf"slice.json records {t.num_rows}"):
        merge_slices(out)
    (d / "examples.arrow").write_bytes(examples)
    assert merge_slices(out)["splits"]["train"]["counts"]["written"] == 2 and verify(out) == []


def test_mixture_file_that_is_not_utf8_is_named(tmp_path):
    from itune.data.prepare import load_mixture

    bad = tmp_path / "mix.yaml"
    bad.write_bytes(b"sources:\n  - path: caf\xe9.jsonl\n")
    with pytest.raises(ConfigError, match=r"mix.yaml: cannot read the mixture file \('utf-8' codec can't decode"):
        load_mixture(bad)


def test_merge_refuses_token_ids_outside_the_vocabulary(tmp_path, chats):
    """A slice's tokens.bin changed after preparation so that an id is outside the tokenizer's vocabulary (which
    would fail in the embedding lookup mid-training) is named by the merge instead of written into shards."""
    import numpy as np

    out = tmp_path / "o"
    for i in range(2):
        prepare_sources(_opts(out, [chats], shard_index=i, num_shards=2, chunk_records=1))
    tokens = out / "slices" / "slice-00001-of-00002" / "tokens.bin"
    stored = np.frombuffer(tokens.read_bytes(), dtype=np.uint32).copy()
    good = stored.copy()
    stored[2] = 40_000  # an untrained id past mistral's 32,768
    tokens.write_bytes(stored.tobytes())
    with pytest.raises(ManifestError, match=r"slice-00001-of-00002/tokens.bin: token id 40000 is outside the "
                                            r"tokenizer's vocabulary of 32768"):
        merge_slices(out)
    assert not list(out.glob("train-*.arrow")) and not (out / "manifest.json").exists()
    tokens.write_bytes(good.tobytes())
    assert verify(merge_slices(out) and out) == []


def test_a_task_field_no_record_has_is_named_with_the_keys_present(tmp_path, capsys):
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a", "category": "c"}])
    rc = main(["prepare", "--input", str(f), "--tokenizer", str(MISTRAL), "--task-field", "task",
               "--heldout-tasks", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "d.jsonl:1: field 'task' (the task name, --task-field) is missing or empty (found None; keys " \
        "present: ['category', 'completion', 'prompt']); if no record has it, give --task-field the field" in err
    m = prepare_sources(_opts(tmp_path / "o2", [f], task_field="category", heldout_tasks=["c"]))
    assert m["splits"]["test"]["counts"]["written"] == 1


def test_mixture_file_with_a_duplicate_key_is_refused(tmp_path, capsys):
    from itune.data.prepare import load_mixture

    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n"
                   "  - path: a.jsonl\n"
                   "    weight: 0.5\n"    # 3
                   "    template: chat\n"
                   "    weight: 2\n"      # 5
                   "max_per_task: 10\n")
    with pytest.raises(ConfigError) as e:
        load_mixture(mix)
    assert str(e.value) == (f"{mix}: duplicate key 'sources[0].weight' at lines 3 and 5 (the second would silently "
                            "replace the first); keep one")
    mix.write_text("sources:\n  - a.jsonl\nmax_per_task: 10\nsources:\n  - b.jsonl\n")
    rc = main(["prepare", "--mixture", str(mix), "--tokenizer", str(MISTRAL), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert capsys.readouterr().err == (f"error: {mix}: duplicate key 'sources' at lines 1 and 4 (the second would "
                                       "silently replace the first); keep one\n")


def test_mixture_file_without_duplicates_loads_as_before(tmp_path):
    from itune.data.prepare import load_mixture

    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n  - path: a.jsonl\n    weight: 0.5\n    template: chat\n  - b.jsonl\n"
                   "max_per_task: 10\n")
    assert load_mixture(mix) == ([{"path": tmp_path / "a.jsonl", "weight": 0.5, "template": "chat"},
                                  {"path": tmp_path / "b.jsonl"}], 10)
