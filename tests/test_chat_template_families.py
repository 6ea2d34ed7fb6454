"""The published chat templates of the families users train (Llama 3.x, Qwen2.5, Qwen3, Gemma 2/3, Mistral v3 and
Tekken, Phi-3/4, SmolLM3, GPT-OSS harmony), wrapped around the shared tokenizer's vocabulary (tests/chat_template_zoo.py):
per template the exact trained spans (assistant text, the reasoning and tool calls the template writes, and its
end-of-turn token; never headers, system, user or tool turns), exactly one BOS, the messages a template leaves out,
and two renders per example whatever the number of turns."""

from collections import Counter

import pytest

from itune.data import render as render_mod
from itune.data.render import render_batch, template_probe
from itune.data.sources import Example, Message
from itune.data.tokenizer import TextTokenizer
from tests.chat_template_zoo import TEMPLATE_NAMES, build_tokenizer_dir
from tests.test_data_formats import trained_spans

CALL = ({"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "abc123XYZ"},)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
PLAIN = Example("p", [Message("user", "Hi there"), Message("assistant", "Hello!"), Message("user", "Bye"),
                      Message("assistant", "Bye now.")], "t")
SYSTEM = Example("s", [Message("system", "Be terse.")] + PLAIN.messages, "t")
TOOL_CONV = Example("tc", [Message("user", "Weather in Paris?"), Message("assistant", "", tool_calls=CALL),
                           Message("tool", '{"temp_c": 18}', tool_call_id="abc123XYZ", name="get_weather"),
                           Message("assistant", "18 degrees.")], "t", tools=TOOLS)
REASONING = Example("r", [Message("user", "2+2?"), Message("assistant", "4", reasoning="add them"),
                          Message("user", "3+3?"), Message("assistant", "6", reasoning="add again")], "t")

LLAMA_TOOL = ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "18 degrees.<|eot_id|>"]
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
NO_THINK = "<think>\n\n</think>\n\n"
MISTRAL_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123XYZ"}]</s>'
HARMONY = "<|channel|>final<|message|>"
#: per template: trained spans of PLAIN, of TOOL_CONV (None: the template refuses tool conversations), of REASONING
#: with the reasoning messages it leaves out, and the messages it leaves out of SYSTEM (None: it refuses it)
EXPECTED = {
    "llama3.1": (["Hello!<|eot_id|>", "Bye now.<|eot_id|>"], LLAMA_TOOL, 2, {}),
    "llama3.2": (["Hello!<|eot_id|>", "Bye now.<|eot_id|>"], LLAMA_TOOL, 2, {}),
    "qwen2.5": (["Hello!<|im_end|>", "Bye now.<|im_end|>"], [QWEN_CALL, "18 degrees.<|im_end|>"], 2, {}),
    "qwen3": (["Hello!<|im_end|>", NO_THINK + "Bye now.<|im_end|>"], [QWEN_CALL, NO_THINK + "18 degrees.<|im_end|>"],
              1, {}),
    "gemma2": (["Hello!<end_of_turn>", "Bye now.<end_of_turn>"], None, 2, None),
    "gemma3": (["Hello!<end_of_turn>", "Bye now.<end_of_turn>"], None, 2, {}),
    "mistral-v3": (["Hello!</s>", "Bye now.</s>"], ["[TOOL_CALLS] [" + MISTRAL_CALL, "18 degrees.</s>"], 2,
                   {"system": 1}),
    "mistral-tekken": (["Hello!</s>", "Bye now.</s>"], ["[TOOL_CALLS][" + MISTRAL_CALL, "18 degrees.</s>"], 2,
                       {"system": 1}),
    "phi3": (["Hello!<|end|>", "Bye now.<|end|>"], None, 2, {}),
    "phi4": (["Hello!<|im_end|>", "Bye now.<|im_end|>"], None, 2, {}),
    # SmolLM3 writes neither tool calls nor reasoning (its default /think mode keeps no <think> block in history)
    "smollm3": (["Hello!<|im_end|>", "Bye now.<|im_end|>"], None, 2, {}),
    "gpt-oss": ([HARMONY + "Hello!<|end|>", HARMONY + "Bye now.<|return|>"],
                ['to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
                 HARMONY + "18 degrees.<|return|>"], 1, {}),
}
REASONING_LAST = {  # the last REASONING turn's trained span where the template keeps the reasoning
    "qwen3": "<think>\nadd again\n</think>\n\n6<|im_end|>",
    "gpt-oss": "<|channel|>analysis<|message|>add again<|end|><|start|>assistant" + HARMONY + "6<|return|>",
}


@pytest.fixture(scope="module", params=TEMPLATE_NAMES)
def family(request, tmp_path_factory):
    return request.param, TextTokenizer.load(build_tokenizer_dir(request.param, tmp_path_factory.mktemp("tok")))


def _render(tok, ex):
    dropped = Counter()
    [(r, reason, err)] = render_batch([ex], tok, 4096, "tokenizer", dropped=dropped)
    return r, reason, dropped


def _trained(tok, r):
    return trained_spans(tok, r[0].tolist(), r[1].tolist())


def test_every_family_has_expectations():
    assert set(EXPECTED) == set(TEMPLATE_NAMES)


def test_plain_conversation_trains_answers_and_end_of_turn(family):
    name, tok = family
    r, reason, dropped = _render(tok, PLAIN)
    assert reason is None and dropped == {}
    assert _trained(tok, r) == EXPECTED[name][0]
    ids = r[0].tolist()
    assert ids.count(tok.bos_id) == (1 if tok.bos_id is not None else 0)  # exactly one BOS, first
    assert tok.bos_id is None or ids[0] == tok.bos_id


def test_tool_conversation(family):
    name, tok = family
    r, reason, dropped = _render(tok, TOOL_CONV)
    want = EXPECTED[name][1]
    if want is None:
        assert r is None and reason == "template_error"  # the template has no tool calls: refused, never mangled
        return
    assert reason is None and _trained(tok, r) == want and dropped == {}


def test_reasoning_kept_where_the_template_keeps_it(family):
    name, tok = family
    r, reason, dropped = _render(tok, REASONING)
    assert reason is None and dropped == {"reasoning": EXPECTED[name][2]}
    spans = _trained(tok, r)
    assert spans[-1] == REASONING_LAST.get(name, EXPECTED[name][0][-1].replace("Bye now.", "6"))


def test_system_message_kept_or_counted(family):
    name, tok = family
    r, reason, dropped = _render(tok, SYSTEM)
    if EXPECTED[name][3] is None:
        assert reason == "template_error"  # gemma 2 refuses a system role
        return
    assert reason is None and dropped == EXPECTED[name][3]
    assert _trained(tok, r) == EXPECTED[name][0]
    text = tok.decode(r[0].tolist(), skip_special_tokens=False)
    assert ("Be terse." in text) == (not dropped)


HEADERS = {"llama3.1": ("<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",)),
           "llama3.2": ("<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",)),
           "qwen2.5": ("<|im_start|>assistant\n", ("<|im_end|>",)), "qwen3": ("<|im_start|>assistant\n", ("<|im_end|>",)),
           "gemma2": ("<start_of_turn>model\n", ("<end_of_turn>",)),
           "gemma3": ("<start_of_turn>model\n", ("<end_of_turn>",)),
           "mistral-v3": ("", ("</s>",)), "mistral-tekken": ("", ("</s>",)),
           "phi3": ("<|assistant|>\n", ("<|end|>",)), "phi4": ("<|im_start|>assistant<|im_sep|>", ("<|im_end|>",)),
           "smollm3": ("<|im_start|>assistant\n", ("<|im_end|>",)),
           "gpt-oss": ("<|start|>assistant", ("<|return|>", "<|call|>", "<|end|>"))}


