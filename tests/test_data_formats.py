"""Formats users fine-tune on today: OpenAI tool calling, ShareGPT function calls, per-turn weights, nested
instances (Self-Instruct, SuperNI JSONL), Dolly's context, unused keys, empty runs and dropped messages: exact
parses, exact label layouts, read = written + rejected, one-line errors naming file and line."""

import json

import pytest

from data_tools.cli import main
from itune.data.prepare import SourcesOptions, prepare_sources
from itune.data.render import IGNORE_INDEX, render, render_prompt
from itune.data.sources import Message, RecordError, parse_record, parse_records, read_source, sniff_format, \
    tk_instruct_prompt
from itune.errors import DataFormatError
from tests.conftest import MISTRAL
from tests.test_sources import _jsonl

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
OPENAI_TOOL_RECORD = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 18}"},
        {"role": "assistant", "content": "18 degrees in Paris."},
    ]}
# the same conversation as LLaMA-Factory writes it (ShareGPT with function_call / observation, tools as JSON text)
SHAREGPT_TOOL_RECORD = {
    "system": "Use tools.", "tools": json.dumps([TOOLS[0]["function"]]),
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
        {"from": "observation", "value": "{\"temp_c\": 18}"},
        {"from": "gpt", "value": "18 degrees in Paris."},
    ]}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def _parse(rec, fmt, **kw):
    return parse_record(rec, fmt, "f.jsonl:3", "f", "f.jsonl", **kw)


def trained_spans(tok, input_ids, labels) -> list[str]:
    """The trained tokens as text pieces (one per contiguous trained span), special tokens kept; each trained
    label must be its own token (labels are not shifted)."""
    spans, cur = [], []
    for i, lab in zip(list(input_ids), list(labels)):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(int(i))
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    return [tok.decode(s, skip_special_tokens=False) for s in spans]


def _trained_text(tok, r):
    return trained_spans(tok, r.input_ids, r.labels)


def test_openai_tool_calls_parse_to_messages():
    ex = _parse(OPENAI_TOOL_RECORD, "messages")
    assert ex.tools == TOOLS and ex.unused_keys == () and ex.dropped_turns == 0
    assert ex.messages == [
        Message("system", "Use tools."), Message("user", "Weather in Paris?"),
        Message("assistant", "", tool_calls=(dict(CALL, id="call_1"),)),  # arguments parsed from their JSON text
        Message("tool", "{\"temp_c\": 18}", tool_call_id="call_1"),
        Message("assistant", "18 degrees in Paris.")]


def test_sharegpt_function_call_and_observation_parse_alike():
    ex = _parse(SHAREGPT_TOOL_RECORD, "sharegpt")
    assert ex.tools == TOOLS  # a bare function schema is wrapped as {"type": "function", "function": ...}
    assert ex.messages == [
        Message("system", "Use tools."), Message("user", "Weather in Paris?"),
        Message("assistant", "", tool_calls=(CALL,)), Message("tool", "{\"temp_c\": 18}"),
        Message("assistant", "18 degrees in Paris.")]


def test_chat_template_tool_conversation_layout(mistral_tokenizer):
    r, reason = render(_parse(OPENAI_TOOL_RECORD, "messages"), mistral_tokenizer, 1024, "chat")
    assert reason is None
    text = mistral_tokenizer.decode(r.input_ids, skip_special_tokens=False)
    tools = json.dumps(TOOLS)
    assert text == ("<s> <|system|>\nUse tools.\n<|tools|>\n" + tools + "\n<|user|>\nWeather in Paris?\n"
                    "<|assistant|>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
                    "</tool_call></s>\n<|tool|>\n{\"temp_c\": 18}\n<|assistant|>\n18 degrees in Paris.</s>")
    # the tool call and the answer are trained with their EOS; system, tools, user and tool turns are not
    assert _trained_text(mistral_tokenizer, r) == [
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call></s>",
        "18 degrees in Paris.</s>"]


def test_tokenizer_template_tool_conversation_layout(mistral_tokenizer):
    # mistral v0.3's own template: [AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS] and [TOOL_RESULTS]
    rec = json.loads(json.dumps(OPENAI_TOOL_RECORD).replace("call_1", "call00001"))  # mistral wants 9-char ids
    r, reason = render(_parse(rec, "messages"), mistral_tokenizer, 1024, "tokenizer")
    assert reason is None
    assert _trained_text(mistral_tokenizer, r) == [
        "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"call00001\"}]</s>",
        "18 degrees in Paris.</s>"]
    assert r.input_ids.count(mistral_tokenizer.bos_id) == 1


