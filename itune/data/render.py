"""Rendering: example -> token ids + labels, with trainable spans taken from the rendering's character offsets.

Label convention (the one place it is stated): ``labels`` are **not shifted**. ``labels[i]`` is the target for
position ``i`` (``input_ids[i]`` when trained, -100 when not), as in Hugging Face causal LM heads; the loss shifts
by one (logits at ``i`` predict ``labels[i + 1]``).

Worked example (completion template, BOS=1, EOS=2)::

    prompt "Input: a\\nOutput:"  response " b"
    tokens   <s>  Input  :  ▁a  <0x0A>  Output  :   ▁b   </s>
    labels  -100  -100 -100 -100 -100   -100  -100  ▁b   </s>

Trainable tokens are those whose character span overlaps a trainable segment (the response); no token patterns
are searched for. Exactly one BOS is prepended; the EOS that ends a response is always trained.

Templates (:data:`TEMPLATES`):

- ``completion``: messages concatenated; each assistant message as ``" " + content.strip()`` + EOS (SuperNI).
- ``alpaca``: the Stanford Alpaca ``PROMPT_DICT`` prompt (with or without input) and a newline, then the trained
  ``output`` + EOS.
- ``chat``: plain-text role headers, as in open-instruct (Tulu)::

      <|system|>
      You are terse.
      <|user|>
      Hi
      <|assistant|>
      Hello!</s>
      <|user|>
      ...

  Headers are ordinary text (no added tokens); ``</s>`` is the EOS id, appended after each assistant turn.
- ``tokenizer``: the tokenizer's own Jinja chat template (``tokenizer_config.json`` ``chat_template``), rendered
  once per example; assistant spans are found from marker characters placed around each assistant message, so
  the cost is linear in the number of turns. The end-of-turn special token the template writes right after an
  assistant message (``</s>``, ``<|im_end|>``, ...) is trained; when it writes none, a trained EOS id is added.

In every template all assistant turns are trained (``train_on="last"``: only the last one) together with their
EOS / end-of-turn token; system and user turns and role headers never are.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from itune.data.sources import Example, RecordError
from itune.data.tokenizer import TextTokenizer
from itune.errors import ConfigError

IGNORE_INDEX = -100
TEMPLATES = ("completion", "alpaca", "chat", "tokenizer")
TRAIN_ON = ("all", "last")
OVERFLOW_POLICIES = ("truncate_prompt_left", "truncate_response", "drop")

#: Stanford Alpaca prompts (tatsu-lab/stanford_alpaca ``train.py`` ``PROMPT_DICT``), verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

#: Role headers of the ``chat`` template.
CHAT_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}

# marker characters (Unicode private use) placed around assistant messages to find them in a rendered template
_MARK_START, _MARK_END = "\ue000", "\ue001"


class Segment(NamedTuple):
    """A piece of the rendered text (an immutable tuple: many are made per example).

    Attributes:
        text: the characters.
        trainable: its tokens are trained.
        eos: an EOS id follows this segment (trained when the segment is); ``None`` means "when trainable".
    """

    text: str
    trainable: bool
    eos: bool | None = None

    @property
    def ends_with_eos(self) -> bool:
        return self.trainable if self.eos is None else self.eos


@dataclass
class Rendered:
    """A tokenized example. ``input_ids`` and ``labels`` have the same length (tokens)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _check(template: str, train_on: str) -> None:
    if template not in TEMPLATES:
        raise ConfigError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    if train_on not in TRAIN_ON:
        raise ConfigError(f"unknown train_on {train_on!r}; choose one of {TRAIN_ON}")


