"""Exact label layouts of the alpaca, completion, chat and tokenizer templates (mistral-7b-v0.3 ids), and the
multi-turn masking pitfalls: first answer token, EOS when pad == eos, one BOS, role aliases, every turn, end of turn,
linear cost."""

import dataclasses
import json

import pytest

from itune.data import render as render_mod
from itune.data.render import (ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX, render, render_prompt,
                               segments)
from itune.data.sources import Example, Message, parse_record
from itune.errors import ConfigError
from tests.test_sources import SHAREGPT_DUMMY

X = IGNORE_INDEX


def _rec(rec, fmt):
    return parse_record(rec, fmt, "f.jsonl:1", "f", "f.jsonl")


CONV = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Bye."}]}


def _layout(tok, ex, template, **kw):
    r, reason = render(ex, tok, 1 << 16, template, **kw)
    assert reason is None
    return r


def test_alpaca_prompt_dict_text():
    # tatsu-lab/stanford_alpaca train.py PROMPT_DICT, verbatim
    assert ALPACA_PROMPT_NO_INPUT.format(instruction="I") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nI\n\n### Response:")
    assert ALPACA_PROMPT_INPUT.format(instruction="I", input="J") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nI\n\n### Input:\nJ\n\n"
        "### Response:")


def test_alpaca_layout_with_input(mistral_tokenizer):
    ex = _rec({"instruction": "Add.", "input": "2 3", "output": "5\n\n"}, "alpaca")
    segs = segments(ex, "alpaca")
    assert segs[0].text == ALPACA_PROMPT_INPUT.format(instruction="Add.", input="2 3") + "\n"
    assert not segs[0].trainable
    assert (segs[1].text, segs[1].trainable) == ("5", True)  # trailing blank lines of the output are stripped
    r = _layout(mistral_tokenizer, ex, "alpaca")
    assert r.input_ids == [1, 21579, 1117, 1164, 13894, 1137, 14734, 1032, 4406, 29493, 6649, 2128, 1163, 1164, 3555,
                           1137, 6080, 4397, 3526, 29491, 12786, 1032, 3667, 1137, 7350, 2767, 3459, 1042, 1040, 2927,
                           29491, 781, 781, 28100, 3901, 3880, 29515, 781, 2759, 29491, 781, 781, 28100, 12000, 29515,
                           781, 29518, 29473, 29538, 781, 781, 28100, 12875, 29515, 781, 29550, 2]
    # "### Response:" "\n" | "5" </s>: the output and the EOS are trained, the newline is prompt
    assert r.labels == [X] * 55 + [29550, 2]
    assert render_prompt(ex, mistral_tokenizer, "alpaca") == r.input_ids[:55]


def test_alpaca_layout_without_input(mistral_tokenizer):
    ex = _rec({"instruction": "Say hi.", "input": "<noinput>", "output": "hi"}, "alpaca")
    r = _layout(mistral_tokenizer, ex, "alpaca")
    assert r.input_ids == [1, 21579, 1117, 1164, 13894, 1137, 14734, 1032, 4406, 29491, 12786, 1032, 3667, 1137, 7350,
                           2767, 3459, 1042, 1040, 2927, 29491, 781, 781, 28100, 3901, 3880, 29515, 781, 29503, 1107,
                           12782, 29491, 781, 781, 28100, 12875, 29515, 781, 6133, 2]
    assert r.labels == [X] * 38 + [6133, 2]


def test_alpaca_template_refuses_conversations(mistral_tokenizer):
    assert render(_rec(CONV, "messages"), mistral_tokenizer, 512, "alpaca") == (None, "template_mismatch")


def test_prompt_completion_layout(mistral_tokenizer):
    ex = _rec({"prompt": "Q: 2+3?\nA:", "completion": " 5"}, "prompt_completion")
    r = _layout(mistral_tokenizer, ex, "completion")
    # <s> ▁Q : ▁ 2 + 3 ? \n A : | ▁ 5 </s>
    assert r.input_ids == [1, 1954, 29515, 29473, 29518, 29574, 29538, 29572, 781, 29509, 29515, 29473, 29550, 2]
    assert r.labels == [X] * 11 + [29473, 29550, 2]
    assert render_prompt(ex, mistral_tokenizer, "completion") == r.input_ids[:11]


CHAT_IDS = [1, 1291, 29534, 7342, 29534, 29535, 781, 4342, 4404, 1099, 29491, 781,  # ▁<|system|>\nBe terse.\n
            29557, 29534, 2606, 29534, 29535, 781, 24577, 781,  # <|user|>\nHi\n
            29557, 29534, 1257, 11911, 29534, 29535, 781,  # <|assistant|>\n
            16998, 29576, 2,  # Hello ! </s>
            781, 29557, 29534, 2606, 29534, 29535, 781, 2698, 29474, 781,  # \n<|user|>\nBye\n
            29557, 29534, 1257, 11911, 29534, 29535, 781,  # <|assistant|>\n
            2698, 29474, 29491, 2]  # By e . </s>