def test_reasoning_is_trained_in_the_chat_template(mistral_tokenizer):
    rec = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "reasoning_content": "Add them."}]}
    ex = _parse(rec, "messages")
    assert ex.messages[1] == Message("assistant", "4", reasoning="Add them.")
    r, _ = render(ex, mistral_tokenizer, 256, "chat")
    assert _trained_text(mistral_tokenizer, r) == ["<think>\nAdd them.\n</think>\n4</s>"]


def test_tools_have_no_place_in_the_completion_and_alpaca_templates(mistral_tokenizer):
    ex = _parse(OPENAI_TOOL_RECORD, "messages")
    for template in ("completion", "alpaca"):
        assert render(ex, mistral_tokenizer, 1024, template) == (None, "template_mismatch")


@pytest.mark.parametrize("turn, reason, says", [
    ({"role": "assistant", "content": None, "tool_calls": {"name": "f"}}, "bad_tool_call", "must be a list"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}, "bad_tool_call",
     "no function name"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "bad_tool_call", "not valid JSON"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     "bad_tool_call", "must be a JSON object"),
    ({"role": "assistant", "content": None}, "missing_field", "content is null in messages[1]: an assistant turn "
                                                            "needs text or tool_calls"),
    ({"role": "assistant", "content": "x", "weight": 2}, "wrong_type", "'weight' in messages[1] must be 0 or 1"),
    ({"role": "assistant", "content": "x", "weight": 0, "training": True}, "wrong_type", "disagree"),
    ({"role": "user", "content": "x", "weight": 1}, "untrainable_turn", "asks to train a user turn"),
])
def test_bad_tool_and_weight_records_name_the_turn(turn, reason, says):
    rec = {"messages": [{"role": "user", "content": "q"}, turn, {"role": "assistant", "content": "a"}]}
    with pytest.raises(RecordError) as e:
        _parse(rec, "messages")
    assert e.value.reason == reason and says in str(e.value) and str(e.value).startswith("f.jsonl:3: ")


def test_bad_tools_field():
    with pytest.raises(RecordError, match=r"f.jsonl:3: tool 0 of field 'tools' has no 'name'") as e:
        _parse(dict(OPENAI_TOOL_RECORD, tools=[{"description": "x"}]), "messages")
    assert e.value.reason == "bad_tools"
    with pytest.raises(RecordError, match="is a string but not valid JSON") as e:
        _parse(dict(SHAREGPT_TOOL_RECORD, tools="[{"), "sharegpt")


def test_per_turn_weights_label_only_weighted_turns(mistral_tokenizer):
    rec = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad answer.", "weight": 0},
                        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Good.", "weight": 1}]}
    ex = _parse(rec, "messages")
    assert [m.weight for m in ex.messages] == [None, 0, None, 1]
    for template in ("chat", "tokenizer"):
        r, _ = render(ex, mistral_tokenizer, 256, template)
        assert _trained_text(mistral_tokenizer, r) == ["Good.</s>"]
    # axolotl's training / train flags are the same switch; a turn without one is trained
    sg = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Bad.", "training": False},
                            {"from": "human", "value": "Again"}, {"from": "gpt", "value": "Good.", "train": True}]}
    assert [m.weight for m in _parse(sg, "sharegpt").messages] == [None, 0, None, 1]
    # every assistant turn weighted 0: nothing to train, the example is rejected as such
    off = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No.", "weight": 0}]}
    assert render(_parse(off, "messages"), mistral_tokenizer, 256, "chat") == (None, "no_trainable_tokens")


def test_self_instruct_instances_one_example_each():
    rec = {"id": "seed_task_0", "name": "breakfast_suggestion", "instruction": "Suggest a breakfast.",
           "instances": [{"input": "", "output": "Oatmeal."}, {"input": "<noinput>", "output": ["Eggs.", "Toast."]},
                         {"input": "vegan", "output": ""}, "junk"],
           "is_classification": False}
    items, over = parse_records(rec, "instances", "seed.jsonl:1", "seed", "seed.jsonl")
    assert over == 0 and [(e is None, err.reason if err else None, loc) for e, err, loc in items] == [
        (False, None, "seed.jsonl:1 instances[0]"), (False, None, "seed.jsonl:1 instances[1]"),
        (True, "empty_assistant", "seed.jsonl:1 instances[2]"), (True, "wrong_type", "seed.jsonl:1 instances[3]")]
    a, b = items[0][0], items[1][0]
    assert (a.id, a.task, a.messages) == ("seed_task_0#0", "breakfast_suggestion",
                                          [Message("user", "Suggest a breakfast."), Message("assistant", "Oatmeal.")])
    assert a.extra == {"instruction": "Suggest a breakfast.", "input": ""}
    assert (b.id, b.references) == ("seed_task_0#1", ["Eggs.", "Toast."])
    assert a.unused_keys == ("is_classification",) and b.unused_keys == ()  # reported once per record
    items, over = parse_records(rec, "instances", "seed.jsonl:1", "seed", "seed.jsonl", max_instances=1)
    assert len(items) == 1 and over == 3
    assert parse_records({"instruction": "x"}, "instances", "s:2", "s", "s")[0][0][1].reason == "missing_field"


