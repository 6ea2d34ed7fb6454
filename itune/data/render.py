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
"""

from __future__ import annotations

from dataclasses import dataclass

from itune.data.sources import Example
from itune.data.tokenizer import TextTokenizer
from itune.errors import ConfigError

IGNORE_INDEX = -100
TEMPLATES = ("completion",)
OVERFLOW_POLICIES = ("truncate_prompt_left", "truncate_response", "drop")


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


@dataclass
class Rendered:
    """A tokenized example. ``input_ids`` and ``labels`` have the same length (tokens)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def segments(example: Example, template: str = "completion") -> list[Segment]:
    """Splits an example into text segments, each trained or not.

    ``completion``: every non-assistant message verbatim, each assistant message as ``" " + content.strip()``
    (the separating space belongs to the response, see :func:`itune.data.sources.tk_instruct_prompt`).
    """
    if template not in TEMPLATES:
        raise ConfigError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    out = []
    for m in example.messages:
        if m.role == "assistant":
            out.append(Segment(" " + m.content.strip(), True))
        else:
            out.append(Segment(m.content, False))
    return out


def prompt_segments(example: Example, template: str = "completion") -> list[Segment]:
    """The segments before the final assistant response: the generation prompt used by evaluation."""
    segs = segments(example, template)
    while segs and segs[-1].trainable:
        segs.pop()
    return segs


def tokenize_segments(segs: list[Segment], tok: TextTokenizer) -> Rendered:
    """Tokenizes the concatenated segments once and labels tokens by character offsets.

    A token is trainable when its span overlaps a trainable segment. An EOS is appended (and trained) after
    each trainable segment that ends the text or is followed by an untrained one.
    """
    text = "".join(s.text for s in segs)
    ranges = []
    pos = 0
    for s in segs:
        if s.trainable:
            ranges.append((pos, pos + len(s.text)))
        pos += len(s.text)
    ids, offsets = tok.encode_with_offsets(text)
    input_ids: list[int] = []
    labels: list[int] = []
    if tok.bos_id is not None:
        input_ids.append(tok.bos_id)
        labels.append(IGNORE_INDEX)
    r = 0
    for tid, (a, b) in zip(ids, offsets):
        while r < len(ranges) and ranges[r][1] <= a:
            # the trainable range r ended before this token: close it with a trained EOS
            input_ids.append(tok.eos_id)
            labels.append(tok.eos_id)
            r += 1
        trainable = r < len(ranges) and a < ranges[r][1] and b > ranges[r][0]
        input_ids.append(tid)
        labels.append(tid if trainable else IGNORE_INDEX)
    while r < len(ranges):
        input_ids.append(tok.eos_id)
        labels.append(tok.eos_id)
        r += 1
    return Rendered(input_ids, labels)


def render(example: Example, tok: TextTokenizer, seq_len: int, template: str = "completion",
           overflow: str = "truncate_prompt_left") -> tuple[Rendered | None, str | None]:
    """Renders one example to at most ``seq_len`` tokens.

    Overflow policies: ``truncate_prompt_left`` drops prompt tokens right after BOS until it fits (the response is
    kept whole); ``truncate_response`` cuts the end; ``drop`` rejects the example.

    Returns:
        ``(rendered, None)`` or ``(None, reason)`` with reason ``too_long`` or ``no_trainable_tokens``.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"unknown overflow policy {overflow!r}; choose one of {OVERFLOW_POLICIES}")
    r = tokenize_segments(segments(example, template), tok)
    n = len(r.input_ids)
    if n > seq_len:
        if overflow == "drop":
            return None, "too_long"
        if overflow == "truncate_response":
            r = Rendered(r.input_ids[:seq_len], r.labels[:seq_len])
        else:
            head = 1 if tok.bos_id is not None else 0
            first_trained = next((i for i, x in enumerate(r.labels) if x != IGNORE_INDEX), n)
            cut = n - seq_len
            if first_trained - head < cut:
                return None, "too_long"
            r = Rendered(r.input_ids[:head] + r.input_ids[head + cut:], r.labels[:head] + r.labels[head + cut:])
    if r.num_trainable == 0:
        return None, "no_trainable_tokens"
    return r, None


def render_prompt(example: Example, tok: TextTokenizer, template: str = "completion") -> list[int]:
    """Token ids of the generation prompt (BOS + prompt), identical to the training prefix of the example."""
    return tokenize_segments(prompt_segments(example, template), tok).input_ids