def segments(example: Example, template: str = "completion", tok: TextTokenizer | None = None,
             train_on: str = "all") -> list[Segment]:
    """Splits an example into text segments, each trained or not (see the module docstring for the templates).

    ``completion``: every non-assistant message verbatim, each assistant message as ``" " + content.strip()``
    (the separating space belongs to the response, see :func:`itune.data.sources.tk_instruct_prompt`).

    Args:
        template: one of :data:`TEMPLATES`; ``tokenizer`` needs ``tok`` (its chat template).
        train_on: ``all`` assistant turns or only the ``last`` one.

    Raises:
        RecordError: the example does not fit the template (``alpaca``: more than one turn; ``tokenizer``: the
            template raised, or a message holds a reserved marker character).
    """
    _check(template, train_on)
    messages = example.messages
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1) if train_on == "last" else -1
    trained = [m.role == "assistant" for m in messages]
    if train_on == "last":
        trained = [t and i == last for i, t in enumerate(trained)]
    if template == "tokenizer":
        if tok is None:
            raise ConfigError("template 'tokenizer' needs the tokenizer (its chat template)")
        return _template_segments(example, tok, trained)
    if template == "alpaca":
        return _alpaca_segments(example)
    out = []
    if template == "chat":
        for i, m in enumerate(messages):
            sep = "\n" if i else ""  # newline between turns (after the previous turn's EOS)
            if m.role == "assistant":
                out.append(Segment(sep + CHAT_HEADERS["assistant"], False))
                out.append(Segment(m.content.strip(), trained[i], True))
            else:
                out.append(Segment(sep + CHAT_HEADERS[m.role] + m.content.strip(), False))
        return out
    for m, t in zip(messages, trained):
        out.append(Segment(" " + m.content.strip(), t, True) if m.role == "assistant" else Segment(m.content, False))
    return out


def _alpaca_segments(example: Example) -> list[Segment]:
    roles = [m.role for m in example.messages]
    if roles != ["user", "assistant"]:
        raise RecordError("template_mismatch", example.id,
                          f"the alpaca template renders one user + one assistant message, found roles {roles}; "
                          "use --template chat or tokenizer for conversations")
    user, answer = example.messages
    instruction = example.extra.get("instruction", user.content.strip())
    inp = example.extra.get("input", "")
    prompt = (ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=inp)
    # the newline after "### Response:" belongs to the prompt: only the output and its EOS are trained, as in
    # Stanford Alpaca's train.py (labels -100 over the whole source)
    return [Segment(prompt + "\n", False), Segment(answer.content.strip(), True)]


def _jinja_template(source: str):
    """Compiles a chat template the way ``transformers`` does (sandboxed, trim_blocks, lstrip_blocks)."""
    cached = _TEMPLATE_CACHE.get(source)
    if cached is not None:
        return cached
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency of the environment
        raise ConfigError("template 'tokenizer' needs the jinja2 package (pip install jinja2)") from e
    from jinja2.exceptions import TemplateError

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        t = env.from_string(source)
    except TemplateError as e:
        raise ConfigError(f"the tokenizer's chat template does not compile: {e}") from e
    _TEMPLATE_CACHE[source] = t
    return t


_TEMPLATE_CACHE: dict = {}


def apply_chat_template(messages: list[dict], tok: TextTokenizer, add_generation_prompt: bool = False,
                        location: str = "") -> str:
    """Renders ``messages`` (``[{"role", "content"}]``) with the tokenizer's chat template, as text.

    Raises:
        ConfigError: the tokenizer has no chat template.
        RecordError: the template raised for these messages (reason ``template_error``).
    """
    if not tok.chat_template:
        raise ConfigError(f"{tok.path}: the tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                          "or chat_template.jinja); use --template chat")
    from jinja2.exceptions import TemplateError

    try:
        return _jinja_template(tok.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                         **(tok.special_tokens or {}))
    except TemplateError as e:
        raise RecordError("template_error", location, f"the tokenizer's chat template refused this example: {e}")


def _strip_bos_text(text: str, tok: TextTokenizer) -> str:
    bos = (tok.special_tokens or {}).get("bos_token")
    if tok.bos_id is not None and bos and text.startswith(bos):
        return text[len(bos):]  # the BOS id is added once by tokenize_segments
    return text