def test_superni_jsonl_records_use_the_tk_instruct_prompt():
    pos = [{"input": "a b", "output": "b a"}]
    rec = {"name": "task_rev", "Definition": ["Reverse the words."], "Positive Examples": pos,
           "Categories": ["Reversal"], "Instances": [{"id": "i0", "input": "c d", "output": ["d c"]}]}
    [(ex, err, loc)], _ = parse_records(rec, "superni_jsonl", "t.jsonl:1", "t", "t.jsonl")
    assert err is None and loc == "t.jsonl:1 Instances[0]"
    assert (ex.id, ex.task, ex.category) == ("i0", "task_rev", "Reversal")
    assert ex.messages == [Message("user", tk_instruct_prompt("Reverse the words.", pos, "c d")),
                           Message("assistant", "d c")]


def test_detection_of_the_new_formats(tmp_path):
    cases = {"instances": {"instruction": "i", "instances": []},
             "superni_jsonl": {"Definition": ["d"], "Instances": []},
             "alpaca": {"instruction": "i", "context": "c", "response": "r", "category": "qa"}}  # Dolly
    for fmt, rec in cases.items():
        assert sniff_format(_jsonl(tmp_path / f"{fmt}.jsonl", [rec])) == fmt


def test_dolly_context_is_the_input():
    ex = _parse({"instruction": "Summarize.", "context": "Long text.", "response": "Short.", "category": "summ"},
                "alpaca")
    assert ex.extra == {"instruction": "Summarize.", "input": "Long text."}
    assert ex.messages[-1] == Message("assistant", "Short.")
    assert ex.unused_keys == ("category",)
    with pytest.raises(RecordError, match=r"f.jsonl:3: keys the alpaca format does not read: category \(--strict") \
            as e:
        _parse({"instruction": "S.", "context": "T.", "response": "S.", "category": "summ"}, "alpaca",
               strict_keys=True)
    assert e.value.reason == "unused_key"


def test_unused_turn_keys_are_listed():
    rec = {"messages": [{"role": "user", "content": "Hi", "lang": "en"}, {"role": "assistant", "content": "Yo"}],
           "meta": {"src": "x"}}
    assert _parse(rec, "messages").unused_keys == ("meta", "messages[].lang")


def _prep(tmp_path, inputs, **kw):
    return prepare_sources(SourcesOptions(inputs=inputs, tokenizer=MISTRAL, out_dir=tmp_path / "out",
                                          seq_len=kw.pop("seq_len", 256), **kw))


def test_self_instruct_file_counts_instances(tmp_path, capsys):
    f = _jsonl(tmp_path / "seed.jsonl", [
        {"id": "t0", "name": "greet", "instruction": "Greet.", "instances": [
            {"input": "", "output": "Hello."}, {"input": "formal", "output": "Good day."},
            {"input": "x", "output": ""}]},
        {"id": "t1", "name": "count", "instruction": "Count.", "instances": [{"input": "1 2", "output": "2"}],
         "is_classification": False},
        {"id": "t2", "instruction": "No instances."}])
    m = _prep(tmp_path, [f], on_error="skip")
    src = m["sources"][0]
    assert (src["format"], src["template"]) == ("instances", "alpaca")
    assert src["counts"] == {"read": 5, "written": 3, "rejected": {"empty_assistant": 1, "missing_field": 1}}
    assert src["unused_keys"] == {"is_classification": 1}
    assert m["splits"]["train"]["tasks"] == ["greet", "count"]  # each record names its task
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["record"] for r in rejects] == [f"{f}:1 instances[2]", f"{f}:3"]
    # the cap reads the first N instances of each record and says how many it left
    assert main(["prepare", "--input", str(f), "--tokenizer", str(MISTRAL), "--out", str(tmp_path / "cap"),
                 "--seq-len", "256", "--on-error", "skip", "--max-instances-per-task", "1"]) == 0
    out = capsys.readouterr().out
    assert "read 3 = written 2 + rejected 1" in out and "2 instances beyond --max-instances-per-task not read" in out
    assert "unused keys: is_classification (1 records)" in out