def test_probe_finds_each_templates_generation_prompt_and_end_of_turn(family):
    name, tok = family
    probe = template_probe(tok)
    assert (probe.header, probe.end_of_turn) == HEADERS[name]


def test_two_renders_per_example_whatever_the_turns(family, monkeypatch):
    name, tok = family
    turns = [m for _ in range(100) for m in (Message("user", "Hi there"), Message("assistant", "Hello!"))]
    template_probe(tok)  # measured once per template
    calls = Counter()
    apply = render_mod.apply_chat_template

    def counting(*a, **kw):
        calls["render"] += 1
        return apply(*a, **kw)

    monkeypatch.setattr(render_mod, "apply_chat_template", counting)
    r, reason, _ = _render(tok, Example("long", turns, "t"))
    assert reason is None and calls["render"] == 2
    assert len(_trained(tok, r)) == 100


def test_chat_template_kwargs_reach_training_text_and_eval_prompts(tmp_path):
    """--chat-template-kwargs '{"enable_thinking": false}': SmolLM3's /no_think system header and empty think
    block in the training text and in the held-out prompts; recorded in the manifest and the template fingerprint."""
    import json

    from itune.data.prepare import SourcesOptions, prepare_sources

    tok_dir = build_tokenizer_dir("smollm3", tmp_path / "tok")
    rec = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({**rec, "task": t}) + "\n" for t in ("a", "b")))

    def prep(out, **kw):
        return prepare_sources(SourcesOptions(inputs=[src], tokenizer=tok_dir, out_dir=tmp_path / out, seq_len=2048,
                                              template="tokenizer", task_field="task", heldout_tasks=["b"], **kw))

    plain, off = prep("plain"), prep("off", chat_template_kwargs='{"enable_thinking": false}')
    assert (plain["chat_template_kwargs"], off["chat_template_kwargs"]) == ({}, {"enable_thinking": False})
    assert off["chat_template_kwargs_effects"] == {"enable_thinking": "conversations and prompts"}
    assert "chat_template_kwargs_effects" not in plain
    assert plain["template_fingerprint"] != off["template_fingerprint"]
    tok = TextTokenizer.load(tok_dir)
    for out, mode, answer_head in (("plain", "/think", ""), ("off", "/no_think", "<think>\n\n</think>\n")):
        from itune.data.shards import open_split

        [row] = open_split(tmp_path / out, "train").to_pylist()
        text = tok.decode(row["input_ids"], skip_special_tokens=False)
        assert f"Reasoning Mode: {mode}\n" in text
        after_user = text.split("<|im_start|>user\nHi there<|im_end|>\n", 1)[1]  # (then padding)
        assert after_user.startswith("<|im_start|>assistant\n" + answer_head + "Hello!<|im_end|>\n")
        assert trained_spans(tok, row["input_ids"], row["labels"]) == ["Hello!<|im_end|>"]  # header untrained
        [ev] = [json.loads(x) for x in (tmp_path / out / "test_eval.jsonl").read_text().splitlines()]
        prompt = tok.decode(ev["prompt_ids"], skip_special_tokens=False)
        assert prompt.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n" + answer_head)


