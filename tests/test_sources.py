"""Instruction-file readers: formats, detection, field mapping, record errors with file and line, real files."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from itune.data.sources import (Message, RecordError, detect_format, iter_records, parse_field_mapping, read_source,
                                sniff_format)
from itune.errors import DataFormatError
from tests.conftest import SHARED

ALPACA_LIBRE = SHARED / "data" / "alpaca_libre" / "alpaca_libre_tasks_v3.jsonl"
SHAREGPT_DUMMY = SHARED / "data" / "fastchat_sharegpt_dummy" / "dummy_conversation.json"


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _read(path, fmt="auto", fields=None):
    return list(read_source(path, fmt, fields))


def test_alpaca_jsonl(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [
        {"instruction": " Add. ", "input": "2 3", "output": "5\n\n"},
        {"instruction": "Say hi.", "input": "<noinput>", "output": "hi", "id": "r2"},
        {"instruction": "Greet.", "output": "hello", "system": "Be kind."},
    ])
    got = _read(p)
    assert [e for _, e, _ in got] == [None, None, None]
    (a, _, loc1), (b, _, _), (c, _, _) = got
    assert loc1 == f"{p}:1"
    assert a.messages == [Message("user", "Add.\n\n2 3"), Message("assistant", "5\n\n")]
    assert a.extra == {"instruction": "Add.", "input": "2 3"}
    assert (a.id, a.task, a.references, a.source) == ("a.jsonl:1", "a", ["5\n\n"], str(p))
    assert b.id == "r2" and b.extra["input"] == "" and b.messages[0] == Message("user", "Say hi.")
    assert c.messages[0] == Message("system", "Be kind.") and c.extra["input"] == ""


def test_prompt_completion_and_json_array(tmp_path):
    p = tmp_path / "pc.json"
    p.write_text(json.dumps([{"prompt": "Q: 2+3?\nA:", "completion": " 5"}, {"prompt": "Q: 1+1?\nA:", "completion": 2}],
                            indent=1))
    (ex, err, loc), (ex2, err2, loc2) = _read(p)
    assert err is None and ex.messages == [Message("user", "Q: 2+3?\nA:"), Message("assistant", " 5")]
    assert loc == f"{p}: record 0" and ex.id == "pc.json:#0"
    assert ex2 is None and err2.reason == "wrong_type" and loc2 == f"{p}: record 1"
    assert str(err2) == f"{p}: record 1: field 'completion' must be a string, found int 2"


def test_messages_multi_turn_aliases_and_content_parts(tmp_path):
    p = _jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant",
                       "content": [{"type": "text", "text": "By"}, {"type": "text", "text": "e."}]},
                      {"role": "user", "content": "trailing, dropped"}]},
        {"messages": [{"role": "Human", "content": "a"}, {"role": "model", "content": "b"}]},
    ])
    (a, _, _), (b, _, _) = _read(p)
    assert [m.role for m in a.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert a.messages[-1].content == "Bye." and a.references == ["Bye."]
    assert b.messages == [Message("user", "a"), Message("assistant", "b")]


@pytest.mark.parametrize("speaker", ["gpt", "chatgpt", "bing", "bard", "model", "assistant", "GPT"])
def test_sharegpt_role_aliases(tmp_path, speaker):
    p = _jsonl(tmp_path / "s.jsonl", [{"id": "c1", "conversations": [
        {"from": "system", "value": "sys"}, {"from": "human", "value": "Hi"}, {"from": speaker, "value": "Hello"}]}])
    (ex, err, _), = _read(p)
    assert err is None and ex.id == "c1"
    assert ex.messages == [Message("system", "sys"), Message("user", "Hi"), Message("assistant", "Hello")]


def test_sharegpt_role_content_variant_and_top_level_system(tmp_path):
    p = _jsonl(tmp_path / "s.jsonl", [{"system": "S", "conversations": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}])
    (ex, err, _), = _read(p)
    assert ex.messages == [Message("system", "S"), Message("user", "Hi"), Message("assistant", "Yo")]


def test_field_mapping(tmp_path):
    p = _jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because."}, {"question": "How?"}])
    fields = parse_field_mapping(["prompt=question", "completion=answer"])
    assert fields == {"prompt": "question", "completion": "answer"}
    (a, _, _), (_, err, loc) = _read(p, "auto", fields)
    assert a.messages == [Message("user", "Why?"), Message("assistant", "Because.")]
    assert err.reason == "missing_field" and loc == f"{p}:2"
    assert "missing field 'answer' (mapped to 'completion')" in str(err)
    g = _jsonl(tmp_path / "g.jsonl", [{"dialog": [{"speaker": "user", "text": "a"}, {"speaker": "bot", "text": "b"}]}])
    (ex, err, _), = _read(g, "auto", parse_field_mapping(["messages=dialog", "role=speaker", "content=text"]))
    assert err is None and ex.messages == [Message("user", "a"), Message("assistant", "b")]
    with pytest.raises(DataFormatError, match="write NAME=KEY"):
        parse_field_mapping(["prompt"])
    with pytest.raises(DataFormatError, match="unknown field name 'question'"):
        parse_field_mapping(["question=prompt"])


def test_detection_and_unrecognised_file(tmp_path):
    assert detect_format({"conversations": []}, "f") == "sharegpt"
    assert detect_format({"messages": []}, "f") == "messages"
    assert detect_format({"instruction": "", "input": "", "output": ""}, "f") == "alpaca"
    assert detect_format({"prompt": "", "completion": ""}, "f") == "prompt_completion"
    p = _jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataFormatError) as e:
        _read(p)
    msg = str(e.value)
    assert str(p) in msg and "['answer', 'question']" in msg
    for fmt in ("sharegpt (conversations)", "messages (messages)", "alpaca (instruction + output)",
                "prompt_completion (prompt + completion)", "--field"):
        assert fmt in msg
    with pytest.raises(DataFormatError, match="no record found"):
        sniff_format(_jsonl(tmp_path / "empty.jsonl", []))


def test_record_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"instruction": "ok", "input": "", "output": "fine"}).encode(),  # 1
        b'{"instruction": "x", "output": ',                                        # 2 invalid JSON
        b"",                                                                        # 3 blank: not a record
        json.dumps({"instruction": "x"}).encode(),                                  # 4 missing output
        json.dumps({"instruction": ["x"], "output": "y"}).encode(),                 # 5 wrong type
        json.dumps({"instruction": "x", "output": "  \n"}).encode(),                # 6 empty response
        b'{"instruction": "caf\xe9", "output": "y"}',                               # 7 latin-1 byte
        b"[1, 2]",                                                                  # 8 not an object
        json.dumps({"instruction": "x", "output": "\udc80"}).encode(),              # 9 lone surrogate escape
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    got = _read(p)
    assert [(loc.rsplit(":", 1)[1], err.reason if err else None) for _, err, loc in got] == [
        ("1", None), ("2", "invalid_json"), ("4", "missing_field"), ("5", "wrong_type"), ("6", "empty_assistant"),
        ("7", "invalid_utf8"), ("8", "wrong_type"), ("9", "invalid_utf8")]
    errs = [err for _, err, _ in got if err]
    assert all(isinstance(e, RecordError) and isinstance(e, DataFormatError) for e in errs)
    assert str(errs[0]).startswith(f"{p}:2: not valid JSON")
    assert str(errs[4]) == f"{p}:7: not valid UTF-8 at byte 20 of the line; re-encode the file as UTF-8"


def test_chat_record_errors(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "narrator", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "human", "value": "a"}]},
        {"conversations": "hello"},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}]},
        {"conversations": [{"from": "human", "value": "a"}, "gpt: b"]},
    ])
    got = _read(p)
    assert [err.reason for _, err, _ in got] == ["unknown_role", "empty_assistant", "no_assistant_turn", "wrong_type",
                                                 "wrong_type", "wrong_type"]
    assert str(got[0][1]).startswith(f"{p}:1: unknown role 'narrator' in conversations[1]; accepted: ")
    assert str(got[1][1]) == f"{p}:2: empty assistant turn in conversations[1]: nothing to train on"


def test_invalid_utf8_in_json_array_names_record(tmp_path):
    p = tmp_path / "arr.json"
    p.write_bytes(b'[{"prompt": "a", "completion": "b"},\n {"prompt": "\xff", "completion": "c"}]')
    (ok, _, _), (ex, err, loc) = _read(p)
    assert ok is not None and ex is None
    assert (err.reason, loc) == ("invalid_utf8", f"{p}: record 1")
    p.write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(DataFormatError, match=r"arr.json:2: not valid JSON"):
        _read(p)


def test_parquet_and_arrow(tmp_path):
    t = pa.table({"instruction": ["Add.", "Sub."], "input": ["2 3", ""], "output": ["5", None]})
    pq.write_table(t, tmp_path / "a.parquet")
    with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t)
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    for name in ("a.parquet", "a.arrow", "s.arrow"):
        (ex, _, loc0), (none, err, loc1) = _read(tmp_path / name)
        assert ex.messages == [Message("user", "Add.\n\n2 3"), Message("assistant", "5")], name
        assert loc0 == f"{tmp_path / name}: record 0"
        assert none is None and err.reason == "missing_field" and loc1 == f"{tmp_path / name}: record 1"
    chat = pa.table({"messages": [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]})
    pq.write_table(chat, tmp_path / "m.parquet")
    (ex, err, _), = _read(tmp_path / "m.parquet")
    assert ex.messages == [Message("user", "a"), Message("assistant", "b")]
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="cannot read as Parquet"):
        _read(tmp_path / "x.parquet")


def test_iter_records_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="input file not found"):
        list(iter_records(tmp_path / "nope.jsonl"))


def test_real_alpaca_libre():
    got = _read(ALPACA_LIBRE)
    assert len(got) == 1205
    bad = [(loc.rsplit(":", 1)[1], err.reason) for _, err, loc in got if err]
    # 5 upstream "error" records and 1 "empty" record have no output
    assert bad == [("539", "empty_assistant"), ("566", "empty_assistant"), ("567", "empty_assistant"),
                   ("867", "empty_assistant"), ("914", "empty_assistant"), ("1021", "empty_assistant")]
    exs = [e for e, _, _ in got if e]
    # upstream README: 639 records have a real input; 5 of them are the rejected "error" records
    assert sum(1 for e in exs if e.extra["input"]) == 639 - 5
    assert exs[0].extra == {"instruction": "Rewrite the following sentence in the passive voice.",
                            "input": "The students studied hard for the test."}
    assert exs[0].messages[1].content == "Hard study was done by the students for the test.\n\n\n"


def test_real_sharegpt_dummy():
    got = _read(SHAREGPT_DUMMY)
    assert len(got) == 500 and all(err is None for _, err, _ in got)
    exs = [e for e, _, _ in got]
    assert exs[0].id == "identity_0" and exs[0].task == "dummy_conversation"
    roles = [m.role for e in exs for m in e.messages]
    assert roles.count("user") == 1000 and roles.count("assistant") == 1000
    assert sorted({len(e.messages) for e in exs}) == [2, 4, 6]
    assert [sum(1 for e in exs if len(e.messages) == n) for n in (2, 4, 6)] == [167, 166, 167]


def test_jsonl_line_decoding_is_json_loads_on_random_lines():
    """decode_jsonl_line skips json.loads's per-call overhead; on random lines of JSON characters, whitespace
    (ASCII and non-breaking), byte order marks and invalid UTF-8 it gives json.loads's value, or its error message
    and column (the first line's byte order mark is stripped before, as a file's)."""
    import json
    import random
    import re

    from itune.data.sources import RecordError, decode_jsonl_line

    def expected(raw):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return ("invalid_utf8",)
        if not line.strip(" \t\n\r\x0b\x0c"):  # blank: ASCII whitespace only (U+00A0 is json.loads's error)
            return None
        try:
            return ("ok", json.loads(line))
        except json.JSONDecodeError as e:
            return ("invalid_json", e.msg, e.colno)

    def got(raw):
        r = decode_jsonl_line(raw, "f.jsonl:1")
        if isinstance(r, RecordError):
            if r.reason == "invalid_utf8":
                return (r.reason,)
            m = re.search(r"not valid JSON \((.*) at column (\d+)\)", r.detail)
            return (r.reason, m.group(1), int(m.group(2)))
        return None if r is None and expected(raw) is None else ("ok", r)

    rnd = random.Random(0)
    alphabet = [bytes([c]) for c in b'{}[]":, \t\n\r1ae\\nul'] + [b"\xc2\xa0", b"\xff", b"\xef\xbb\xbf"]
    lines = [b'{"a": 1}\n', b'  {"a": 1}  \r\n', b'{"a": 1} x\n', b'{"a":1}{"b":2}\n', b"1 2\n", b"\xc2\xa0\n",
             b'\xef\xbb\xbf{"a": 1}\n']
    lines += [b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 12))) for _ in range(30_000)]
    kinds = set()
    for raw in lines:
        assert got(raw) == expected(raw), raw
        kinds.add(None if expected(raw) is None else expected(raw)[0])
    assert kinds == {None, "ok", "invalid_json", "invalid_utf8"}