def test_chat_layout_every_assistant_turn_trained(mistral_tokenizer):
    ex = _rec(CONV, "messages")
    assert "".join(s.text for s in segments(ex, "chat")) == (
        "<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\nHello!\n<|user|>\nBye\n<|assistant|>\nBye.")
    r = _layout(mistral_tokenizer, ex, "chat")
    assert r.input_ids == CHAT_IDS
    # both turns and both end-of-turn EOS are trained; headers, system and user turns are not
    assert r.labels == [X] * 27 + [16998, 29576, 2] + [X] * 17 + [2698, 29474, 29491, 2]
    assert render_prompt(ex, mistral_tokenizer, "chat") == CHAT_IDS[:47]


def test_chat_layout_train_on_last(mistral_tokenizer):
    r = _layout(mistral_tokenizer, _rec(CONV, "messages"), "chat", train_on="last")
    assert r.input_ids == CHAT_IDS  # the earlier turn's EOS stays in the input, untrained
    assert r.labels == [X] * 47 + [2698, 29474, 29491, 2]


def test_sharegpt_chat_layout(mistral_tokenizer):
    ex = _rec({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}, "sharegpt")
    r = _layout(mistral_tokenizer, ex, "chat")
    assert r.input_ids == [1, 1291, 29534, 2606, 29534, 29535, 781, 24577, 781, 29557, 29534, 1257, 11911, 29534,
                           29535, 781, 16998, 29576, 2]
    assert r.labels == [X] * 16 + [16998, 29576, 2]


@pytest.mark.parametrize("speaker", ["gpt", "chatgpt", "bing", "bard", "model"])
def test_role_aliases_are_trained(mistral_tokenizer, speaker):
    ex = _rec({"conversations": [{"from": "human", "value": "Hi"}, {"from": speaker, "value": "Hello!"}]}, "sharegpt")
    for template in ("chat", "tokenizer", "completion"):
        r = _layout(mistral_tokenizer, ex, template)
        assert r.num_trainable == 3 and r.labels[-3:] == [16998 if template == "chat" else 23325, 29576, 2]


def test_tokenizer_template_layout(mistral_tokenizer):
    ex = _rec(CONV, "messages")
    r = _layout(mistral_tokenizer, ex, "tokenizer")
    # mistral v0.3: <s>[INST] Hi[/INST] Hello!</s>[INST] Bye[/INST] Bye.</s> (its template puts the system message
    # into the last user turn only, so a conversation ending with an assistant turn has none)
    assert r.input_ids == [1, 3, 16127, 4, 23325, 29576, 2, 3, 3231, 29474, 4, 3231, 29474, 29491, 2]
    assert r.labels == [X] * 4 + [23325, 29576, 2] + [X] * 4 + [3231, 29474, 29491, 2]
    assert r.input_ids.count(1) == 1  # the template writes "<s>": still exactly one BOS
    r = _layout(mistral_tokenizer, ex, "tokenizer", train_on="last")
    assert r.labels == [X] * 11 + [3231, 29474, 29491, 2]