def _template_segments(example: Example, tok: TextTokenizer, trained: list[bool]) -> list[Segment]:
    msgs = []
    for m in example.messages:
        if _MARK_START in m.content or _MARK_END in m.content:
            raise RecordError("reserved_character", example.id, "a message holds U+E000 or U+E001, reserved by the "
                                                                "tokenizer template renderer")
        msgs.append({"role": m.role, "content": m.content.strip() if m.role == "assistant" else m.content})
    marked = [dict(d, content=_MARK_START + d["content"] + _MARK_END) if d["role"] == "assistant" else d
              for d in msgs]
    plain = apply_chat_template(msgs, tok, location=example.id)
    text_marked = apply_chat_template(marked, tok, location=example.id)
    # split at the markers: even pieces are template text, odd pieces assistant contents
    pieces = re.split(f"[{_MARK_START}{_MARK_END}]", text_marked)
    n_assistant = sum(1 for d in msgs if d["role"] == "assistant")
    if "".join(pieces) != plain or len(pieces) != 2 * n_assistant + 1:
        raise RecordError("template_error", example.id,
                          "the chat template changes or drops assistant messages, so their spans cannot be located "
                          "in its output; use --template chat")
    specials = tok.special_texts
    assistant_trained = [t for m, t in zip(example.messages, trained) if m.role == "assistant"]
    out = []
    pieces[0] = _strip_bos_text(pieces[0], tok)
    for k in range(n_assistant):
        before, content, after = pieces[2 * k], pieces[2 * k + 1], pieces[2 * k + 2]
        out.append(Segment(before, False))
        eot = next((s for s in specials if after.startswith(s)), "")
        out.append(Segment(content + eot, assistant_trained[k], eos=not eot))
        pieces[2 * k + 2] = after[len(eot):]
    out.append(Segment(pieces[-1], False))
    return [s for s in out if s.text or s.ends_with_eos]


def prompt_segments(example: Example, template: str = "completion", tok: TextTokenizer | None = None) -> list[Segment]:
    """The segments before the final assistant response: the generation prompt used by evaluation.

    For the ``tokenizer`` template this is the template's own generation prompt (``add_generation_prompt``) for
    the messages before the last assistant message.
    """
    if template == "tokenizer":
        last = max(i for i, m in enumerate(example.messages) if m.role == "assistant")
        msgs = [{"role": m.role, "content": m.content.strip() if m.role == "assistant" else m.content}
                for m in example.messages[:last]]
        text = apply_chat_template(msgs, tok, add_generation_prompt=True, location=example.id)
        return [Segment(_strip_bos_text(text, tok), False)]
    segs = segments(example, template, tok)
    last = max((i for i, s in enumerate(segs) if s.trainable), default=len(segs))
    return segs[:last]


def _layout(segs: list[Segment]) -> tuple[str, list[tuple[int, int]], list[tuple[int, bool]]]:
    """Concatenated text, trainable character ranges ``[start, end)`` and EOS points ``(char position, trained)``."""
    ranges: list[tuple[int, int]] = []
    eos_at: list[tuple[int, bool]] = []
    pos = 0
    for text, trainable, eos in segs:
        end = pos + len(text)
        if trainable:
            ranges.append((pos, end))
        if trainable if eos is None else eos:  # Segment.ends_with_eos
            eos_at.append((end, trainable))
        pos = end
    return "".join([s[0] for s in segs]), ranges, eos_at


class _EncodingSpans:
    """``starts``/``ends`` views of a tokenizers ``Encoding`` read one token at a time (``token_to_chars``), so
    bisection needs O(log tokens) lookups and the offsets list is never built."""

    def __init__(self, enc, part: int):
        self.enc, self.part, self.n = enc, part, len(enc)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return self.enc.token_to_chars(i)[self.part]

    def first_ending_after(self, s: int) -> int:
        """First index i with ``ends[i] > s`` (``self`` being the ``ends`` view), i.e. ``bisect_right(ends, s)``.
        The token holding character ``s`` (``char_to_token``) is tried first and kept only when it satisfies the
        definition (``ends[i] > s`` and ``ends[i-1] <= s``); otherwise bisection decides."""
        i = self.enc.char_to_token(s)
        if i is not None:
            c = self.enc.token_to_chars(i)
            if c[1] > s and (i == 0 or self.enc.token_to_chars(i - 1)[1] <= s):
                return i
        return bisect.bisect_right(self, s)