@pytest.mark.parametrize("kwargs, words", [
    ('{"enable_thinkin": false}', "never reads enable_thinkin (its inputs besides messages and tools: "
                                  "enable_thinking, python_tools, xml_tools); remove or rename it"),
    ('{"messages": []}', "messages is set by itune itself"),
    ('{"enable_thinking": true}', "enable_thinking changes nothing the chat template of "),  # SmolLM3's default
    ('[1]', "must be a JSON object"),
    ("{enable_thinking: false}", "not JSON"),
])
def test_chat_template_kwargs_refused(tmp_path, kwargs, words):
    from itune.data.render import check_chat_template_kwargs
    from itune.errors import ConfigError

    tok = TextTokenizer.load(build_tokenizer_dir("smollm3", tmp_path / "tok"))
    with pytest.raises(ConfigError, match="--chat-template-kwargs") as e:
        check_chat_template_kwargs(kwargs, tok)
    assert words in str(e.value)


def test_chat_template_kwargs_that_change_nothing_written_are_refused(tmp_path):
    """Mistral v3's template reads loop_messages but sets it itself: refused. It writes system_message only before a
    final user turn: accepted, and said to change the prompts only (the training text lacks it)."""
    from itune.data.render import check_chat_template_kwargs, template_kwargs_effects
    from itune.errors import ConfigError
    from tests.conftest import MISTRAL

    tok = TextTokenizer.load(MISTRAL)
    with pytest.raises(ConfigError) as e:
        check_chat_template_kwargs({"system_message": "Be brief.", "loop_messages": []}, tok)
    assert str(e.value) == (f"--chat-template-kwargs: loop_messages changes nothing the chat template of {MISTRAL} "
                            "writes for a user / assistant conversation or its generation prompt; remove it")
    assert template_kwargs_effects({"system_message": "Be brief."}, tok) == {"system_message": "prompts only"}
    qwen3 = TextTokenizer.load(build_tokenizer_dir("qwen3", tmp_path / "qwen3"))
    assert check_chat_template_kwargs('{"enable_thinking": false}', qwen3) == {"enable_thinking": False}
    assert template_kwargs_effects({"enable_thinking": False}, qwen3) == {"enable_thinking": "prompts only"}


def test_chat_template_kwargs_need_the_tokenizer_template(tmp_path):
    from itune.data.prepare import SourcesOptions, prepare_sources
    from itune.errors import ConfigError

    src = tmp_path / "chat.jsonl"
    src.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(ConfigError, match="no source uses the tokenizer's chat template \\(templates: chat\\)"):
        prepare_sources(SourcesOptions(inputs=[src], tokenizer=build_tokenizer_dir("smollm3", tmp_path / "tok"),
                                       out_dir=tmp_path / "out", template="chat",
                                       chat_template_kwargs={"enable_thinking": False}))