def test_tokenizer_template_generation_prompt(mistral_tokenizer):
    ex = _rec({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
              "messages")
    r = _layout(mistral_tokenizer, ex, "tokenizer")
    assert render_prompt(ex, mistral_tokenizer, "tokenizer") == [1, 3, 16127, 4] == r.input_ids[:4]


def _with_template(tok, template):
    return dataclasses.replace(tok, chat_template=template)


def test_tokenizer_template_end_of_turn_and_bos(mistral_tokenizer):
    # a ChatML-like template writing BOS text, and "</s>" + "\n" after each assistant message
    tok = _with_template(mistral_tokenizer, "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
                                            "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
                                            "{% endfor %}")
    ex = _rec({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                            {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]}, "messages")
    segs = segments(ex, "tokenizer", tok)
    assert [(s.text, s.trainable, s.ends_with_eos) for s in segs] == [
        ("<|user|>Hi\n<|assistant|>", False, False), ("Yo</s>", True, False),
        ("\n<|user|>A\n<|assistant|>", False, False), ("B</s>", True, False), ("\n", False, False)]
    r = _layout(tok, ex, "tokenizer")
    assert r.input_ids.count(1) == 1 and r.input_ids[0] == 1
    trained = [i for i, x in zip(r.input_ids, r.labels) if x != X]
    assert trained == [29570, 29477, 2, 29528, 2]  # Y o </s> B </s>: the end-of-turn token is trained, "\n" is not
    assert r.labels[-1] == X and r.input_ids[-1] == 781


def test_tokenizer_template_without_end_of_turn_gets_trained_eos(mistral_tokenizer):
    tok = _with_template(mistral_tokenizer, "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    ex = _rec({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "messages")
    r = _layout(tok, ex, "tokenizer")
    assert r.input_ids.count(1) == 1 and r.input_ids[0] == 1
    assert [i for i, x in zip(r.input_ids, r.labels) if x != X] == [1395, 29477, 2]  # ▁Y o </s>


def test_tokenizer_template_errors(mistral_tokenizer):
    # mistral's template requires alternating user/assistant turns: the record is rejected, not the run
    ex = Example("e", [Message("assistant", "a")], "t")
    assert render(ex, mistral_tokenizer, 512, "tokenizer") == (None, "template_error")
    # a template that cuts assistant messages: their spans cannot be located, the record is rejected
    cut = _with_template(mistral_tokenizer, "{% for m in messages %}{{ m.content[:3] }}{% endfor %}")
    assert render(_rec(CONV, "messages"), cut, 512, "tokenizer") == (None, "template_error")
    # one that transforms them uniformly still is located: the rendered (upper-cased) answer is trained
    upper = _with_template(mistral_tokenizer, "{% for m in messages %}{{ m.content | upper }}{% endfor %}")
    r, _ = render(_rec(CONV, "messages"), upper, 512, "tokenizer")
    assert mistral_tokenizer.decode([x for x in r.labels if x != X]) == "HELLO!BYE."
    with pytest.raises(ConfigError, match="no chat template"):
        render(ex, _with_template(mistral_tokenizer, None), 512, "tokenizer")
    with pytest.raises(ConfigError, match="unknown template"):
        render(ex, mistral_tokenizer, 512, "vicuna")


def test_eos_trained_when_pad_equals_eos(mistral_tokenizer):
    assert mistral_tokenizer.pad_id == mistral_tokenizer.eos_id
    ex = _rec(CONV, "messages")
    for template in ("chat", "tokenizer", "completion"):
        r = _layout(mistral_tokenizer, ex, template)
        assert r.labels[-1] == r.input_ids[-1] == mistral_tokenizer.eos_id
        assert sum(1 for x in r.labels if x == 2) == 2  # one per assistant turn


def test_rendering_is_linear_in_turns(mistral_tokenizer, monkeypatch):
    calls = {"encode": 0, "render": 0}
    encode = type(mistral_tokenizer).encode_with_offsets
    encode_batch = type(mistral_tokenizer).encode_batch
    encode_batch_flat = type(mistral_tokenizer).encode_batch_flat
    apply = render_mod.apply_chat_template

    def counting_encode(self, text, *a):
        calls["encode"] += 1
        return encode(self, text, *a)

    def counting_encode_batch(self, texts, *a):
        calls["encode"] += len(texts)
        return encode_batch(self, texts, *a)

    def counting_encode_batch_flat(self, texts, *a):
        calls["encode"] += len(texts)
        return encode_batch_flat(self, texts, *a)

    def counting_apply(*a, **k):
        calls["render"] += 1
        return apply(*a, **k)

    monkeypatch.setattr(type(mistral_tokenizer), "encode_with_offsets", counting_encode)
    monkeypatch.setattr(type(mistral_tokenizer), "encode_batch", counting_encode_batch)
    monkeypatch.setattr(type(mistral_tokenizer), "encode_batch_flat", counting_encode_batch_flat)
    monkeypatch.setattr(render_mod, "apply_chat_template", counting_apply)
    turns = []
    for i in range(200):
        turns += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    ex = _rec({"messages": turns}, "messages")
    for template in ("chat", "tokenizer"):
        calls.update(encode=0, render=0)
        r = _layout(mistral_tokenizer, ex, template)
        assert sum(1 for x in r.labels if x == 2) == 200  # every turn's EOS trained
        # one tokenizer call per example, and two template renderings (plain + marked) whatever the turn count
        assert calls == {"encode": 1, "render": 2 if template == "tokenizer" else 0}


def test_tokenizer_template_matches_transformers_on_sharegpt_dummy(mistral_tokenizer):
    """The rendered ids equal transformers' apply_chat_template(tokenize=True) on the real file."""
    from transformers import AutoTokenizer

    from tests.conftest import MISTRAL

    hf = AutoTokenizer.from_pretrained(str(MISTRAL))
    records = json.loads(SHAREGPT_DUMMY.read_text())
    for i, rec in enumerate(records[:100]):
        ex = _rec(rec, "sharegpt")
        r = _layout(mistral_tokenizer, ex, "tokenizer")
        ref = hf.apply_chat_template([{"role": m.role, "content": m.content} for m in ex.messages], tokenize=True)
        ref = ref["input_ids"] if not isinstance(ref, list) else ref
        assert r.input_ids == ref, i
        assert r.num_trainable == sum(len(hf.encode(" " + m.content.strip(), add_special_tokens=False)) + 1
                                      for m in ex.messages if m.role == "assistant"), i
