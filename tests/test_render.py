"""Exact label layouts: rendering, masks, BOS/EOS, over-length policies."""

from itune.data.render import IGNORE_INDEX, render, render_prompt
from itune.data.sources import Example, Message, tk_instruct_prompt
from itune.data.tokenizer import TextTokenizer


def _example(output="no way"):
    p = tk_instruct_prompt("Say yes", [{"input": "a", "output": "yes"}], "b")
    return Example("x", [Message("user", p), Message("assistant", output)], "t")


def test_tk_instruct_prompt_text():
    assert tk_instruct_prompt("Say yes", [{"input": "a", "output": "yes"}], "b") == (
        "Definition: Say yes.\n\n Positive Example 1 -\nInput: a.\n Output: yes.\n\n"
        "Now complete the following example -\nInput: b.\nOutput:"
    )


def test_exact_label_layout_mistral(mistral_tokenizer):
    r, reason = render(_example(), mistral_tokenizer, 512)
    assert reason is None
    assert r.input_ids == [1, 25150, 29515, 16521, 5849, 29491, 781, 781, 8970, 3236, 17461, 29473, 29508, 1155,
                           781, 3872, 29515, 1032, 29491, 781, 16753, 29515, 5849, 29491, 781, 781, 9247, 4928, 1040,
                           3064, 3525, 1155, 781, 3872, 29515, 1055, 29491, 781, 5560, 29515, 1476, 1837, 2]
    # only "▁no ▁way </s>" are trained: the first answer token is not dropped, the EOS is trained
    assert r.labels == [IGNORE_INDEX] * 40 + [1476, 1837, 2]
    assert r.input_ids.count(1) == 1  # exactly one BOS
    assert r.num_trainable == 3


def test_prompt_is_prefix_of_training_tokens(mistral_tokenizer):
    r, _ = render(_example(), mistral_tokenizer, 512)
    prompt = render_prompt(_example(), mistral_tokenizer)
    assert prompt == r.input_ids[:40]


def test_eos_trained_when_pad_equals_eos(mistral_tokenizer):
    assert mistral_tokenizer.pad_id == mistral_tokenizer.eos_id  # this tokenizer has no pad token
    r, _ = render(_example(), mistral_tokenizer, 512)
    assert r.labels[-1] == mistral_tokenizer.eos_id


def test_overflow_truncate_prompt_left_keeps_response(mistral_tokenizer):
    r, reason = render(_example(), mistral_tokenizer, 10)
    assert reason is None
    assert len(r.input_ids) == 10
    assert r.input_ids[0] == 1 and r.input_ids[-3:] == [1476, 1837, 2]
    assert r.labels == [IGNORE_INDEX] * 7 + [1476, 1837, 2]


def test_overflow_truncate_response(mistral_tokenizer):
    r, reason = render(_example(), mistral_tokenizer, 42, overflow="truncate_response")
    assert reason is None and r.input_ids[-2:] == [1476, 1837] and r.labels[-2:] == [1476, 1837]
    r, reason = render(_example(), mistral_tokenizer, 40, overflow="truncate_response")
    assert r is None and reason == "no_trainable_tokens"  # zero trainable tokens: never written


def test_overflow_drop_and_too_long(mistral_tokenizer):
    assert render(_example(), mistral_tokenizer, 42, overflow="drop") == (None, "too_long")
    # the response alone does not fit: nothing trainable can be kept
    assert render(_example("word " * 20), mistral_tokenizer, 12) == (None, "too_long")


def test_sentencepiece_training_matches_sentencepiece(tmp_path):
    import sentencepiece as spm

    from itune.data.tokenizer import train_sentencepiece

    lines = [f"Input: the cat sat on mat {i}. Output: mat on sat cat the" for i in range(300)]
    lines += ["Khloé went to the café, twice!"] * 3
    d = train_sentencepiece(lines, tmp_path / "tok", vocab_size=300)
    tok = TextTokenizer.load(d)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    for s in ["Output: mat the on", "Khloé went to the café, twice! 123", "zzq ü 你好", "a\nb"]:
        ids, _ = tok.encode_with_offsets(s)
        assert ids == sp.encode(s), s
        assert tok.decode(ids) == s
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