def _first_at_or_after(starts, p: int, n: int) -> int:
    """First index i with ``starts[i] >= p`` (``n`` if none); one lookup when ``p`` is past the last token's start
    (a segment that ends the text, the common case)."""
    if n == 0 or starts[n - 1] < p:
        return n
    return bisect.bisect_left(starts, p)


def _label_tokens(ids: list[int], starts, ends, ranges, eos_at, tok: TextTokenizer):
    """BOS + ids with EOS ids inserted, and their labels, as int32 arrays ``[tokens]``.

    Token ``i`` (character span ``[starts[i], ends[i])``) is trainable when it overlaps a trainable range
    ``[s, e)``: ``ends[i] > s and starts[i] < e``. Offsets of a tokenizer's encoding are non-decreasing, so those
    tokens are the index interval ``[first i with ends[i] > s, first i with starts[i] >= e)``, found by bisection:
    the cost is O(tokens) array work plus O(segments x log tokens) offset lookups. An EOS closing a segment that ends
    at character ``p`` goes before the first token with ``starts[i] >= p``.
    """
    n = len(ids)
    first_ending_after = getattr(ends, "first_ending_after", None)
    spans = []  # trainable token index intervals [lo, hi)
    for s, e in ranges:
        lo = first_ending_after(s) if first_ending_after is not None else bisect.bisect_right(ends, s)
        hi = _first_at_or_after(starts, e, n)
        if hi > lo:
            spans.append((lo, hi))
    head = 0 if tok.bos_id is None else 1
    where = [_first_at_or_after(starts, p, n) for p, _ in eos_at]  # EOS insertion points, non-decreasing
    ids = np.asarray(ids, dtype=np.int32)
    out = np.empty(head + n + len(where), dtype=np.int32)
    labels = np.full(len(out), IGNORE_INDEX, dtype=np.int32)
    if head:
        out[0] = tok.bos_id
    prev, at = 0, head  # ids[prev:] goes to out[at:]
    for k in range(len(where) + 1):
        w = where[k] if k < len(where) else n
        out[at:at + w - prev] = ids[prev:w]
        for lo, hi in spans:  # the trainable ids of this piece
            a, b = max(lo, prev), min(hi, w)
            if b > a:
                labels[at + a - prev:at + b - prev] = ids[a:b]
        at += w - prev
        if k < len(where):
            out[at] = tok.eos_id
            if eos_at[k][1]:
                labels[at] = tok.eos_id
            at += 1
        prev = w
    return out, labels


def tokenize_segments(segs: list[Segment], tok: TextTokenizer) -> Rendered:
    """Tokenizes the concatenated segments once and labels tokens by character offsets.

    A token is trainable when its span overlaps a trainable segment. An EOS id is inserted after each segment
    with ``ends_with_eos`` (before the first token that starts at or after the segment's end), trained when the
    segment is. The cost is one tokenizer call and one pass over the tokens: linear in the number of turns.
    """
    text, ranges, eos_at = _layout(segs)
    ids, offsets = tok.encode_with_offsets(text)
    arr, labels = _label_tokens(ids, [a for a, _ in offsets], [b for _, b in offsets], ranges, eos_at, tok)
    return Rendered(arr.tolist(), labels.tolist())


