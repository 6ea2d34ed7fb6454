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
- ``alpaca``: the Stanford Alpaca ``PROMPT_DICT`` prompt (with or without input), then ``"\n" + output`` + EOS.
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

import json
import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered text.

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
    last = max((i for i, m in enumerate(example.messages) if m.role == "assistant"), default=-1)
    trained = [m.role == "assistant" and (train_on == "all" or i == last) for i, m in enumerate(example.messages)]
    if template == "tokenizer":
        if tok is None:
            raise ConfigError("template 'tokenizer' needs the tokenizer (its chat template)")
        return _template_segments(example, tok, trained)
    if template == "alpaca":
        return _alpaca_segments(example)
    out = []
    if template == "chat":
        for i, m in enumerate(example.messages):
            sep = "\n" if i else ""  # newline between turns (after the previous turn's EOS)
            if m.role == "assistant":
                out.append(Segment(sep + CHAT_HEADERS["assistant"], False))
                out.append(Segment(m.content.strip(), trained[i], eos=True))
            else:
                out.append(Segment(sep + CHAT_HEADERS[m.role] + m.content.strip(), False))
        return out
    for i, m in enumerate(example.messages):
        if m.role == "assistant":
            out.append(Segment(" " + m.content.strip(), trained[i], eos=True))
        else:
            out.append(Segment(m.content, False))
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
    return [Segment(prompt, False), Segment("\n" + answer.content.strip(), True)]


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


def tokenize_segments(segs: list[Segment], tok: TextTokenizer) -> Rendered:
    """Tokenizes the concatenated segments once and labels tokens by character offsets.

    A token is trainable when its span overlaps a trainable segment. An EOS id is inserted after each segment
    with ``ends_with_eos`` (before the first token that starts at or after the segment's end), trained when the
    segment is. The cost is one tokenizer call and one pass over the tokens: linear in the number of turns.
    """
    text = "".join(s.text for s in segs)
    ranges: list[tuple[int, int]] = []
    eos_at: list[tuple[int, bool]] = []
    pos = 0
    for s in segs:
        end = pos + len(s.text)
        if s.trainable:
            ranges.append((pos, end))
        if s.ends_with_eos:
            eos_at.append((end, s.trainable))
        pos = end
    ids, offsets = tok.encode_with_offsets(text)
    input_ids: list[int] = []
    labels: list[int] = []
    if tok.bos_id is not None:
        input_ids.append(tok.bos_id)
        labels.append(IGNORE_INDEX)
    r = e = 0
    for tid, (a, b) in zip(ids, offsets):
        while e < len(eos_at) and eos_at[e][0] <= a:
            # segment e ended before this token: close it with an EOS
            input_ids.append(tok.eos_id)
            labels.append(tok.eos_id if eos_at[e][1] else IGNORE_INDEX)
            e += 1
        while r < len(ranges) and ranges[r][1] <= a:
            r += 1
        trainable = r < len(ranges) and a < ranges[r][1] and b > ranges[r][0]
        input_ids.append(tid)
        labels.append(tid if trainable else IGNORE_INDEX)
    for _, trained in eos_at[e:]:
        input_ids.append(tok.eos_id)
        labels.append(tok.eos_id if trained else IGNORE_INDEX)
    return Rendered(input_ids, labels)


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
    if overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"unknown overflow policy {overflow!r}; choose one of {OVERFLOW_POLICIES}")
    try:
        r = tokenize_segments(segments(example, template, tok, train_on), tok)
    except RecordError as e:
        return None, e.reason
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
    """Token ids of the generation prompt (BOS + prompt).

    For the ``completion``, ``alpaca`` and ``chat`` templates they are the training prefix of the example. For
    ``tokenizer`` they are the template's generation prompt, which is the training prefix when the template
    renders earlier turns the same way in both cases (mistral v0.3 does not: it moves the system message into the
    last user turn).
    """
    return tokenize_segments(prompt_segments(example, template, tok), tok).input_ids