def test_self_instruct_task_names_and_heldout_eval(tmp_path):
    f = _jsonl(tmp_path / "si.jsonl", [
        {"name": "greet", "instruction": "Greet.", "instances": [{"input": "", "output": "Hello."}]},
        {"name": "count", "instruction": "Count.", "instances": [{"input": "1 2", "output": ["2", "two"]}]}])
    m = _prep(tmp_path, [f], heldout_tasks=["count"])  # task names read from 'name', no --task-field needed
    assert m["splits"]["train"]["tasks"] == ["greet"] and m["splits"]["test"]["tasks"] == ["count"]
    [inst] = [json.loads(x) for x in (tmp_path / "out" / "test_eval.jsonl").read_text().splitlines()]
    assert (inst["id"], inst["task_id"], inst["references"]) == ("si.jsonl:2#0", "count", ["2", "two"])


def test_a_run_that_writes_nothing_fails(tmp_path):
    # Self-Instruct read as alpaca: every record lacks 'output'; skipping them all must not pass as a dataset
    f = _jsonl(tmp_path / "si.jsonl", [{"instruction": "Greet.", "instances": [{"input": "", "output": "Hi."}]}] * 3)
    with pytest.raises(DataFormatError, match=r"no example written: read 3 = written 0 \+ rejected 3; reasons "
                                              r"\{'missing_field': 3\}"):
        _prep(tmp_path, [f], format="alpaca", on_error="skip")


def test_dolly_unused_keys_reported_and_strict(tmp_path, capsys):
    f = _jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Summarize.", "context": "Text.", "response": "Short.", "category": "summarization"},
        {"instruction": "Name one.", "context": "", "response": "Paris.", "category": "open_qa"}])
    assert main(["prepare", "--input", str(f), "--tokenizer", str(MISTRAL), "--out", str(tmp_path / "a"),
                 "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "unused keys: category (2 records)" in out
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["sources"][0]["unused_keys"] == {"category": 2}
    assert main(["prepare", "--input", str(f), "--tokenizer", str(MISTRAL), "--out", str(tmp_path / "b"),
                 "--seq-len", "256", "--strict-keys"]) == 2
    err = capsys.readouterr().err
    assert f"{f}:1: keys the alpaca format does not read: category (--strict-keys)" in err


def test_template_dropping_the_system_message_is_counted(tmp_path, capsys):
    # mistral v0.3's template writes the system message only into a final user turn: training conversations
    # end with the assistant, so it vanishes; the count says so
    f = _jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "left over"}]}] * 2)
    assert main(["prepare", "--input", str(f), "--tokenizer", str(MISTRAL), "--out", str(tmp_path / "o"),
                 "--seq-len", "256", "--template", "tokenizer"]) == 0
    out = capsys.readouterr().out
    assert "the chat template left out 2 system messages" in out
    assert "2 turns after the last assistant turn dropped" in out
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["sources"][0]["dropped"] == {"template_system": 2, "trailing_turns": 2}
    assert m["sources"][0]["assistant_turns"] == {"trained": 2, "untrained": 0}


def test_manifest_counts_trained_and_untrained_turns(tmp_path):
    f = _jsonl(tmp_path / "w.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A.", "weight": 0},
                      {"role": "user", "content": "Again"}, {"role": "assistant", "content": "B."}]},
        OPENAI_TOOL_RECORD])
    m = _prep(tmp_path, [f])
    assert m["sources"][0]["assistant_turns"] == {"trained": 3, "untrained": 1}
    assert m["sources"][0]["counts"] == {"read": 2, "written": 2, "rejected": {}}


def test_read_source_yields_every_instance(tmp_path):
    f = _jsonl(tmp_path / "si.jsonl", [{"instruction": "I.", "instances": [{"input": "", "output": "a"},
                                                                            {"input": "", "output": "b"}]}])
    assert [ex.id for ex, _, _ in read_source(f)] == ["si.jsonl:1#0", "si.jsonl:1#1"]


def test_eval_prompt_of_a_tool_conversation_ends_before_the_answer(mistral_tokenizer):
    ex = _parse(OPENAI_TOOL_RECORD, "messages")
    prompt = mistral_tokenizer.decode(render_prompt(ex, mistral_tokenizer, "chat"), skip_special_tokens=False)
    assert prompt.endswith("<|tool|>\n{\"temp_c\": 18}\n<|assistant|>\n")