def tokenize_segments_batch(segs_list: list[list[Segment]], tok: TextTokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`tokenize_segments` for many examples with one batched tokenizer call; returns int32 arrays
    ``(input_ids [tokens], labels [tokens])`` per example (equal to :func:`tokenize_segments`'s lists)."""
    ids, labels, lengths = tokenize_segments_flat(segs_list, tok)
    cuts = np.cumsum(lengths)[:-1]
    return list(zip(np.split(ids, cuts), np.split(labels, cuts))) if len(segs_list) else []


def _layouts_with_offsets(layouts: list, tok: TextTokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layout, BOS + ids with EOS inserted and labels (:func:`_label_tokens`), from ``Encoding`` offsets."""
    encs = tok.encode_batch([t for t, _, _ in layouts])
    return [_label_tokens(enc.ids, _EncodingSpans(enc, 0), _EncodingSpans(enc, 1), ranges, eos_at, tok)
            for enc, (_, ranges, eos_at) in zip(encs, layouts)]


def tokenize_segments_flat(segs_list: list[list[Segment]], tok: TextTokenizer, from_ids: bool = True
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`tokenize_segments` for many examples, concatenated.

    With ``from_ids`` and a tokenizer whose offsets follow from its ids (:meth:`TextTokenizer.piece_offsets`), the
    texts are encoded without offsets and labelled for the whole batch at once by :func:`_label_flat`; an example
    the ids cannot place (an added token in its text) is encoded again with offsets. Otherwise every example is
    labelled from its ``Encoding`` offsets (:func:`_label_tokens`). Both give the same ids and labels.

    Returns:
        ``(input_ids int32 [tokens], labels int32 [tokens], lengths int64 [examples])``: the examples' arrays
        concatenated, and each one's length.
    """
    return _tokenize_layouts([_layout(segs) for segs in segs_list], tok, from_ids)


def _tokenize_layouts(layouts: list, tok: TextTokenizer, from_ids: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`tokenize_segments_flat` from the examples' :func:`_layout`."""
    if not layouts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
    if not (from_ids and tok.has_piece_offsets):
        parts = _layouts_with_offsets(layouts, tok)
        return (np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]),
                np.fromiter((len(a) for a, _ in parts), dtype=np.int64, count=len(parts)))
    texts = [t for t, _, _ in layouts]
    flat, counts = tok.encode_batch_flat(texts)
    text_lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    base = np.cumsum(text_lengths + 1) - (text_lengths + 1)  # each text's place in their concatenation
    starts, ends, ok = tok.piece_offsets(flat, counts, texts, base)
    ids, labels, lengths = _label_flat(flat, counts, starts, ends, base, layouts, tok)
    if ok.all():
        return ids, labels, lengths
    # examples with an added token: labelled again from their Encoding offsets, then put back in order
    redo = np.flatnonzero(~ok)
    cuts = np.cumsum(lengths)[:-1]
    out_ids, out_labels = np.split(ids, cuts), np.split(labels, cuts)
    for i, (a, b) in zip(redo.tolist(), _layouts_with_offsets([layouts[i] for i in redo], tok)):
        out_ids[i], out_labels[i], lengths[i] = a, b, len(a)
    return np.concatenate(out_ids), np.concatenate(out_labels), lengths


def _label_flat(ids: np.ndarray, counts: np.ndarray, starts: np.ndarray, ends: np.ndarray, base: np.ndarray,
                layouts: list, tok: TextTokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_label_tokens` for K encodings at once, with array operations over all their tokens.

    Args:
        ids: int64 ``[tokens]``, the encodings' ids concatenated. counts: int64 ``[K]``, tokens per encoding.
        starts, ends: int64 ``[tokens]``, character offsets plus ``base`` of their encoding, where ``base[k]`` is
            the position of text k in the concatenation of all texts each followed by one separator character (so
            the offsets of all encodings are non-decreasing together, and those of different encodings never meet).
        layouts: per encoding ``(text, ranges, eos_at)`` (:func:`_layout`).

    Same rule as :func:`_label_tokens`: token i is trained when ``ends[i] > s and starts[i] < e`` for a trainable
    range ``[s, e)`` of its encoding, i.e. the index interval [first i with ``ends[i] > s``, first i with
    ``starts[i] >= e``); an EOS closing a segment that ends at character ``p`` goes before the first token with
    ``starts[i] >= p``. With every position shifted by its text's ``base``, one ``searchsorted`` over all tokens
    places every range and EOS of every encoding.

    Returns:
        ``(input_ids int32 [out tokens], labels int32 [out tokens], lengths int64 [K])``: per encoding BOS + ids
        with EOS ids inserted, concatenated.
    """
    k = len(counts)
    n = len(ids)
    head = 0 if tok.bos_id is None else 1
    r_enc = np.fromiter((i for i, (_, rg, _) in enumerate(layouts) for _ in rg), dtype=np.int64)
    r_s = np.fromiter((a for _, rg, _ in layouts for a, _ in rg), dtype=np.int64, count=len(r_enc))
    r_e = np.fromiter((b for _, rg, _ in layouts for _, b in rg), dtype=np.int64, count=len(r_enc))
    lo = np.searchsorted(ends, base[r_enc] + r_s, side="right")
    hi = np.searchsorted(starts, base[r_enc] + r_e, side="left")
    keep = hi > lo
    trained = np.cumsum(np.bincount(lo[keep], minlength=n + 1) - np.bincount(hi[keep], minlength=n + 1))[:n] > 0
    e_enc = np.fromiter((i for i, (_, _, ea) in enumerate(layouts) for _ in ea), dtype=np.int64)
    e_p = np.fromiter((p for _, _, ea in layouts for p, _ in ea), dtype=np.int64, count=len(e_enc))
    e_tr = np.fromiter((t for _, _, ea in layouts for _, t in ea), dtype=bool, count=len(e_enc))
    where = np.searchsorted(starts, base[e_enc] + e_p, side="left")  # non-decreasing over the batch
    n_eos = np.bincount(e_enc, minlength=k)
    first = np.cumsum(counts) - counts
    # output position of token i: i + the BOS and EOS ids inserted at or before it
    inserted = np.bincount(where, minlength=n + 1)[:n]
    if head:
        inserted += np.bincount(first, minlength=n + 1)[:n]
    pos_tok = np.arange(n, dtype=np.int64) + np.cumsum(inserted)
    pos_eos = where + head * (e_enc + 1) + np.arange(len(where), dtype=np.int64)
    lengths = counts + head + n_eos
    out = np.empty(int(lengths.sum()), dtype=np.int32)
    labels = np.full(len(out), IGNORE_INDEX, dtype=np.int32)
    out[pos_tok] = ids
    labels[pos_tok[trained]] = ids[trained]
    out[pos_eos] = tok.eos_id
    labels[pos_eos[e_tr]] = tok.eos_id
    if head:
        out[first + np.arange(k) + np.cumsum(n_eos) - n_eos] = tok.bos_id
    return out, labels, lengths


def fit_to_length(input_ids: np.ndarray, labels: np.ndarray, seq_len: int, overflow: str, head: int):
    """Applies the over-long policy to one tokenized example (int32 arrays ``[tokens]``).

    Args:
        head: leading tokens never cut (1 when the tokenizer adds a BOS, else 0).

    Returns:
        ``(input_ids, labels, None)``, or ``(None, None, reason)`` with reason ``too_long`` or
        ``no_trainable_tokens``.
    """
    n = len(input_ids)
    if n > seq_len:
        if overflow == "drop":
            return None, None, "too_long"
        if overflow == "truncate_response":
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
        else:
            trained = np.flatnonzero(labels != IGNORE_INDEX)
            first_trained = int(trained[0]) if len(trained) else n
            cut = n - seq_len
            if first_trained - head < cut:
                return None, None, "too_long"
            input_ids = np.concatenate([input_ids[:head], input_ids[head + cut:]])
            labels = np.concatenate([labels[:head], labels[head + cut:]])
    if (len(labels) == 0 or labels[-1] == IGNORE_INDEX) and not np.any(labels != IGNORE_INDEX):  # usual: EOS trained
        return None, None, "no_trainable_tokens"
    return input_ids, labels, None


def render(example: Example, tok: TextTokenizer, seq_len: int, template: str = "completion",
           overflow: str = "truncate_prompt_left", train_on: str = "all") -> tuple[Rendered | None, str | None]:
    """Renders one example to at most ``seq_len`` tokens.

    Overflow policies: ``truncate_prompt_left`` drops prompt tokens right after BOS until it fits (the trained
    tokens are kept whole: nothing after the first trained token is cut); ``truncate_response`` cuts the end;
    ``drop`` rejects the example.

    Returns:
        ``(rendered, None)`` or ``(None, reason)`` with reason ``too_long``, ``no_trainable_tokens``, or the
        :class:`~itune.data.sources.RecordError` reason of an example the template cannot render
        (``template_mismatch``, ``template_error``, ``reserved_character``).
    """
    [(r, reason, _)] = render_batch([example], tok, seq_len, template, overflow, train_on)
    if r is None:
        return None, reason
    return Rendered(r[0].tolist(), r[1].tolist()), None


def check_no_special_text(example: Example, tok: TextTokenizer) -> None:
    """Refuses an example whose messages contain a special token's text (``<s>``, ``</s>``, ``[INST]``, an added
    ``<|user|>``...). Rendered text is encoded with special tokens parsed, so that template headers can be added
    tokens; such a string in a record would become a control token (a second BOS, a trained EOS mid-answer).

    Raises:
        RecordError: reason ``special_token_text``, naming the role and the text.
    """
    for m in example.messages:
        hit = tok.find_special_text(m.content)
        if hit is not None:
            raise RecordError("special_token_text", example.id,
                              f"a {m.role} message contains {hit!r}, the text of a special token of the tokenizer, "
                              "which would be encoded as that control token; remove or escape it")


def check_rendered_special_text(example: Example, segs: list[Segment], template: str, tok: TextTokenizer,
                                text: str | None = None) -> None:
    """Refuses an example whose rendered text (``completion``, ``alpaca`` or ``chat`` template) holds a special
    token's text that the template did not write: one inside a message (:func:`check_no_special_text`), or one
    formed where two pieces of text meet (a system message ending in ``"<"`` before a user message starting with
    ``"/s>"`` renders ``"</s>"`` in the ``completion`` template, which concatenates messages). These templates write
    special-token text only in ``chat`` role headers (when the tokenizer has them as added tokens), so the
    rendered text must hold exactly the headers' matches. One regular-expression scan of the rendered text.

    ``text``: the segments' text joined, when the caller has it.

    Raises:
        RecordError: reason ``special_token_text``.
    """
    if text is None:
        text = "".join(s.text for s in segs)
    found = tok.special_text_matches(text) if template == "chat" else \
        ([] if (hit := tok.find_special_text(text)) is None else [hit])
    expected = [] if template != "chat" else \
        [x for m in example.messages for x in tok.special_text_matches(CHAT_HEADERS[m.role])]
    if found != expected:
        check_no_special_text(example, tok)  # names the message when the text lies within one
        extra = next(iter((Counter(found) - Counter(expected)).elements()), found[0] if found else "")
        raise RecordError("special_token_text", example.id,
                          f"the rendered text contains {extra!r}, the text of a special token of the tokenizer, "
                          "formed where two messages (or a message and the template's text) meet; it would be "
                          "encoded as that control token; change the text at that boundary")


def render_batch(examples: list[Example], tok: TextTokenizer, seq_len: int, template: str = "completion",
                 overflow: str = "truncate_prompt_left", train_on: str = "all"):
    """:func:`render` for many examples with one batched tokenizer call.

    Returns:
        Per example ``((input_ids, labels), None, None)`` with int32 arrays ``[tokens]`` (tokens <= ``seq_len``),
        ``(None, reason, None)`` for ``too_long`` / ``no_trainable_tokens``, or ``(None, reason, error)`` with the
        :class:`~itune.data.sources.RecordError` of an example the template cannot render (a bad record).
    """
    ids, labels, lengths, status = render_flat(examples, tok, seq_len, template, overflow, train_on)
    cuts = np.cumsum(lengths)[:-1]
    kept = iter(zip(np.split(ids, cuts), np.split(labels, cuts)) if len(lengths) else ())
    return [(next(kept), None, None) if st is None else (None, st[0], st[1]) for st in status]


def render_flat(examples: list[Example], tok: TextTokenizer, seq_len: int, template: str = "completion",
                overflow: str = "truncate_prompt_left", train_on: str = "all"):
    """:func:`render_batch` with the written examples' arrays concatenated (what data preparation stores).

    Returns:
        ``(input_ids int32 [tokens], labels int32 [tokens], lengths int64 [written examples], status)``; ``status``
        has one entry per example: None when written (in order: the k-th None is ``lengths[k]``), else
        ``(reason, error)`` as in :func:`render_batch`.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"unknown overflow policy {overflow!r}; choose one of {OVERFLOW_POLICIES}")
    _check(template, train_on)
    status: list = [None] * len(examples)
    todo, layouts = [], []
    for i, ex in enumerate(examples):
        try:
            if template == "tokenizer":  # the chat template writes its own text between messages
                check_no_special_text(ex, tok)
            segs = segments(ex, template, tok, train_on)
            lay = _layout(segs)
            if template != "tokenizer":
                check_rendered_special_text(ex, segs, template, tok, lay[0])
            layouts.append(lay)
            todo.append(i)
        except RecordError as e:
            status[i] = (e.reason, e)
    # the tokenizer template's text holds its control tokens, which ids alone cannot place (offsets needed)
    from_ids = template != "tokenizer" and not (template == "chat" and any(
        tok.find_special_text(h) for h in CHAT_HEADERS.values()))
    ids, labels, lengths = _tokenize_layouts(layouts, tok, from_ids)
    head = 1 if tok.bos_id is not None else 0
    ends = np.cumsum(lengths)
    seen = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
    trainable = seen[ends] - seen[ends - lengths]  # trained tokens per example
    over = lengths > seq_len
    keep = (trainable > 0) & ~over
    for j in np.flatnonzero(~keep).tolist():
        status[todo[j]] = ("no_trainable_tokens", None)
    if over.any():  # the over-long policy, one example at a time (rare)
        parts_ids, parts_labels, new_lengths = [], [], []
        for j, i in enumerate(todo):
            a, b = ids[ends[j] - lengths[j]:ends[j]], labels[ends[j] - lengths[j]:ends[j]]
            if over[j]:
                a, b, reason = fit_to_length(a, b, seq_len, overflow, head)
                status[i] = None if reason is None else (reason, None)
            elif not keep[j]:
                continue
            if a is not None:
                parts_ids.append(a)
                parts_labels.append(b)
                new_lengths.append(len(a))
        if not parts_ids:
            return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64), status
        return (np.concatenate(parts_ids), np.concatenate(parts_labels), np.asarray(new_lengths, np.int64),
                status)
    if not keep.all():
        enc = np.repeat(np.arange(len(lengths)), lengths)
        ids, labels = ids[keep[enc]], labels[keep[enc]]
        lengths = lengths[keep]
    return ids, labels, lengths, status


def render_prompt(example: Example, tok: TextTokenizer, template: str = "completion") -> list[int]:
    """Token ids of the generation prompt (BOS + prompt).

    For the ``completion``, ``alpaca`` and ``chat`` templates they are the training prefix of the example. For
    ``tokenizer`` they are the template's generation prompt, which is the training prefix when the template
    renders earlier turns the same way in both cases (mistral v0.3 does not: it moves the system message into the
    last user turn).
    """
    return tokenize_segments(prompt_segments(example, template, tok), tok).input_ids
