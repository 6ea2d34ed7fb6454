"""The batched, bisection-based labelling equals a per-token reference loop on every real example and template."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from itune.data.render import (IGNORE_INDEX, Segment, render, render_batch, segments, tokenize_segments,
                               tokenize_segments_batch)
from itune.data.sources import Example, Message, read_source, read_split_file, read_superni_task, superni_task_path
from itune.data.tokenizer import TextTokenizer, train_sentencepiece
from tests.conftest import MISTRAL, SHARED, SUPERNI


def reference_tokenize(segs: list[Segment], tok) -> tuple[list[int], list[int]]:
    """The plain definition: a token is trained when its character span overlaps a trainable segment; an EOS goes
    before the first token starting at or after the end of a segment that ends with one."""
    text = "".join(s.text for s in segs)
    ranges, eos_at, pos = [], [], 0
    for s in segs:
        end = pos + len(s.text)
        if s.trainable:
            ranges.append((pos, end))
        if s.ends_with_eos:
            eos_at.append((end, s.trainable))
        pos = end
    ids, offsets = tok.encode_with_offsets(text)
    out_ids, out_labels = ([tok.bos_id], [IGNORE_INDEX]) if tok.bos_id is not None else ([], [])
    e = 0
    for tid, (a, b) in zip(ids, offsets):
        while e < len(eos_at) and eos_at[e][0] <= a:
            out_ids.append(tok.eos_id)
            out_labels.append(tok.eos_id if eos_at[e][1] else IGNORE_INDEX)
            e += 1
        trained = any(a < r1 and b > r0 for r0, r1 in ranges)
        out_ids.append(tid)
        out_labels.append(tid if trained else IGNORE_INDEX)
    for _, trained in eos_at[e:]:
        out_ids.append(tok.eos_id)
        out_labels.append(tok.eos_id if trained else IGNORE_INDEX)
    return out_ids, out_labels


def _real_examples():
    out = []
    for name in read_split_file(SUPERNI / "splits" / "train_tasks.txt")[:12]:
        for ex, _, _ in read_superni_task(superni_task_path(SUPERNI / "tasks", name), 2, True, 40):
            if ex is not None:
                out.append((ex, ("completion",)))
    for path, templates in ((SHARED / "data/alpaca_libre/alpaca_libre_tasks_v3.jsonl", ("alpaca", "chat")),
                            (SHARED / "data/fastchat_sharegpt_dummy/dummy_conversation.json", ("chat", "tokenizer"))):
        for i, (ex, err, _) in enumerate(read_source(path)):
            if ex is not None and i < 400:
                out.append((ex, templates))
    return out


def test_batched_labels_equal_the_reference_on_real_data(mistral_tokenizer):
    tok = mistral_tokenizer
    examples = _real_examples()
    checked = 0
    for template in ("completion", "alpaca", "chat", "tokenizer"):
        exs = [ex for ex, ts in examples if template in ts]
        assert len(exs) >= 300, template
        segs = [segments(ex, template, tok) for ex in exs]
        for s, (ids, labels) in zip(segs, tokenize_segments_batch(segs, tok)):
            ref_ids, ref_labels = reference_tokenize(s, tok)
            assert ids.tolist() == ref_ids and labels.tolist() == ref_labels
            checked += 1
    assert checked > 1500


@pytest.mark.parametrize("answer", ["😀 ok", "日本語の文", "a\u0301b", "  spaced  ", "x"])
def test_multibyte_and_whitespace_edges(mistral_tokenizer, answer):
    tok = mistral_tokenizer
    ex = Example("e", [Message("user", "Q: ünïcödé 😀"), Message("assistant", answer)], "t")
    for template in ("completion", "chat", "tokenizer"):
        segs = segments(ex, template, tok)
        assert tokenize_segments(segs, tok).input_ids == reference_tokenize(segs, tok)[0]
        assert tokenize_segments(segs, tok).labels == reference_tokenize(segs, tok)[1]


def test_render_batch_equals_render_and_applies_overflow(mistral_tokenizer):
    tok = mistral_tokenizer
    exs = [Example(f"e{i}", [Message("user", "word " * (5 * i)), Message("assistant", "yes " * i + "no")], "t")
           for i in range(8)]
    for overflow in ("truncate_prompt_left", "truncate_response", "drop"):
        batch = render_batch(exs, tok, 24, "completion", overflow)
        for ex, got in zip(exs, batch):
            r, reason = render(ex, tok, 24, "completion", overflow)
            if r is None:
                assert got == (None, reason, None)
            else:
                assert got[1] is None and got[2] is None and got[0][0].dtype == np.int32
                assert got[0][0].tolist() == r.input_ids and got[0][1].tolist() == r.labels
                assert len(r.input_ids) <= 24
    full = [len(r[0][0]) for r in render_batch(exs, tok, 10_000, "completion", "drop")]
    # BOS + 5i words + the extra space (the prompt ends in one) + i "yes" + "no" + EOS
    assert full == [3] + [4 + 6 * i for i in range(1, 8)]
    reasons = [reason for _, reason, _ in render_batch(exs, tok, 24, "completion", "drop")]
    assert reasons == [None if n <= 24 else "too_long" for n in full] and reasons.count("too_long") == 4


def test_special_token_text_in_records_is_refused(mistral_tokenizer):
    """"<s>", "</s>" or "[INST]" written in a record would become control tokens (a second BOS, a trained EOS
    mid-answer): every template refuses such a record, and a record without them renders normally."""
    tok = mistral_tokenizer
    bad = Example("e", [Message("user", "say <s> and"), Message("assistant", "ok </s> more [INST] x")], "t")
    good = Example("g", [Message("user", "say s and"), Message("assistant", "ok /s more INST x")], "t")
    for template in ("completion", "chat", "alpaca", "tokenizer"):
        (r, reason, err), (r2, reason2, _) = render_batch([bad, good], tok, 256, template)
        assert r is None and reason == "special_token_text" and "'<s>'" in err.detail
        assert reason2 is None and list(r2[0]).count(tok.bos_id) == 1 and list(r2[0]).count(tok.eos_id) == 1


def test_special_token_text_formed_where_messages_meet_is_refused(mistral_tokenizer):
    """The completion template concatenates messages: a system message ending in "<" before a user message starting
    with "/s>" (or an answer ending in "<" before the next user turn) renders "</s>", which would be encoded as a
    second EOS (trained, in the second case). Such a record is refused although no single message holds "</s>";
    the chat template, whose headers separate the messages, renders the same records with exactly one EOS per
    answer."""
    tok = mistral_tokenizer
    system_user = Example("a", [Message("system", "note <"), Message("user", "/s> then"),
                                Message("assistant", "ok")], "t")
    answer_user = Example("b", [Message("user", "q"), Message("assistant", "ends with <"),
                                Message("user", "/s>more"), Message("assistant", "ok")], "t")
    for ex in (system_user, answer_user):
        [(r, reason, err)] = render_batch([ex], tok, 256, "completion")
        assert r is None and reason == "special_token_text"
        assert "'</s>'" in err.detail and "where two messages" in err.detail
        [(r, reason, _)] = render_batch([ex], tok, 256, "chat")
        n_answers = sum(m.role == "assistant" for m in ex.messages)
        assert reason is None and list(r[0]).count(tok.eos_id) == list(r[1]).count(tok.eos_id) == n_answers


# ---------------------------------------------------------------------------------------------------------------
# Offsets computed from ids (TextTokenizer.piece_offsets): the labels of the fast path depend on them
# ---------------------------------------------------------------------------------------------------------------

def _random_strings(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    alphabet = list(" \t\n\r ab1é😀中\u0301\u200b▁<>/s_-.") + ["  ", "\n\n", "ﬁ", "\u00a0"]
    return ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 14))) for _ in range(n)]


def _corpus_texts(tok) -> list[str]:
    """Rendered texts of the real examples in every template, plus their prompts and answers alone."""
    texts = []
    for ex, templates in _real_examples():
        for template in templates:
            texts.append("".join(s.text for s in segments(ex, template, tok)))
        texts += [m.content for m in ex.messages]
    return texts


def _variant(tmp_path, name: str, edit) -> "TextTokenizer":
    """The mistral tokenizer directory with its tokenizer.json edited by ``edit(dict)``."""
    d = tmp_path / name
    shutil.copytree(MISTRAL, d)
    spec = json.loads((d / "tokenizer.json").read_text())
    edit(spec)
    (d / "tokenizer.json").write_text(json.dumps(spec))
    return TextTokenizer.load(d)


def _assert_piece_offsets_exact(tok, texts):
    encs = tok.encode_batch(texts)
    flat = np.asarray([i for e in encs for i in e.ids], dtype=np.int64)
    starts, ends, ok = tok.piece_offsets(flat, [len(e) for e in encs], texts)
    added = set(tok._tok.get_added_tokens_decoder())
    pos = 0
    for text, e, good in zip(texts, encs, ok.tolist()):
        n = len(e)
        assert good == (not added.intersection(e.ids)), text  # only an added token makes ids insufficient
        if good:
            got = list(zip(starts[pos:pos + n].tolist(), ends[pos:pos + n].tolist()))
            assert got == [tuple(o) for o in e.offsets], text
        pos += n
    assert ids_equal(tok, texts)
    # placed one after another (what the batch labelling searches), the offsets never decrease
    lengths = np.asarray([len(t) for t in texts])
    placed = tok.piece_offsets(flat, [len(e) for e in encs], texts, np.cumsum(lengths + 1) - (lengths + 1))
    assert (np.diff(placed[0]) >= 0).all() and (np.diff(placed[1]) >= 0).all()
    return int(ok.sum())


def ids_equal(tok, texts) -> bool:
    flat, counts = tok.encode_batch_flat(texts)
    expected = [e.ids for e in tok.encode_batch(texts)]
    return flat.dtype == np.int32 and counts.tolist() == [len(x) for x in expected] and \
        flat.tolist() == [i for x in expected for i in x]


def test_offsets_from_ids_equal_the_tokenizers_offsets(mistral_tokenizer, tmp_path):
    """Offsets computed from ids alone equal the tokenizer's own offsets on every real text and on random strings
    (multi-byte characters through byte fallback, combining marks, leading spaces, "▁" itself), for the mistral
    tokenizer and for the other SentencePiece-style layouts this path accepts (legacy Prepend + Replace
    normalizer, prepend_scheme always / never)."""
    texts = _corpus_texts(mistral_tokenizer) + _random_strings(20_000) + ["", " ", "▁", " a", "▁a", "😀", " 😀x"]
    # all but the tokenizer template's texts ([INST] ...) and random strings holding "</s>" or "<s>"
    assert _assert_piece_offsets_exact(mistral_tokenizer, texts) >= len(texts) - 500

    def legacy(spec):
        spec["pre_tokenizer"] = None
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}

    def scheme(value):
        return lambda spec: spec["pre_tokenizer"].update(prepend_scheme=value)

    for name, edit in (("legacy", legacy), ("always", scheme("always")), ("never", scheme("never"))):
        tok = _variant(tmp_path, name, edit)
        assert tok.has_piece_offsets, name
        _assert_piece_offsets_exact(tok, texts[-3000:])


def test_tokenizers_whose_offsets_do_not_follow_from_ids_keep_the_offsets_path(mistral_tokenizer, tmp_path):
    """A Unigram tokenizer (itune-data train-tokenizer: consecutive unknown characters share one byte-fallback
    span) and a byte-level BPE are not handled by piece_offsets; their labels come from the tokenizer's offsets
    and equal the reference."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = [m.content for ex, _ in _real_examples()[:300] for m in ex.messages]
    uni = TextTokenizer.load(train_sentencepiece(lines, tmp_path / "uni", vocab_size=400))
    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"]))
    (tmp_path / "bl").mkdir()
    bl.save(str(tmp_path / "bl" / "tokenizer.json"))
    (tmp_path / "bl" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    for tok in (uni, TextTokenizer.load(tmp_path / "bl")):
        assert not tok.has_piece_offsets
        exs = [Example("e", [Message("user", "Q: ünï <|x|> 😀 " + t[:40]), Message("assistant", t[-30:] or "x")], "t")
               for t in lines[:50]]
        segs = [segments(ex, "completion", tok) for ex in exs]
        for s, (ids, labels) in zip(segs, tokenize_segments_batch(segs, tok)):
            assert (ids.tolist(), labels.tolist()) == reference_tokenize(s, tok)


def test_an_added_token_in_the_text_falls_back_to_offsets_for_that_example(mistral_tokenizer, tmp_path, monkeypatch):
    """A non-special added token (here "<|x|>") is not refused as special text, and its id alone cannot be placed
    in the text: that example is encoded again with offsets, the others keep the fast path, and every label equals
    the reference."""
    def add(spec):
        spec["added_tokens"].append({"id": len(spec["model"]["vocab"]), "content": "<|x|>", "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False, "special": False})
    tok = _variant(tmp_path, "added", add)
    assert tok.has_piece_offsets and tok._tok.token_to_id("<|x|>") == 32768
    calls = []
    encode_batch = type(tok).encode_batch
    monkeypatch.setattr(type(tok), "encode_batch", lambda self, texts, *a: calls.append(len(texts)) or
                        encode_batch(self, texts, *a))
    exs = [Example(f"e{i}", [Message("user", f"q {i}" + (" <|x|> y" if i % 3 == 0 else "")),
                             Message("assistant", f"a <|x|> {i}" if i == 4 else f"a {i}")], "t") for i in range(9)]
    segs = [segments(ex, "completion", tok) for ex in exs]
    out = tokenize_segments_batch(segs, tok)
    assert calls == [4]  # examples 0, 3, 6 (prompt) and 4 (answer)
    for s, (ids, labels) in zip(segs, out):
        assert (ids.tolist(), labels.tolist()) == reference_tokenize(s, tok)
    assert 32768 in out[4][1].tolist() and 32768 not in out[3][1].tolist()  # trained only inside the answer


def test_special_text_regex_finds_what_a_longest_first_alternation_finds(mistral_tokenizer):
    """The trie-shaped regex of the special texts gives the same matches as the plain alternation (longest text
    first), on texts made of the special texts' own characters, the texts themselves, and their prefixes."""
    import re

    from itune.data.tokenizer import literal_union_regex

    specials = list(mistral_tokenizer.special_texts) + ["ab", "abc", "abcd", "b"]
    plain = re.compile("|".join(map(re.escape, sorted(specials, key=lambda x: (-len(x), x)))))
    trie = literal_union_regex(specials)
    rnd = random.Random(1)
    chars = sorted(set("".join(specials))) + [" ", "x"]
    texts = ["".join(rnd.choice(chars) for _ in range(rnd.randint(1, 40))) for _ in range(20_000)]
    texts += specials + [s[:-1] for s in specials] + ["z" + s + s[:-1] + s for s in specials]
    assert sum(bool(plain.findall(t)) for t in texts) > 2000
    for t in texts:
        assert trie.findall(t) == plain.findall(t), t


def _hole(spec):  # a byte piece removed: ids no longer contiguous, the highest id equals the vocabulary size
    vocab = spec["model"]["vocab"]
    del vocab[next(k for k, i in vocab.items() if i == 800)]


def _no_fallback(spec):  # unknown characters are dropped without a trace (no byte fallback, no <unk>)
    spec["model"].update(byte_fallback=False, unk_token=None)
    spec["model"]["vocab"].update({"\t": 40000, "\n": 40001})


_TOKENIZER_EDITS = {
    "ids_not_contiguous": _hole,
    "unknown_characters_dropped": _no_fallback,
    "truncation_configured": lambda spec: spec.update(truncation={"direction": "Right", "max_length": 12,
                                                                  "strategy": "LongestFirst", "stride": 0}),
    "padding_configured": lambda spec: spec.update(padding={"strategy": {"Fixed": 40}, "direction": "Right",
                                                            "pad_to_multiple_of": None, "pad_id": 11,
                                                            "pad_type_id": 0, "pad_token": "[control_9]"}),
}


@pytest.mark.parametrize("edit", sorted(_TOKENIZER_EDITS))
def test_unusual_tokenizer_files_label_like_the_reference(tmp_path, edit):
    """Tokenizer files that differ from the usual layout: ids with a hole, characters dropped silently, a
    truncation or padding setting (ignored: itune cuts and pads rows itself). Every label equals the
    reference; a text whose pieces do not spell it exactly is labelled from the tokenizer's offsets."""
    tok = _variant(tmp_path, edit, _TOKENIZER_EDITS[edit])
    answers = ["say梦", "🦜yes", "yes 🦜 no", "x.", "tab\there", "▁lead", " space first"]
    users = ["Q", "Q ok", "one two three four five six seven eight nine ten eleven", "\tindent"]
    exs = [Example(f"e{i}", [Message("user", u), Message("assistant", a)], "t")
           for i, (u, a) in enumerate((u, a) for u in users for a in answers)]
    for template in ("completion", "chat", "alpaca"):
        segs = [segments(ex, template, tok) for ex in exs]
        for ex, s, (ids, labels) in zip(exs, segs, tokenize_segments_batch(segs, tok)):
            assert (ids.tolist(), labels.tolist()) == reference_tokenize(s, tok), (edit, template, ex.messages)
    assert tok._tok.truncation is None and tok._tok.padding is None