def test_mistral_answer_trained_from_the_end_of_the_prompt(mistral_tokenizer):
    # mistral v0.3 writes " " + answer after [/INST]: the space token the model writes first is trained too
    ex = _parse({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "6"}]}, "messages")
    r, _ = render(ex, mistral_tokenizer, 64, "tokenizer")
    assert [(mistral_tokenizer.id_to_token(i), lab != IGNORE_INDEX) for i, lab in zip(r.input_ids, r.labels)] == [
        ("<s>", False), ("[INST]", False), ("▁q", False), ("[/INST]", False), ("▁", True), ("6", True),
        ("</s>", True)]


@pytest.mark.parametrize("turns, says", [
    ([{"role": "tool", "content": "orphan"}], "tool result in messages[1] answers no tool call"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "a1", "function": {"name": "f", "arguments": {}}}]},
      {"role": "tool", "tool_call_id": "zz", "content": "r"}], "answers tool_call_id 'zz', which no open call has"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
      {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}], "more results than calls"),
])
def test_tool_results_must_answer_a_call(turns, says):
    rec = {"messages": [{"role": "user", "content": "q"}, *turns, {"role": "assistant", "content": "a"}]}
    with pytest.raises(RecordError, match="f.jsonl:3: ") as e:
        _parse(rec, "messages")
    assert e.value.reason == "bad_tool_call" and says in str(e.value)


def test_reasoning_only_turn_left_out_by_the_template_is_rejected(mistral_tokenizer):
    ex = _parse({"messages": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "", "reasoning_content": "thinking only"}]}, "messages")
    assert render(ex, mistral_tokenizer, 64, "tokenizer") == (None, "empty_assistant")


def test_empty_instance_list_is_counted():
    [(ex, err, loc)], _ = parse_records({"name": "t", "instruction": "I.", "instances": []}, "instances", "s:4", "s",
                                        "s")
    assert ex is None and err.reason == "no_instances" and loc == "s:4"


def test_parquet_nulls_are_absent_keys(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "t.parquet"  # Arrow fills each struct with every key any record has: as None
    pq.write_table(pa.Table.from_pylist([OPENAI_TOOL_RECORD, {"messages": [
        {"role": "user", "content": "plain"}, {"role": "assistant", "content": "plain answer"}]}]), f)
    exs = [ex for ex, _, _ in read_source(f, strict_keys=True)]
    assert exs[0].tools == TOOLS and exs[0].messages == _parse(OPENAI_TOOL_RECORD, "messages").messages
    assert exs[1].tools is None and exs[1].unused_keys == ()
    # and in JSON, a key set to null is absent too (not an unused key)
    rec = {"messages": [{"role": "user", "content": "q", "refusal": None},
                        {"role": "assistant", "content": "a", "tool_calls": None, "weight": None}]}
    assert _parse(rec, "messages", strict_keys=True).unused_keys == ()


def test_failed_run_leaves_its_rejects_file(tmp_path):
    f = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "a"}, {"instruction": "b", "output": ""}])
    with pytest.raises(DataFormatError, match="no example written"):
        _prep(tmp_path, [f], format="alpaca", on_error="skip")
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["record"], r["reason"]) for r in rejects] == [(f"{f}:1", "missing_field"), (f"{f}:2", "empty_assistant")]


def test_nested_formats_can_be_forced(tmp_path, capsys):
    # the first record has no instances: auto-detection cannot tell, --format instances can
    f = _jsonl(tmp_path / "si.jsonl", [{"id": "s0", "name": "n0", "instruction": "Do"},
                                       {"id": "s1", "name": "n1", "instruction": "Do", "instances": [
                                           {"input": "", "output": "o"}]}])
    assert main(["prepare", "--input", str(f), "--tokenizer", str(MISTRAL), "--out", str(tmp_path / "o"),
                 "--seq-len", "64", "--format", "instances", "--on-error", "skip"]) == 0
    assert "read 2 = written 1 + rejected 1 {'missing_field': 1}" in capsys.readouterr().out


def test_inspect_decodes_byte_fallback_runs(mistral_tokenizer):
    from data_tools.cli import _shown

    ids, _ = mistral_tokenizer.encode_with_offsets("pua \U000F0000 ok")  # the character is 4 byte-fallback tokens
    assert [mistral_tokenizer.id_to_token(i) for i in ids][3:7] == ["<0xF3>", "<0xB0>", "<0x80>", "<0x80>"]
    assert _shown(mistral_tokenizer, ids, [-100] * 3 + ids[3:]) == " pua [[\U000F0000]][[ ok]]"
    assert _shown(mistral_tokenizer, ids, [-100] * 5 + ids[5:]) == " pua \ufffd[[\ufffd\ufffd]][[ ok]]"  # split bytes
