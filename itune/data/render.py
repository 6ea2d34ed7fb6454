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
- ``chat``: plain-text role headers, as in open-instruct (Tulu), with tools, reasoning and tool calls::

      <|system|>
      You are terse.
      <|tools|>
      [{"type": "function", "function": {"name": "get_weather", ...}}]
      <|user|>
      Weather in Paris?
      <|assistant|>
      <think>
      The user wants the weather.
      </think>
      Let me look.
      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call></s>
      <|tool|>
      {"temp_c": 18}
      <|assistant|>
      18 degrees.</s>

  Headers are ordinary text (no added tokens); ``</s>`` is the EOS id, appended after each assistant turn. The
  ``<|tools|>`` turn (the record's ``tools`` as JSON) follows the system message; an assistant turn is its
  reasoning in ``<think>`` tags, its text, then one ``<tool_call>`` block per call (``{"name", "arguments"}``
  JSON), all trained.
- ``tokenizer``: the tokenizer's own Jinja chat template (``tokenizer_config.json`` ``chat_template``), given the
  messages with their ``tool_calls`` / ``tool_call_id`` / ``name`` / ``reasoning_content`` and the record's
  ``tools``, rendered twice per example (plain, and with marker characters in every message) whatever the number
  of turns. An assistant turn is trained from the end of the template's generation prompt through the first
  end-of-turn special token after its text (``</s>``, ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``,
  ``<|end|>`` / ``<|return|>`` / ``<|call|>``; measured once per template on probe conversations), so the reasoning
  block and tool calls the template writes are trained and its headers are not; when it writes no end-of-turn
  token, a trained EOS id is added. Messages the template leaves out (Mistral's drops the system message unless
  the conversation ends with a user turn) are counted and reported.

In every template all assistant turns are trained (``train_on="last"``: only the last one; a turn with
``weight`` 0: never) together with their EOS / end-of-turn token; system, user and tool turns and role headers
never are.
"""

from __future__ import annotations

import bisect
import json
import os
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

#: Role headers of the ``chat`` template (``tools``: the record's tool schemas, after the system message).
CHAT_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n", "tool": "<|tool|>\n",
                "tools": "<|tools|>\n"}
#: How the ``chat`` template writes an assistant turn's reasoning (before its content) and each tool call (after
#: it, one per line, as ``{"name": ..., "arguments": {...}}`` JSON): Qwen / Hermes conventions.
CHAT_THINK = ("<think>\n", "\n</think>\n")
CHAT_TOOL_CALL = ("<tool_call>\n", "\n</tool_call>")

# Marker characters placed in messages to find them in a rendered chat template: message i's text ends with
# chr(_END0 + i) and an assistant text starts with chr(_START0 + i) (Supplementary Private Use Areas A and B,
# which data does not hold: a message that does is refused).
_END0, _START0 = 0xF0000, 0x100000
MAX_TEMPLATE_MESSAGES = 0xFFFE
_MARKER_RE = re.compile("[\U000F0000-\U0010FFFF]")


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


def trained_turns(messages, train_on: str = "all") -> list[bool]:
    """Per message, whether it is trained: assistant turns whose ``weight`` is not 0; with ``train_on="last"``,
    only the last assistant turn (when its weight is not 0)."""
    trained = [m.role == "assistant" and m.weight != 0 for m in messages]
    if train_on == "last":
        last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
        trained = [t and i == last for i, t in enumerate(trained)]
    return trained


def segments(example: Example, template: str = "completion", tok: TextTokenizer | None = None,
             train_on: str = "all", dropped: Counter | None = None) -> list[Segment]:
    """Splits an example into text segments, each trained or not (see the module docstring for the templates).

    ``completion``: every non-assistant message verbatim, each assistant message as ``" " + content.strip()``
    (the separating space belongs to the response, see :func:`itune.data.sources.tk_instruct_prompt`).

    Args:
        template: one of :data:`TEMPLATES`; ``tokenizer`` needs ``tok`` (its chat template).
        train_on: ``all`` assistant turns or only the ``last`` one; an assistant turn with ``weight`` 0 never.
        dropped: ``tokenizer`` template: counts (by role) the messages the chat template left out of its text.

    Raises:
        RecordError: the example does not fit the template (``alpaca``: more than one turn; ``completion`` and
            ``alpaca``: tool calls, tool turns or reasoning (``template_mismatch``); ``tokenizer``: the template
            raised, or a message holds a reserved marker character).
    """
    _check(template, train_on)
    messages = example.messages
    trained = trained_turns(messages, train_on)
    if template == "tokenizer":
        if tok is None:
            raise ConfigError("template 'tokenizer' needs the tokenizer (its chat template)")
        return _template_segments(example, tok, trained, dropped)
    if template == "chat":
        return _chat_segments(example, trained)[0]
    if example.tools or any(m.role == "tool" or m.tool_calls or m.reasoning for m in messages):
        raise RecordError("template_mismatch", example.id,
                          f"the {template} template has no place for tools, tool calls or reasoning; use --template "
                          "chat or tokenizer for such conversations")
    if template == "alpaca":
        return _alpaca_segments(example)
    out = []
    for m, t in zip(messages, trained):
        out.append(Segment(" " + m.content.strip(), t, True) if m.role == "assistant" else Segment(m.content, False))
    return out


def _tool_call_json(call: dict) -> str:
    fn = call["function"]
    return json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)


def _chat_segments(example: Example, trained: list[bool]) -> tuple[list[Segment], list[str]]:
    """The ``chat`` template's segments, and the texts the template itself wrote (headers, think and tool-call
    tags), in order, for :func:`check_rendered_special_text`."""
    out, written = [], []
    tools_at = 1 if example.messages and example.messages[0].role == "system" else 0
    for i, m in enumerate(example.messages):
        sep = "\n" if out else ""  # newline between turns (after the previous turn's EOS)
        if i == tools_at and example.tools:
            text = json.dumps(example.tools, ensure_ascii=False)
            out.append(Segment(sep + CHAT_HEADERS["tools"] + text, False))
            written.append(CHAT_HEADERS["tools"])
            sep = "\n"
        if m.role != "assistant":
            out.append(Segment(sep + CHAT_HEADERS[m.role] + m.content.strip(), False))
            written.append(CHAT_HEADERS[m.role])
            continue
        out.append(Segment(sep + CHAT_HEADERS["assistant"], False))
        written.append(CHAT_HEADERS["assistant"])
        body = m.content.strip()
        if m.reasoning:
            body = CHAT_THINK[0] + m.reasoning.strip() + CHAT_THINK[1] + body
            written += list(CHAT_THINK)
        for call in m.tool_calls or ():
            body += ("\n" if body else "") + CHAT_TOOL_CALL[0] + _tool_call_json(call) + CHAT_TOOL_CALL[1]
            written += list(CHAT_TOOL_CALL)
        out.append(Segment(body, trained[i], True))
    return out, written


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


def _strftime_now(fmt: str) -> str:
    """The chat templates' ``strftime_now`` (Llama 3.x writes today's date into its system header): the current
    date as in ``transformers``, or ``SOURCE_DATE_EPOCH`` (seconds, UTC) when set, for byte-identical rebuilds."""
    import datetime
    import os

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else datetime.datetime.now()
    return now.strftime(fmt)


def _jinja_template(source: str):
    """Compiles a chat template the way ``transformers`` does (sandboxed, trim_blocks, lstrip_blocks, the
    ``loopcontrols`` extension, ``tojson``, ``raise_exception``, ``strftime_now`` and the ``{% generation %}``
    block, which renders its body)."""
    cached = _TEMPLATE_CACHE.get(source)
    if cached is not None:
        return cached
    try:
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency of the environment
        raise ConfigError("template 'tokenizer' needs the jinja2 package (pip install jinja2)") from e
    from jinja2.exceptions import TemplateError

    class GenerationBlock(Extension):  # transformers marks assistant text with it; the text is found here anyway
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        t = env.from_string(source)
    except TemplateError as e:
        raise ConfigError(f"the tokenizer's chat template does not compile: {e}") from e
    _TEMPLATE_CACHE[source] = t
    return t


_TEMPLATE_CACHE: dict = {}


def apply_chat_template(messages: list[dict], tok: TextTokenizer, add_generation_prompt: bool = False,
                        location: str = "", tools: list | None = None) -> str:
    """Renders ``messages`` (``[{"role", "content", ...}]``, with ``tools``) with the tokenizer's chat template,
    as text.

    Raises:
        ConfigError: the tokenizer has no chat template.
        RecordError: the template raised for these messages (reason ``template_error``).
    """
    if not tok.chat_template:
        raise ConfigError(f"{tok.path}: the tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                          "or chat_template.jinja); use --template chat")
    from jinja2.exceptions import TemplateError

    kwargs = dict(tok.special_tokens or {})
    kwargs.update(tok.chat_template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    try:
        return _jinja_template(tok.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                         **kwargs)
    except TemplateError as e:
        raise RecordError("template_error", location, f"the tokenizer's chat template refused this example: {e}")
    except Exception as e:  # a template reading a field this message lacks (e.g. tool_call.function.name)
        raise RecordError("template_error", location, f"the tokenizer's chat template failed on this example "
                                                      f"({type(e).__name__}: {e})") from None


#: variables itune itself passes to a chat template; --chat-template-kwargs cannot set them
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "tools", "bos_token", "eos_token", "pad_token",
                            "unk_token")


def check_chat_template_kwargs(kwargs, tok: TextTokenizer, setting: str = "--chat-template-kwargs") -> dict:
    """Checks the extra chat-template variables ``kwargs`` (a JSON object, e.g. ``{"enable_thinking": false}``)
    against ``tok``'s chat template and returns them as a dict.

    A variable the template never reads would be ignored without a word, so it is refused, as is one that changes
    nothing the template writes for a user / assistant conversation and for a generation prompt (Mistral's
    ``system_message``, written only before a final user turn; ``loop_messages``, which it sets itself), and the
    variables itune sets itself (:data:`RESERVED_TEMPLATE_KWARGS`).

    Raises:
        ConfigError: not a JSON object, a reserved name, a name the template does not read or whose value changes
            nothing it writes, a value the template fails with, or a tokenizer without a chat template.
    """
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{setting} {kwargs!r}: not JSON ({e.msg}); give an object such as "
                              "'{\"enable_thinking\": false}'") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{setting}: must be a JSON object of template variables, not {type(kwargs).__name__}")
    if not kwargs:
        return {}
    reserved = sorted(set(kwargs) & set(RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise ConfigError(f"{setting}: {', '.join(reserved)} {'is' if len(reserved) == 1 else 'are'} set by itune "
                          "itself (messages, tools and the tokenizer's special tokens); remove "
                          f"{'it' if len(reserved) == 1 else 'them'}")
    if not tok.chat_template:
        raise ConfigError(f"{setting}: {tok.path} has no chat template to pass them to")
    from jinja2 import meta, nodes

    env = _jinja_template(tok.chat_template).environment  # compiles (a ConfigError names a broken template)
    tree = env.parse(tok.chat_template)
    read = meta.find_undeclared_variables(tree)
    assigned = {n.name for a in tree.find_all((nodes.Assign, nodes.For))
                for n in [a.target, *a.target.find_all(nodes.Name)] if isinstance(n, nodes.Name)}
    guarded = {t.node.name for t in tree.find_all(nodes.Test)  # {% if x is not defined %}{% set x = ... %}
               if t.name in ("defined", "undefined") and isinstance(t.node, nodes.Name)}
    inputs = sorted(((read - assigned) | (guarded & read)) - set(RESERVED_TEMPLATE_KWARGS)
                    - {"raise_exception", "strftime_now"})
    unread = sorted(set(kwargs) - read)
    if unread:
        raise ConfigError(f"{setting}: the chat template of {tok.path} never reads {', '.join(unread)} (its inputs "
                          f"besides messages and tools: {', '.join(inputs) or 'none'}); remove or rename "
                          f"{'it' if len(unread) == 1 else 'them'}")
    idle = [k for k, where in template_kwargs_effects(kwargs, tok, setting).items() if where == "nothing"]
    if idle:
        raise ConfigError(f"{setting}: {', '.join(idle)} {'changes' if len(idle) == 1 else 'change'} nothing the "
                          f"chat template of {tok.path} writes for a user / assistant conversation or its generation "
                          f"prompt; remove {'it' if len(idle) == 1 else 'them'}")
    return dict(kwargs)


def template_kwargs_effects(kwargs: dict, tok: TextTokenizer, setting: str = "--chat-template-kwargs") -> dict:
    """Where each chat-template variable changes what ``tok``'s template writes, measured on a user / assistant
    conversation (the training text) and on a user turn with the generation prompt (held-out prompts):
    ``{name: "conversations and prompts" | "conversations only" | "prompts only" | "nothing"}``. Mistral's
    ``system_message`` reaches prompts only (the template writes it before a final user turn), so the training
    text lacks what the prompts have.

    Raises:
        ConfigError: the template fails with a variable's value.
    """
    conv = [{"role": "user", "content": "itune probe question"}, {"role": "assistant", "content": "itune probe answer"}]
    saved = tok.chat_template_kwargs
    out = {}
    try:
        def renders(kw):
            tok.chat_template_kwargs = kw
            return (apply_chat_template(conv, tok), apply_chat_template(conv[:1], tok, add_generation_prompt=True))

        plain = renders({})
        for k, v in kwargs.items():
            try:
                text, prompt = renders({k: v})
            except RecordError as e:
                raise ConfigError(f"{setting}: the chat template fails with {k}={v!r}: {e.detail}") from None
            changed = (text != plain[0], prompt != plain[1])
            out[k] = {(True, True): "conversations and prompts", (True, False): "conversations only",
                      (False, True): "prompts only", (False, False): "nothing"}[changed]
    finally:
        tok.chat_template_kwargs = saved
    return out


def _strip_bos_text(text: str, tok: TextTokenizer) -> str:
    bos = (tok.special_tokens or {}).get("bos_token")
    if tok.bos_id is not None and bos and text.startswith(bos):
        return text[len(bos):]  # the BOS id is added once by tokenize_segments
    return text


def message_dict(m, content: str | None = None) -> dict:
    """A message as chat templates read it: ``role``, ``content`` and, when present, ``tool_calls``,
    ``tool_call_id``, ``name`` and the reasoning as both ``reasoning_content`` (Qwen3) and ``thinking`` (GPT-OSS)."""
    d = {"role": m.role, "content": m.content if content is None else content}
    if m.tool_calls:
        d["tool_calls"] = [dict(c, function=dict(c["function"])) for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        d["name"] = m.name
    if m.reasoning is not None:
        d["reasoning_content"] = d["thinking"] = m.reasoning
    return d


@dataclass(frozen=True)
class TemplateProbe:
    """What a chat template writes around an assistant turn, measured once per template on probe conversations.

    Attributes:
        header: the generation prompt (``add_generation_prompt`` text after a user turn): where a turn the model
            writes starts ("" when the template has none, e.g. Mistral's).
        user_tail: the text between a user message and the assistant content that follows it.
        prompt_tail: the text after a user message in the generation prompt (``[/INST]`` for Mistral, the header
            for most): what precedes the first token the model writes after a user turn.
        end_of_turn: special-token texts the template writes right after an assistant message (after its text,
            after a tool call, in an earlier and in the last turn), e.g. ``<|im_end|>``, ``<|eot_id|>``,
            ``<|end|>`` / ``<|return|>`` / ``<|call|>``.
    """

    header: str
    user_tail: str
    end_of_turn: tuple
    prompt_tail: str = ""


_PROBES: dict = {}


def _leading_special(text: str, specials: tuple) -> str | None:
    return max((s for s in specials if text.startswith(s)), key=len, default=None)


def template_probe(tok: TextTokenizer) -> TemplateProbe:
    """Measures :class:`TemplateProbe` for ``tok``'s chat template (cached).

    Raises:
        ConfigError: the template cannot render a plain user / assistant conversation.
    """
    key = (tok.chat_template, tuple(sorted((tok.special_tokens or {}).items())), tok.special_texts,
           json.dumps(tok.chat_template_kwargs or {}, sort_keys=True))
    if key in _PROBES:
        return _PROBES[key]
    u, a, u2, a2 = "itune probe question", "itune probe answer", "itune probe again", "itune probe reply"
    conv = [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    try:
        one = apply_chat_template(conv[:1], tok)
        gen = apply_chat_template(conv[:1], tok, add_generation_prompt=True)
        two = apply_chat_template(conv, tok)
        four = apply_chat_template(conv + [{"role": "user", "content": u2}, {"role": "assistant", "content": a2}],
                                   tok)
    except RecordError as e:
        raise ConfigError(f"{tok.path}: the chat template cannot render a user / assistant conversation: "
                          f"{e.detail}") from None
    # the generation prompt: what the template writes after the user turn only when asked for one (Phi-3 writes
    # an EOS there otherwise, so the texts are compared from where they part)
    cut = len(os.path.commonprefix([one, gen]))
    specials = tok.special_texts
    cut = min([p for t in specials for p in range(max(0, cut - len(t) + 1), cut)
               if gen.startswith(t, p) and p + len(t) > cut] + [cut])  # not inside a special token's text
    header = gen[cut:] if cut >= one.find(u) + len(u) > len(u) - 1 else ""
    eot = set()
    for text, word in ((two, a), (four, a), (four, a2)):
        at = text.find(word) if word != a2 else text.rfind(word)
        s = _leading_special(text[at + len(word):], specials) if at >= 0 else None  # (a template may alter text)
        if s:
            eot.add(s)
    at_u, at_a = two.find(u), two.find(a)
    user_tail = two[at_u + len(u):at_a] if 0 <= at_u < at_a else ""
    at_g = gen.find(u)
    prompt_tail = gen[at_g + len(u):] if at_g >= 0 else ""
    call = {"type": "function", "function": {"name": "probe_fn", "arguments": {"q": "itune probe argument"}},
            "id": "probe0001"}
    try:
        text = apply_chat_template(
            [{"role": "user", "content": u}, {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "content": "itune probe result", "tool_call_id": "probe0001", "name": "probe_fn"},
             {"role": "assistant", "content": a2}], tok,
            tools=[{"type": "function", "function": {"name": "probe_fn", "description": "d", "parameters": {
                "type": "object", "properties": {"q": {"type": "string"}}}}}])
        at = text.find("itune probe argument")
        hit = _specials_after(text, at, specials) if at >= 0 else None
        if hit:
            eot.add(hit)
    except (RecordError, ConfigError):
        pass  # a template without tool calls: tool conversations are refused by the template itself
    probe = TemplateProbe(header, user_tail, tuple(sorted(eot, key=len, reverse=True)), prompt_tail)
    _PROBES[key] = probe
    return probe


def _specials_after(text: str, at: int, specials: tuple) -> str | None:
    """The first special-token text at or after position ``at``."""
    best = None
    for s in specials:
        p = text.find(s, at)
        if p >= 0 and (best is None or p < best[0] or (p == best[0] and len(s) > len(best[1]))):
            best = (p, s)
    return best[1] if best else None


def _reserved(example: Example) -> None:
    texts = [m.content for m in example.messages] + [m.reasoning or "" for m in example.messages]
    texts += [json.dumps(m.tool_calls, ensure_ascii=False) for m in example.messages if m.tool_calls]
    if example.tools:
        texts.append(json.dumps(example.tools, ensure_ascii=False))
    if len(example.messages) > MAX_TEMPLATE_MESSAGES:
        raise RecordError("template_error", example.id, f"{len(example.messages)} messages: the tokenizer template "
                                                        f"renderer takes at most {MAX_TEMPLATE_MESSAGES}")
    for t in texts:
        if _MARKER_RE.search(t):
            raise RecordError("reserved_character", example.id, "a message holds a character of the Supplementary "
                                                                "Private Use Areas (U+F0000 and above), reserved by "
                                                                "the tokenizer template renderer")


def _marked(m, i: int) -> str | None:
    """Message ``i``'s content with its markers around the stripped text (inside any surrounding whitespace, so
    a template's ``trim`` still removes it); None for an empty content (left as it is)."""
    c = m.content.strip() if m.role == "assistant" else m.content
    core = c.strip()
    if not core:
        return None
    lead = c[:len(c) - len(c.lstrip())]
    trail = c[len(c.rstrip()):]
    start = chr(_START0 + i) if m.role == "assistant" else ""
    return lead + start + core + chr(_END0 + i) + trail


def _template_segments(example: Example, tok: TextTokenizer, trained: list[bool],
                       dropped: Counter | None = None) -> list[Segment]:
    """The tokenizer template's segments, from one plain and one marked rendering (linear in the turns).

    Every message's text ends with its own marker character, and an assistant text also starts with one. In the
    marked rendering (markers removed, it must equal the plain one) an assistant turn is trained from the end of
    the template's generation prompt (:class:`TemplateProbe` ``header``) that precedes it, or from its start
    marker when the template has none, through the first end-of-turn token after its text (tool calls the
    template writes after the text included); when no end-of-turn token follows before the next message, a
    trained EOS id is added. So a reasoning block the template writes (Qwen3's ``<think>``, GPT-OSS's analysis
    channel) is trained with its turn, and the header itself never is. Messages whose marker is absent from the
    rendering were left out by the template: counted in ``dropped`` by role.
    """
    _reserved(example)
    msgs = example.messages
    plain_dicts, marked_dicts = [], []
    for i, m in enumerate(msgs):
        content = m.content.strip() if m.role == "assistant" else m.content
        plain_dicts.append(message_dict(m, content))
        mk = _marked(m, i)
        marked_dicts.append(message_dict(m, content if mk is None else mk))
    plain = apply_chat_template(plain_dicts, tok, location=example.id, tools=example.tools)
    marked = apply_chat_template(marked_dicts, tok, location=example.id, tools=example.tools)
    # marker positions in the plain text's coordinates
    start_at, end_at, removed = {}, {}, 0
    for mo in _MARKER_RE.finditer(marked):
        c = ord(mo.group())
        pos = mo.start() - removed
        removed += 1
        if c >= _START0:
            start_at.setdefault(c - _START0, pos)
        elif c >= _END0:
            i = c - _END0
            if i in end_at and msgs[i].role == "assistant":
                raise RecordError("template_error", example.id, f"the chat template writes assistant message {i} "
                                                                "twice; use --template chat")
            end_at.setdefault(i, pos)
    text = _MARKER_RE.sub("", marked)
    if text != plain:
        raise RecordError("template_error", example.id,
                          "the chat template renders these messages differently when their ends are marked (it "
                          "inspects their characters), so the turns cannot be located; use --template chat")
    probe = template_probe(tok)
    n = len(msgs)
    bound = [len(text)] * (n + 1)  # bound[i]: first marker position of messages i.. (the next message's start)
    for i in range(n - 1, -1, -1):
        bound[i] = min([bound[i + 1]] + [p for p in (start_at.get(i), end_at.get(i)) if p is not None])
    out, cursor, last_end = [], 0, 0
    for i, m in enumerate(msgs):
        if m.role != "assistant":
            if i in end_at:
                cursor = max(cursor, end_at[i])
            elif m.content.strip() and dropped is not None:
                dropped[m.role] += 1
            continue
        if m.content.strip() and i not in end_at:
            raise RecordError("template_error", example.id, f"the chat template leaves out assistant message {i}, "
                                                            "so it cannot be trained; use --template chat")
        limit = start_at.get(i, end_at.get(i, bound[i + 1]))
        after_user = i > 0 and msgs[i - 1].role == "user" and (i - 1) in end_at
        p = cursor + len(probe.prompt_tail)
        if after_user and probe.prompt_tail and text.startswith(probe.prompt_tail, cursor) and p <= limit \
                and (probe.header or (i in start_at and not text[p:start_at[i]].strip())):
            # where generation starts after this user turn; without a generation prompt only whitespace may come
            # before the text (Mistral writes " " + text: the space is the first token the model writes)
            s = p
        elif probe.header:
            g = text.find(probe.header, cursor, limit + len(probe.header) - 1 if limit < len(text) else len(text))
            if g < 0 or g + len(probe.header) > limit:
                raise RecordError("template_error", example.id, f"no generation prompt ({probe.header!r}) before "
                                                                f"assistant message {i} in the chat template's text")
            s = g + len(probe.header)
        elif i in start_at:
            s = start_at[i]
        elif probe.user_tail and text.startswith(probe.user_tail, cursor):
            s = cursor + len(probe.user_tail)
        elif probe.user_tail.rstrip() and text.startswith(probe.user_tail.rstrip(), cursor):
            s = cursor + len(probe.user_tail.rstrip())  # Mistral: "[/INST] " before a text, "[/INST]" before a call
        else:
            raise RecordError("template_error", example.id, f"cannot locate assistant message {i} (no text and a "
                                                            "template without a generation prompt)")
        e0 = max(end_at.get(i, s), s)
        stop = bound[i + 1]
        eot_at, eot = -1, ""
        for t in probe.end_of_turn:
            p = text.find(t, e0, stop + len(t) - 1 if stop < len(text) else len(text))
            if p >= 0 and (eot_at < 0 or p < eot_at):
                eot_at, eot = p, t
        e = eot_at + len(eot) if eot_at >= 0 else e0
        missing = [c["function"]["name"] for c in m.tool_calls or () if c["function"]["name"] not in text[s:e]]
        if missing:
            raise RecordError("template_error", example.id, f"the chat template does not write the tool call(s) "
                                                            f"{missing} of assistant message {i}; use a template "
                                                            "with tool calls (or --template chat)")
        if not m.content.strip() and not m.tool_calls and m.reasoning and m.reasoning.strip() not in text[s:e]:
            raise RecordError("empty_assistant", example.id, f"assistant message {i} holds only reasoning, which "
                                                             "the chat template leaves out: nothing to train on")
        if m.reasoning and dropped is not None and m.reasoning.strip() not in text[s:e]:
            dropped["reasoning"] += 1  # e.g. Qwen3 and GPT-OSS keep reasoning in the last turns only
        out.append(Segment(text[last_end:s], False))
        out.append(Segment(text[s:e], trained[i], eos=eot_at < 0))
        cursor = last_end = e
    out.append(Segment(text[last_end:], False))
    if out:
        out[0] = Segment(_strip_bos_text(out[0].text, tok), out[0].trainable, out[0].eos)
    return [s for s in out if s.text or s.ends_with_eos]


def prompt_segments(example: Example, template: str = "completion", tok: TextTokenizer | None = None) -> list[Segment]:
    """The segments before the final assistant response: the generation prompt used by evaluation.

    For the ``tokenizer`` template this is the template's own generation prompt (``add_generation_prompt``) for
    the messages before the last assistant message.
    """
    if template == "tokenizer":
        last = max(i for i, m in enumerate(example.messages) if m.role == "assistant")
        msgs = [message_dict(m, m.content.strip() if m.role == "assistant" else m.content)
                for m in example.messages[:last]]
        text = apply_chat_template(msgs, tok, add_generation_prompt=True, location=example.id, tools=example.tools)
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


def _message_texts(m) -> list[tuple[str, str]]:
    """``(what, text)`` of a message: its content, reasoning and tool calls (as JSON)."""
    out = [(f"a {m.role} message", m.content)]
    if m.reasoning:
        out.append((f"the reasoning of a {m.role} message", m.reasoning))
    for c in m.tool_calls or ():
        out.append(("a tool call", json.dumps(c, ensure_ascii=False)))
    return out


def check_no_special_text(example: Example, tok: TextTokenizer) -> None:
    """Refuses an example whose messages (or tool calls, reasoning, tool schemas) contain a special token's text
    (``<s>``, ``</s>``, ``[INST]``, an added ``<|user|>``...). Rendered text is encoded with special tokens parsed,
    so that template headers can be added tokens; such a string in a record would become a control token (a
    second BOS, a trained EOS mid-answer).

    Raises:
        RecordError: reason ``special_token_text``, naming the role and the text.
    """
    texts = [t for m in example.messages for t in _message_texts(m)]
    if example.tools:
        texts.append(("the tools", json.dumps(example.tools, ensure_ascii=False)))
    for what, text in texts:
        hit = tok.find_special_text(text)
        if hit is not None:
            raise RecordError("special_token_text", example.id,
                              f"{what} contains {hit!r}, the text of a special token of the tokenizer, "
                              "which would be encoded as that control token; remove or escape it")


def check_rendered_special_text(example: Example, segs: list[Segment], template: str, tok: TextTokenizer,
                                text: str | None = None, written: list[str] | None = None) -> None:
    """Refuses an example whose rendered text (``completion``, ``alpaca`` or ``chat`` template) holds a special
    token's text that the template did not write: one inside a message (:func:`check_no_special_text`), or one
    formed where two pieces of text meet (a system message ending in ``"<"`` before a user message starting with
    ``"/s>"`` renders ``"</s>"`` in the ``completion`` template, which concatenates messages). These templates write
    special-token text only in ``chat`` headers and tags (``written``, when the tokenizer has them as added tokens),
    so the rendered text must hold exactly their matches. One regular-expression scan of the rendered text.

    ``text``: the segments' text joined, when the caller has it.

    Raises:
        RecordError: reason ``special_token_text``.
    """
    if text is None:
        text = "".join(s.text for s in segs)
    found = tok.special_text_matches(text) if template == "chat" else \
        ([] if (hit := tok.find_special_text(text)) is None else [hit])
    expected = [x for w in (written or ()) for x in tok.special_text_matches(w)] if template == "chat" else []
    if found != expected:
        check_no_special_text(example, tok)  # names the message when the text lies within one
        extra = next(iter((Counter(found) - Counter(expected)).elements()), found[0] if found else "")
        raise RecordError("special_token_text", example.id,
                          f"the rendered text contains {extra!r}, the text of a special token of the tokenizer, "
                          "formed where two messages (or a message and the template's text) meet; it would be "
                          "encoded as that control token; change the text at that boundary")


def render_batch(examples: list[Example], tok: TextTokenizer, seq_len: int, template: str = "completion",
                 overflow: str = "truncate_prompt_left", train_on: str = "all", dropped: Counter | None = None):
    """:func:`render` for many examples with one batched tokenizer call.

    Returns:
        Per example ``((input_ids, labels), None, None)`` with int32 arrays ``[tokens]`` (tokens <= ``seq_len``),
        ``(None, reason, None)`` for ``too_long`` / ``no_trainable_tokens``, or ``(None, reason, error)`` with the
        :class:`~itune.data.sources.RecordError` of an example the template cannot render (a bad record).
    """
    ids, labels, lengths, status = render_flat(examples, tok, seq_len, template, overflow, train_on, dropped)
    cuts = np.cumsum(lengths)[:-1]
    kept = iter(zip(np.split(ids, cuts), np.split(labels, cuts)) if len(lengths) else ())
    return [(next(kept), None, None) if st is None else (None, st[0], st[1]) for st in status]


def render_flat(examples: list[Example], tok: TextTokenizer, seq_len: int, template: str = "completion",
                overflow: str = "truncate_prompt_left", train_on: str = "all", dropped: Counter | None = None):
    """:func:`render_batch` with the written examples' arrays concatenated (what data preparation stores).
    ``dropped``: counts (by role) the messages a ``tokenizer`` chat template left out (:func:`segments`).

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
            written = None
            if template == "tokenizer":  # the chat template writes its own text between messages
                check_no_special_text(ex, tok)
                segs = segments(ex, template, tok, train_on, dropped)
            elif template == "chat":
                segs, written = _chat_segments(ex, trained_turns(ex.messages, train_on))
            else:
                segs = segments(ex, template, tok, train_on)
            lay = _layout(segs)
            if template != "tokenizer":
                check_rendered_special_text(ex, segs, template, tok, lay[0], written)
            layouts.append(lay)
            todo.append(i)
        except RecordError as e:
            status[i] = (e.reason, e)
    # the tokenizer template's text holds its control tokens, which ids alone cannot place (offsets needed)
    from_ids = template != "tokenizer" and not (template == "chat" and any(
        tok.find_special_text(h) for h in (*CHAT_HEADERS.values(), *CHAT_THINK, *CHAT_TOOL_CALL)))
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
