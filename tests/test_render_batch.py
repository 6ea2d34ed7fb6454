"""The batched, bisection-based labelling equals a per-token reference loop on every real example and template."""

from __future__ import annotations

import numpy as np
import pytest

from itune.data.render import (IGNORE_INDEX, Segment, render, render_batch, segments, tokenize_segments,
                               tokenize_segments_batch)
from itune.data.sources import Example, Message, read_source, read_split_file, read_superni_task, superni_task_path
from tests.conftest import SHARED, SUPERNI


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
