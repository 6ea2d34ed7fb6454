"""Readers that turn raw instruction data into one example type: a list of messages with roles.

Every reader yields :class:`Example` objects or, for a record that cannot be used, raises
:class:`~itune.errors.DataFormatError` naming the file and record (callers that asked to skip count it instead).
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from itune.errors import DataFormatError

ROLES = ("system", "user", "assistant", "tool")


class Message(NamedTuple):
    """One turn (an immutable tuple).

    Attributes:
        role: ``system``, ``user``, ``assistant`` or ``tool`` (a tool's output).
        content: the text ("" for an assistant turn that only calls tools).
        tool_calls: assistant turns: the calls it makes, in the OpenAI / Hugging Face chat-template form
            ``{"type": "function", "function": {"name": str, "arguments": dict}}`` (plus ``"id"`` when the data
            has one); None when it calls none.
        tool_call_id: tool turns: the id of the call answered, when the data has one.
        name: the tool's name (tool turns) or the speaker's name, when the data has one.
        weight: assistant turns: 0 = not trained (context only), 1 or None = trained (OpenAI's fine-tuning
            ``weight``; axolotl's ``training`` / ``train`` flags map to it).
        reasoning: assistant turns: the reasoning written before the answer (``reasoning_content`` / ``thinking``),
            rendered by the template (Qwen3's ``<think>`` block, GPT-OSS's analysis channel) and trained with it.
    """

    role: str
    content: str
    tool_calls: tuple | None = None
    tool_call_id: str | None = None
    name: str | None = None
    weight: int | None = None
    reasoning: str | None = None

    @property
    def trained(self) -> bool:
        """Whether this turn is trained when its template trains assistant turns (weight not 0)."""
        return self.role == "assistant" and self.weight != 0


@dataclass
class Example:
    """One instruction example.

    Attributes:
        id: stable record id (SuperNI instance id, or file:line).
        messages: the conversation; the last message is the assistant response to train on / to predict.
        task: task name (SuperNI task, or the source name).
        category: task category (SuperNI ``Categories[0]``), used for per-category scores.
        references: every accepted answer (SuperNI ``output`` list); the first one is the training target.
        source: the file the example came from.
        extra: format-specific parts a template may use (Alpaca: ``instruction`` and ``input``).
        tools: the tools offered to the model (record-level ``tools``, each
            ``{"type": "function", "function": {"name", "description", "parameters"}}``), or None.
        unused_keys: keys of the record that the format and field mapping did not read (``messages[].KEY`` for a
            key inside turns), reported per source.
        dropped_turns: turns after the last assistant turn (nothing to train on), reported per source.
    """

    id: str
    messages: list[Message]
    task: str
    category: str = ""
    references: list[str] = field(default_factory=list)
    source: str = ""
    extra: dict = field(default_factory=dict)
    tools: list | None = None
    unused_keys: tuple = ()
    dropped_turns: int = 0


def read_split_file(path: str | Path) -> list[str]:
    """Reads a SuperNI split file: one task name per line; blank lines and ``#`` comments ignored.

    Raises:
        DataFormatError: the file is missing or lists a task twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: split file not found (expected one task name per line)")
    names: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in names:
            raise DataFormatError(f"{path}:{lineno}: task {name!r} is listed twice")
        names.append(name)
    return names


def _end_punct(s: str) -> str:
    return s if s and s[-1] in string.punctuation else s + "."


def tk_instruct_prompt(definition: str, positive_examples: list[dict], instance_input: str) -> str:
    """Builds the Tk-Instruct prompt (definition + positive examples + the instance input).

    Format of Tk-Instruct's collator (allenai/tk-instruct ``src/ni_collator.py``, the "definition + 2 positive
    examples" encoding), with one change for decoder models: the prompt ends with ``"Output:"`` and the space
    that follows belongs to the response, so the prompt's tokens are a prefix of the prompt+response tokens.

    Example::

        Definition: Reverse the words.

         Positive Example 1 -
        Input: a b.
         Output: b a.

        Now complete the following example -
        Input: c d.
        Output:
    """
    text = ""
    if definition:
        text += _end_punct("Definition: " + definition.strip()) + "\n\n"
    for idx, ex in enumerate(positive_examples):
        text += _end_punct(f" Positive Example {idx + 1} -\nInput: {ex['input'].strip()}") + "\n"
        text += _end_punct(f" Output: {ex['output'].strip()}") + "\n\n"
    text += _end_punct(f"Now complete the following example -\nInput: {instance_input.strip()}") + "\n"
    return text + "Output:"


def _load_task(path: Path) -> dict:
    try:
        task = json.loads(path.read_text(encoding="utf-8"))  # upstream files contain a bare NaN: json accepts it
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8") from e
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the task file") from e
    if not isinstance(task, dict):
        raise DataFormatError(f"{path}: a SuperNI task file is a JSON object, found {type(task).__name__}")
    for key, typ in (("Definition", list), ("Positive Examples", list), ("Instances", list), ("Categories", list)):
        if not isinstance(task.get(key), typ):
            raise DataFormatError(
                f"{path}: field {key!r} must be a list (found {type(task.get(key)).__name__}); "
                f"keys present: {sorted(task)}"
            )
    for key in ("Definition", "Categories"):
        if not all(isinstance(x, str) for x in task[key]):
            raise DataFormatError(f"{path}: field {key!r} must be a list of strings, found {task[key]!r:.80}")
    return task


def read_superni_task(
    path: str | Path,
    num_pos_examples: int = 2,
    add_definition: bool = True,
    max_instances: int | None = None,
):
    """Yields ``(Example | None, reject_reason | None, record_ref)`` for each instance of one SuperNI task file.

    Args:
        path: ``tasks/<task>.json`` in the upstream schema.
        num_pos_examples: positive examples shown in the prompt (Tk-Instruct default 2).
        add_definition: include the task definition.
        max_instances: keep only the first N instances (the official evaluation uses the first 100 of a test task).

    Raises:
        DataFormatError: the file itself is unreadable (bad JSON, missing lists).
    """
    path = Path(path)
    task = _load_task(path)
    name = path.stem
    definition = task["Definition"][0] if (add_definition and task["Definition"]) else ""
    category = task["Categories"][0] if task["Categories"] else ""
    pos = task["Positive Examples"][:num_pos_examples]
    for i, ex in enumerate(pos):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("output"), str):
            raise DataFormatError(f"{path}: 'Positive Examples'[{i}] needs string 'input' and 'output'")
    task_text = [("'Definition'", definition), ("'Categories'", category)] + \
        [(f"'Positive Examples'[{i}]", ex["input"] + ex["output"]) for i, ex in enumerate(pos)]
    for where, text in task_text:
        if not utf8_encodable(text):
            raise DataFormatError(f"{path}: {where} is not valid UTF-8 text (a lone surrogate escape such as "
                                  "\\ud800); fix the task file")
    instances = task["Instances"] if max_instances is None else task["Instances"][:max_instances]
    for i, inst in enumerate(instances):
        ref = f"{path}: Instances[{i}]"
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str):
            yield None, "malformed", ref
            continue
        outputs = inst.get("output")
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            yield None, "malformed", ref
            continue
        rid = inst.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            yield None, "malformed", ref  # an id is a string (or a number)
            continue
        if not all(utf8_encodable(t) for t in [inst["input"], *outputs, rid if isinstance(rid, str) else ""]):
            yield None, "invalid_utf8", ref  # a lone surrogate escape such as \ud800: not writable as UTF-8
            continue
        if not outputs or not outputs[0].strip():
            yield None, "empty_output", ref
            continue
        iid = rid or f"{name}-{hashlib.md5(f'{name}:{i}'.encode()).hexdigest()}"
        prompt = tk_instruct_prompt(definition, pos, inst["input"])
        yield (
            Example(
                id=str(iid),
                messages=[Message("user", prompt), Message("assistant", outputs[0])],
                task=name,
                category=category,
                references=list(outputs),
                source=str(path),
            ),
            None,
            ref,
        )


def superni_task_path(tasks_dir: Path, name: str) -> Path:
    """Returns ``tasks_dir/<name>.json``.

    Raises:
        DataFormatError: the split file names a task with no file.
    """
    p = Path(tasks_dir) / f"{name}.json"
    if not p.is_file():
        raise DataFormatError(f"{p}: task {name!r} is listed in the split file but has no task file")
    return p


# --------------------------------------------------------------------------------------------------------------
# Instruction files: Alpaca, prompt/completion, chat messages, ShareGPT; JSON array, JSONL, Parquet, Arrow.
# --------------------------------------------------------------------------------------------------------------

FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt", "instances", "superni_jsonl")

#: Keys that identify each format in the first record (after ``fields`` mapping and :data:`FIELD_ALIASES`), in
#: detection order. ``instances``: Self-Instruct tasks (``instruction`` + ``instances: [{input, output}]``);
#: ``superni_jsonl``: one SuperNI task object per record (``Definition`` + ``Instances``).
FORMAT_KEYS = {
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "instances": ("instruction", "instances"),
    "superni_jsonl": ("Definition", "Instances"),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}

#: Other names a field goes by in public data sets, read when the canonical key is absent and no ``--field``
#: maps it (Dolly: ``context`` is the input, ``response`` the output).
FIELD_ALIASES = {"input": ("context",), "output": ("response",)}

#: Field names a ``fields`` mapping may rename (canonical name -> key in the file). ``role``/``content`` and
#: ``from``/``value`` are the keys inside each turn of ``messages`` / ``conversations``.
CANONICAL_FIELDS = ("instruction", "input", "output", "prompt", "completion", "messages", "conversations", "system",
                    "id", "role", "content", "from", "value", "tools", "instances", "name")

#: Speaker names found in chat and ShareGPT files, mapped to the four roles (lower-cased before lookup). ShareGPT's
#: ``function_call`` speaker (LLaMA-Factory, glaive) is an assistant turn calling a tool (:func:`parse_record`).
ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user", "prompter": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "model": "assistant", "bot": "assistant", "ai": "assistant", "claude": "assistant", "llm": "assistant",
    "answer": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool", "tool_response": "tool",
    "function_response": "tool",
}
FUNCTION_CALL_SPEAKER = "function_call"

#: Per-turn keys that set whether an assistant turn is trained: OpenAI's fine-tuning ``weight`` (0 or 1) and
#: axolotl's ``message_field_training`` names (``training`` / ``train``, true or false).
TURN_WEIGHT_KEYS = ("weight", "training", "train")
#: Per-turn keys holding an assistant turn's reasoning (DeepSeek / Qwen3 ``reasoning_content``, GPT-OSS
#: ``thinking``).
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

#: Alpaca ``input`` values that mean "no input" (upstream Self-Instruct/Alpaca generations write ``<noinput>``).
NO_INPUT = ("", "<noinput>", "<no input>")

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")


class RecordError(DataFormatError):
    """One record cannot be used. ``reason`` is the short name it is counted under, ``location`` the file and
    line (``path:LINE``, 1-based, for JSONL) or record index (``path: record I``, 0-based, for JSON arrays,
    Parquet and Arrow).

    Reasons: ``invalid_json``, ``invalid_utf8``, ``wrong_type``, ``missing_field``, ``unknown_role``,
    ``empty_assistant``, ``empty_instruction``, ``no_assistant_turn``, ``bad_tool_call``, ``bad_tools``,
    ``untrainable_turn``, ``unused_key`` (``--strict-keys``), ``missing_task``, ``no_instances``.
    """

    def __init__(self, reason: str, location: str, detail: str):
        self.reason = reason
        self.location = location
        self.detail = detail
        super().__init__(f"{location}: {detail}")


def _format_help() -> str:
    return "; ".join(f"{f} ({' + '.join(k)})" for f, k in FORMAT_KEYS.items())


def _has_field(record: dict, name: str, fields: dict[str, str]) -> bool:
    if name in fields:
        return fields[name] in record
    return name in record or any(a in record for a in FIELD_ALIASES.get(name, ()))


def parse_field_mapping(items: list[str] | dict | None) -> dict[str, str]:
    """Parses ``["prompt=question", ...]`` (canonical name = key in the file) into a dict.

    Raises:
        DataFormatError: an item without ``=``, a canonical name that no format uses, or one mapped twice.
    """
    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else []
    if not isinstance(items, dict):
        pairs = []
        for it in items:
            name, sep, key = str(it).partition("=")
            if not sep or not name.strip() or not key.strip():
                raise DataFormatError(f"--field {it!r}: write NAME=KEY, e.g. --field prompt=question")
            pairs.append((name.strip(), key.strip()))
    out = {}
    for name, key in pairs:
        if name not in CANONICAL_FIELDS:
            raise DataFormatError(f"--field {name}={key}: unknown field name {name!r}; "
                                  f"mappable names are {', '.join(CANONICAL_FIELDS)}")
        if name in out and out[name] != key:
            raise DataFormatError(f"--field {name}: mapped twice ({out[name]!r} and {key!r}); give it once")
        out[name] = key
    return out


def detect_format(record: dict, path: str | Path, fields: dict[str, str] | None = None) -> str:
    """Names the format of ``record`` (the first record of ``path``) from its keys.

    Raises:
        DataFormatError: no format matches; the message names the file, the keys found and the accepted formats.
    """
    fields = fields or {}
    for fmt, keys in FORMAT_KEYS.items():
        if all(_has_field(record, k, fields) for k in keys):
            return fmt
    mapped = f" (field mapping {fields})" if fields else ""
    raise DataFormatError(
        f"{path}: cannot tell the format from the first record's keys {sorted(record)}{mapped}. Accepted formats "
        f"(required keys): {_format_help()}. Rename keys with --field NAME=KEY (e.g. --field prompt=question "
        "--field completion=answer) or pass --format."
    )


def utf8_encodable(s: str) -> bool:
    """Whether ``s`` can be written as UTF-8: no lone surrogate (which JSON ``\\ud800`` escapes and
    ``os.fsdecode`` of undecodable file-name bytes produce)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_JSON = json.JSONDecoder()
_BLANK = " \t\n\r\x0b\x0c"
_BOM = b"\xef\xbb\xbf"


def _blank_first_line(raw: bytes) -> bool:
    """Whether line 1 of a JSONL file holds nothing but a UTF-8 byte order mark and ASCII whitespace."""
    body = raw.removeprefix(_BOM)
    return not body or body.isspace()


_JSON_SPACE = json.decoder.WHITESPACE.match


def decode_jsonl_line(raw: bytes, loc: str, first: bool = False):
    """One JSONL line -> the record, a :class:`RecordError` (``invalid_utf8`` / ``invalid_json``), or None for a
    blank line. ``first``: strip a UTF-8 byte order mark. Decoding is ``json.loads``'s (JSON whitespace around
    one value), without its per-call overhead."""
    if first:
        raw = raw.removeprefix(_BOM)
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RecordError("invalid_utf8", loc, f"not valid UTF-8 at byte {e.start} of the line; "
                                                "re-encode the file as UTF-8")
    if not line.strip(_BLANK):  # ASCII whitespace only, as bytes.isspace: a line of U+00A0 is not blank
        return None
    try:
        if line.startswith("\ufeff"):  # as json.loads (a byte order mark inside the file)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", line, 0)
        rec, end = _JSON.raw_decode(line, _JSON_SPACE(line, 0).end())
        end = _JSON_SPACE(line, end).end()
        if end != len(line):
            raise json.JSONDecodeError("Extra data", line, end)
        return rec
    except json.JSONDecodeError as e:
        return RecordError("invalid_json", loc, f"not valid JSON ({e.msg} at column {e.colno}); a JSONL "
                                                "file holds one JSON object per line")
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, nesting deeper than Python's stack
        return RecordError("invalid_json", loc, f"JSON this reader cannot hold ({type(e).__name__}: "
                                                f"{str(e)[:120]})")


def is_json_array(path: Path) -> bool:
    """True for a JSON array file, False for JSONL (``.jsonl``/``.ndjson``, or a first character other than ``[``)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return path.suffix.lower() not in JSONL_SUFFIXES and head.startswith(b"[")


def _iter_json_records(path: Path):
    if is_json_array(path):
        # a JSON array: decoding errors become lone surrogates, reported per record below
        text = path.read_bytes().decode("utf-8", "surrogateescape").lstrip("\ufeff")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from e
        except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, nesting too deep
            raise DataFormatError(f"{path}: JSON this reader cannot hold ({type(e).__name__}: {str(e)[:120]}); "
                                  "fix the file") from e
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: a JSON file must hold an array of records, found {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path}: record {i}", rec
        return
    for loc, raw, first in iter_jsonl_lines(path):
        rec = decode_jsonl_line(raw, loc, first)
        if rec is not None:
            yield loc, rec


@dataclass
class LineBlock:
    """The undecoded lines of one chunk of a JSONL file: ``lines[i]`` is line ``first_line + i`` of ``path``.
    Blank lines are kept (so line numbers stay exact) and skipped by :meth:`items`, in the worker: the reading
    process only splits the file into lines."""

    path: str
    first_line: int
    lines: list

    def items(self) -> list:
        """``(location, (raw line, is first line), "raw")`` for each non-blank line (the items of :func:`itune.data.pipeline.iter_chunks`)."""
        return [(f"{self.path}:{n}", (raw, n == 1), "raw")
                for n, raw in enumerate(self.lines, self.first_line)
                if not (raw.isspace() or n == 1 and _blank_first_line(raw))]


def jsonl_blocks(path: Path, size: int, cap: int | None):
    """:class:`LineBlock` of ``size`` non-blank lines each (the last may hold fewer), at most ``cap`` non-blank
    lines in all."""
    left = cap  # None: no limit
    with open(path, "rb") as f:
        lineno = 1
        while left is None or left > 0:
            want = size if left is None else min(size, left)
            lines, got = [], 0
            for raw in f:
                lines.append(raw)
                if not (raw.isspace() or lineno == 1 and len(lines) == 1 and _blank_first_line(raw)):
                    got += 1
                    if got == want:
                        break
            if got:
                yield LineBlock(str(path), lineno, lines)
            if got < want:  # end of the file
                return
            lineno += len(lines)
            if left is not None:
                left -= got


def iter_jsonl_lines(path: Path):
    """Yields ``(location, raw line bytes, is first line)`` for every non-blank line of a JSONL file, undecoded
    (decoding is left to :func:`decode_jsonl_line`, e.g. in a worker process)."""
    for block in jsonl_blocks(path, 1024, None):
        for loc, (raw, first), _ in block.items():
            yield loc, raw, first


def _arrow_row(batch, j: int, loc: str):
    """Row ``j`` of an Arrow record batch as a dict, or a :class:`RecordError` when a string in it is not UTF-8."""
    try:
        return batch.slice(j, 1).to_pylist()[0]
    except UnicodeDecodeError as e:
        return RecordError("invalid_utf8", loc, f"a string field is not valid UTF-8 ({e.reason} at byte {e.start}); "
                                                "re-encode the file as UTF-8")


def _drop_nulls(v):
    """An Arrow / Parquet record without the null values its schema adds: a struct column holds every key any
    record has, so a record's missing keys (a tool schema's unset ``description``, a turn's absent ``tool_calls``)
    come back as None; they are dropped, recursively, as if absent."""
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_nulls(x) for x in v]
    return v


def _iter_arrow_records(path: Path):
    import pyarrow as pa

    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            batches = pq.ParquetFile(str(path)).iter_batches(batch_size=1024)
        else:
            src = pa.memory_map(str(path), "r")
            try:
                reader = pa.ipc.open_file(src)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                src.seek(0)
                batches = iter(pa.ipc.open_stream(src))
        i = 0
        for batch in batches:
            try:
                recs = batch.to_pylist()
            except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8: find the rows
                recs = [_arrow_row(batch, j, f"{path}: record {i + j}") for j in range(batch.num_rows)]
            for rec in recs:
                yield f"{path}: record {i}", _drop_nulls(rec)
                i += 1
    except (OSError, pa.ArrowException) as e:
        raise DataFormatError(f"{path}: cannot read as {'Parquet' if suffix in PARQUET_SUFFIXES else 'Arrow IPC'} "
                              f"({e})") from e


def iter_records(path: str | Path):
    """Yields ``(location, record)`` for every record of a JSON array, JSONL, Parquet or Arrow (IPC file or
    stream) file; ``record`` is a :class:`RecordError` for a line that is not valid UTF-8 or JSON.

    Files ending in ``.jsonl``/``.ndjson`` are JSONL; other JSON files are an array when their first character is
    ``[``, else JSONL. Blank JSONL lines are not records.

    Raises:
        DataFormatError: the file is missing or unreadable as a whole.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: input file not found")
    if path.suffix.lower() in PARQUET_SUFFIXES + ARROW_SUFFIXES:
        yield from _iter_arrow_records(path)
    else:
        yield from _iter_json_records(path)


class _Rec:
    """Field access on one record through the field mapping, raising :class:`RecordError`; remembers which keys
    were read (``used`` on the record, ``turn_used`` inside turns or instances) so the others can be reported."""

    __slots__ = ("rec", "loc", "fields", "used", "turn_used", "turn_keys")

    def __init__(self, rec, loc: str, fields: dict[str, str]):
        self.rec, self.loc, self.fields = rec, loc, fields
        self.used: set = set()
        self.turn_used: set = set()
        self.turn_keys: set = set()

    def err(self, reason: str, detail: str) -> RecordError:
        return RecordError(reason, self.loc, detail)

    def key(self, name: str, obj: dict | None = None) -> str:
        """The key of canonical field ``name`` in ``obj``: the ``--field`` mapping, else ``name``, else (when
        ``name`` is absent from ``obj``) the first of its :data:`FIELD_ALIASES` present."""
        k = self.fields.get(name)
        if k is not None:
            return k
        if obj is not None and name not in obj:
            for a in FIELD_ALIASES.get(name, ()):
                if a in obj:
                    return a
        return name

    def _label(self, name: str, obj: dict | None = None) -> str:
        k = self.key(name, obj)
        return repr(k) if k == name else f"{k!r} (mapped to {name!r})"

    def get(self, obj: dict, name: str):
        """The raw value of field ``name`` in ``obj`` (None when absent), marking the key read."""
        k = self.key(name, obj)
        (self.used if obj is self.rec else self.turn_used).add(k)
        return obj.get(k)

    def text(self, obj: dict, name: str, required: bool = True, default: str = "", where: str = "") -> str:
        v = self.get(obj, name)
        if v is None:  # absent, or JSON null
            if required:
                raise self.err("missing_field", f"missing field {self._label(name, obj)}{where}; "
                                                f"keys present: {sorted(obj)}")
            return default
        return self.check_text(v, self._label(name, obj), where)

    def check_text(self, v, label: str, where: str = "") -> str:
        if not isinstance(v, str):
            raise self.err("wrong_type", f"field {label}{where} must be a string, found {type(v).__name__} "
                                         f"{_short(v)}")
        if not utf8_encodable(v):
            raise self.err("invalid_utf8", f"field {label}{where} is not valid UTF-8 (undecodable bytes or a lone "
                                           "surrogate escape)")
        return v

    def unused(self, list_key: str | None = None) -> tuple:
        """Record keys not read, then ``LIST[].KEY`` for keys inside turns / instances not read."""
        out = [k for k, v in self.rec.items() if k not in self.used and v is not None]  # null: as if absent
        if list_key is not None:
            out += [f"{list_key}[].{k}" for k in sorted(self.turn_keys - self.turn_used)]
        return tuple(out)


def _short(v, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


def _content_text(r: _Rec, turn: dict, name: str, where: str, role: str, required: bool = True) -> str:
    """A turn's text; OpenAI-style content part lists ``[{"type": "text", "text": ...}]`` are joined. A tool turn's
    object or list content (a tool's JSON result) is written as JSON."""
    k = r.key(name, turn)
    v = turn.get(k)
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in v):
        turn = {k: "".join(p["text"] for p in v)}
    elif role == "tool" and isinstance(v, (dict, list)):
        turn = {k: json.dumps(v, ensure_ascii=False)}
    return r.text(turn, name, required=required, where=where)


def _json_object(r: _Rec, v, what: str, reason: str):
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            raise r.err(reason, f"{what} is a string but not valid JSON ({e}); write it as a JSON object") from None
    return v


def _tool_call(r: _Rec, c, where: str) -> dict:
    """One tool call as ``{"type": "function", "function": {"name", "arguments": dict}}`` (+ ``"id"``).

    Accepted: OpenAI's ``{"id", "type": "function", "function": {"name", "arguments": "<JSON text>"}}``, the flat
    ``{"name", "arguments"}`` of Hugging Face templates and ShareGPT ``function_call`` turns (``parameters`` for
    ``arguments`` as in Llama 3.1); arguments given as JSON text are parsed (templates write them with ``tojson``).
    """
    c = _json_object(r, c, f"tool call{where}", "bad_tool_call")
    if not isinstance(c, dict):
        raise r.err("bad_tool_call", f"tool call{where} must be an object with 'name' and 'arguments', found "
                                     f"{type(c).__name__} {_short(c)}")
    fn = c.get("function", c)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise r.err("bad_tool_call", f"tool call{where} has no function name (expected {{'function': {{'name': ..., "
                                     f"'arguments': {{...}}}}}} or {{'name': ..., 'arguments': {{...}}}}); found "
                                     f"{_short(c)}")
    args = fn.get("arguments", fn.get("parameters", {}))
    args = _json_object(r, args, f"the arguments of tool call{where}", "bad_tool_call")
    if not isinstance(args, dict):
        raise r.err("bad_tool_call", f"the arguments of tool call{where} must be a JSON object, found "
                                     f"{type(args).__name__} {_short(args)}")
    for text in (fn["name"], json.dumps(args, ensure_ascii=False)):
        r.check_text(text, f"tool call{where}")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(c.get("id"), str) and c["id"]:
        out["id"] = c["id"]
    return out


def _tool_calls(r: _Rec, turn: dict, where: str) -> tuple | None:
    calls = []
    v = turn.get("tool_calls")
    if v is not None:
        r.turn_used.add("tool_calls")
        if not isinstance(v, list):
            raise r.err("bad_tool_call", f"'tool_calls'{where} must be a list, found {type(v).__name__} {_short(v)}")
        calls += [_tool_call(r, c, f"{where}.tool_calls[{j}]") for j, c in enumerate(v)]
    if turn.get("function_call") is not None:  # OpenAI's earlier single-call field
        r.turn_used.add("function_call")
        calls.append(_tool_call(r, turn["function_call"], f"{where}.function_call"))
    return tuple(calls) or None


def _tools(r: _Rec) -> list | None:
    """Record-level ``tools`` (a list, or its JSON text as LLaMA-Factory writes it), each as
    ``{"type": "function", "function": {...}}`` (a bare function schema is wrapped)."""
    v = r.get(r.rec, "tools")
    if v is None or v == "" or v == []:
        return None
    label = r._label("tools", r.rec)
    v = _json_object(r, v, f"field {label}", "bad_tools")
    if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
        raise r.err("bad_tools", f"field {label} must be a list of tool schemas (objects), found {_short(v)}")
    out = []
    for i, t in enumerate(v):
        fn = t.get("function") if isinstance(t.get("function"), dict) else t
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise r.err("bad_tools", f"tool {i} of field {label} has no 'name': {_short(t)}")
        r.check_text(json.dumps(t, ensure_ascii=False), f"{label}[{i}]")
        out.append(t if fn is not t else {"type": "function", "function": t})
    return out


def _turn_weight(r: _Rec, turn: dict, role: str, where: str) -> int | None:
    """0 / 1 from :data:`TURN_WEIGHT_KEYS`, None when none is given."""
    w, wkey = None, None
    for key in TURN_WEIGHT_KEYS:
        v = turn.get(key)
        if v is None:
            continue
        r.turn_used.add(key)
        if isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1)):
            v = int(v)
        else:
            raise r.err("wrong_type", f"{key!r}{where} must be 0 or 1 (or false / true), found {_short(v)}")
        if w is not None and v != w:
            raise r.err("wrong_type", f"{wkey!r} and {key!r}{where} disagree ({w} and {v}); give one")
        w, wkey = v, key
    if w == 1 and role != "assistant":
        raise r.err("untrainable_turn", f"{wkey!r}{where} asks to train a {role} turn; only assistant turns are "
                                        f"trained: remove the key or set it to 0")
    return w if role == "assistant" else None


def _reasoning(r: _Rec, turn: dict, where: str) -> str | None:
    for key in REASONING_KEYS:
        v = turn.get(key)
        if v is not None:
            r.turn_used.add(key)
            v = r.check_text(v, repr(key), where)
            return v if v.strip() else None
    return None


def _conversation(r: _Rec, turns, list_name: str, role_key: str, text_key: str,
                  alt_keys: tuple[str, str] | None = None) -> tuple[list[Message], int]:
    """The turns as messages, and the number of turns dropped after the last assistant turn."""
    list_key = r.key(list_name)
    if not isinstance(turns, list):
        raise r.err("wrong_type", f"field {r._label(list_name)} must be a list of turns, "
                                  f"found {type(turns).__name__} {_short(turns)}")
    messages = []
    for j, turn in enumerate(turns):
        where = f" in {list_key}[{j}]"
        if not isinstance(turn, dict):
            raise r.err("wrong_type", f"turn{where} must be an object, found {type(turn).__name__} {_short(turn)}")
        r.turn_keys.update(k for k, v in turn.items() if v is not None)
        rk, tk = role_key, text_key
        if alt_keys and r.key(role_key) not in turn and r.key(alt_keys[0]) in turn:
            rk, tk = alt_keys
        speaker = r.text(turn, rk, where=where)
        s = speaker.strip().lower()
        calls = None
        if s == FUNCTION_CALL_SPEAKER:  # ShareGPT: the value is the call (or a list of calls) as JSON text
            role = "assistant"
            v = _json_object(r, r.text(turn, tk, where=where), f"the {FUNCTION_CALL_SPEAKER} turn{where}",
                             "bad_tool_call")
            calls = tuple(_tool_call(r, c, f"{where}[{i}]") for i, c in enumerate(v)) if isinstance(v, list) \
                else (_tool_call(r, v, where),)
            content = ""
        else:
            role = ROLE_ALIASES.get(s)
            if role is None:
                raise r.err("unknown_role", f"unknown role {speaker!r}{where}; accepted: "
                                            f"{', '.join(sorted(ROLE_ALIASES))}, {FUNCTION_CALL_SPEAKER}")
            if role == "assistant":
                calls = _tool_calls(r, turn, where)
            if role == "assistant" and calls is None and r.key(tk, turn) in turn and turn[r.key(tk, turn)] is None:
                raise r.err("missing_field", f"content is null{where}: an assistant turn needs text or tool_calls")
            content = _content_text(r, turn, tk, where, role, required=calls is None)
        weight = _turn_weight(r, turn, role, where)
        reasoning = _reasoning(r, turn, where) if role == "assistant" else None
        if role == "assistant" and not content.strip() and not calls and not reasoning:
            raise r.err("empty_assistant", f"empty assistant turn{where}: nothing to train on")
        tool_call_id = name = None
        if role == "tool":
            tool_call_id = turn.get("tool_call_id")
            name = turn.get("name")
            for key, v in (("tool_call_id", tool_call_id), ("name", name)):
                if v is not None:
                    r.turn_used.add(key)
                    r.check_text(v, repr(key), where)
        messages.append(Message(role, content, calls, tool_call_id, name, weight, reasoning))
    _check_tool_pairs(r, messages, list_key)
    roles = [m.role for m in messages]
    dropped = 0
    while messages and messages[-1].role != "assistant":
        messages.pop()  # trailing turns have no response to train on: counted per source
        dropped += 1
    if not messages:
        raise r.err("no_assistant_turn", f"no assistant turn in {list_key} (roles: {roles})")
    return messages, dropped


def _check_tool_pairs(r: _Rec, messages: list[Message], list_key: str) -> None:
    """A tool turn answers a call made before it: an assistant turn with tool calls precedes it (after the last
    user turn), and its ``tool_call_id``, when given, names one of the calls made so far and not yet answered.

    Raises:
        RecordError: ``bad_tool_call``, naming the turn.
    """
    open_ids: list = []
    calls_pending = 0
    for j, m in enumerate(messages):
        if m.role == "user":
            calls_pending, open_ids = 0, []
        elif m.role == "assistant" and m.tool_calls:
            calls_pending += len(m.tool_calls)
            open_ids += [c["id"] for c in m.tool_calls if "id" in c]
        elif m.role == "tool":
            where = f" in {list_key}[{j}]"
            if calls_pending == 0:
                raise r.err("bad_tool_call", f"tool result{where} answers no tool call (no assistant turn with "
                                             "tool_calls before it, or more results than calls)")
            if m.tool_call_id is not None and open_ids:
                if m.tool_call_id not in open_ids:
                    raise r.err("bad_tool_call", f"tool result{where} answers tool_call_id {m.tool_call_id!r}, "
                                                 f"which no open call has (open: {open_ids})")
                open_ids.remove(m.tool_call_id)
            calls_pending -= 1


def _system(r: _Rec) -> list[Message]:
    s = r.text(r.rec, "system", required=False)
    return [Message("system", s)] if s.strip() else []


@functools.lru_cache(maxsize=256)
def _file_name(source: str) -> str:
    return Path(source).name


def _record_id(r: _Rec, source: str, loc: str) -> str:
    rid = r.get(r.rec, "id")
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid):
        eid = str(rid)
        if not utf8_encodable(eid):
            raise r.err("invalid_utf8", f"field {r._label('id')} is not valid UTF-8 text (a lone surrogate)")
        return eid
    return f"{_file_name(source)}:{loc.rsplit(':', 1)[-1].strip().replace('record ', '#')}"


def _task_name(r: _Rec, task_field: str | None, default: str, nested: bool = False) -> str:
    """``task_field``'s value; for nested formats without one, the record's ``name``, else its ``id``, else
    ``default``."""
    if task_field is None:
        if not nested:
            return default
        for key in ("name", "id"):
            v = r.get(r.rec, key)
            if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
                return r.check_text(str(v).strip(), repr(r.key(key)))
        return default
    r.used.add(task_field)
    value = r.rec.get(task_field)
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise r.err("missing_task", f"field {task_field!r} (the task name, --task-field) is missing or empty "
                                    f"(found {_short(value)}; keys present: {sorted(r.rec)}); if no record has "
                                    "it, give --task-field the field that names each record's task")
    return r.check_text(str(value).strip(), f"{task_field!r} (the task name)")


def _strict(r: _Rec, fmt: str, unused: tuple) -> None:
    if unused:
        raise r.err("unused_key", f"keys the {fmt} format does not read: {', '.join(unused)} (--strict-keys); "
                                  "map one with --field NAME=KEY, choose another --format, or drop --strict-keys")


def parse_record(rec, fmt: str, loc: str, name: str, source: str, fields: dict[str, str] | None = None,
                 task_field: str | None = None, strict_keys: bool = False) -> Example:
    """Turns one record of a one-example format (``alpaca``, ``prompt_completion``, ``messages``, ``sharegpt``)
    into an :class:`Example` (:func:`parse_records` reads every format).

    - ``alpaca``: ``instruction``, optional ``input`` (``""`` and ``"<noinput>"`` mean none; Dolly's ``context``
      is read when there is no ``input``), ``output`` (or Dolly's ``response``); the user message is
      ``instruction`` + ``"\\n\\n"`` + ``input``; both parts are kept in ``Example.extra`` for the ``alpaca``
      template.
    - ``prompt_completion``: ``prompt`` (user), ``completion`` (assistant).
    - ``messages``: ``[{"role", "content"}, ...]`` (OpenAI chat), roles system/user/assistant/tool or an alias;
      assistant ``tool_calls`` (content may then be null), ``tool`` turns with ``tool_call_id`` / ``name``,
      per-turn ``weight`` 0/1 (:data:`TURN_WEIGHT_KEYS`) and reasoning (:data:`REASONING_KEYS`).
    - ``sharegpt``: ``[{"from", "value"}, ...]``, speakers human/gpt/system/observation or an alias
      (:data:`ROLE_ALIASES`); a ``function_call`` turn's value is the call as JSON.

    ``system`` (a top-level string) is prepended as a system message; ``tools`` (a list or its JSON text) is kept in
    ``Example.tools``. Turns after the last assistant turn are dropped and counted (``Example.dropped_turns``). The
    example id is the record's ``id`` when present, else ``<file name>:<line or index>``. Keys not read are listed
    in ``Example.unused_keys`` (with ``strict_keys``, a RecordError ``unused_key``).

    Raises:
        RecordError: with its reason (see :class:`RecordError`) and location.
    """
    fields = fields or {}
    r = _Rec(rec, loc, fields)
    if not isinstance(rec, dict):
        raise r.err("wrong_type", f"a record must be a JSON object, found {type(rec).__name__} {_short(rec)}")
    extra: dict = {}
    tools, dropped, list_key = None, 0, None
    if fmt == "alpaca":
        instruction = r.text(rec, "instruction")
        inp = r.text(rec, "input", required=False)
        output = r.text(rec, "output")
        if not instruction.strip():
            raise r.err("empty_instruction", f"empty {r._label('instruction')}")
        if not output.strip():
            raise r.err("empty_assistant", f"empty {r._label('output', rec)}: nothing to train on")
        instruction, inp = instruction.strip(), inp.strip()
        if inp.lower() in NO_INPUT:
            inp = ""
        extra = {"instruction": instruction, "input": inp}
        user = instruction + ("\n\n" + inp if inp else "")
        messages = _system(r) + [Message("user", user), Message("assistant", output)]
    elif fmt == "prompt_completion":
        prompt = r.text(rec, "prompt")
        completion = r.text(rec, "completion")
        if not completion.strip():
            raise r.err("empty_assistant", f"empty {r._label('completion')}: nothing to train on")
        messages = _system(r) + [Message("user", prompt), Message("assistant", completion)]
    elif fmt in ("messages", "sharegpt"):
        list_name = "messages" if fmt == "messages" else "conversations"
        list_key = r.key(list_name)
        if list_key not in rec:
            raise r.err("missing_field", f"missing field {r._label(list_name)}; keys present: {sorted(rec)}")
        r.used.add(list_key)
        messages, dropped = _conversation(r, rec[list_key], list_name, *(
            ("role", "content") if fmt == "messages" else ("from", "value")),
            alt_keys=None if fmt == "messages" else ("role", "content"))
        if messages[0].role != "system":
            messages = _system(r) + messages
        tools = _tools(r)
    else:
        raise DataFormatError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    eid = _record_id(r, source, loc)
    last = messages[-1].content  # every format ends with the assistant turn (trailing turns are dropped)
    name = _task_name(r, task_field, name)
    unused = r.unused(list_key)
    if strict_keys:
        _strict(r, fmt, unused)
    return Example(id=eid, messages=messages, task=name, references=[last], source=source, extra=extra, tools=tools,
                   unused_keys=unused, dropped_turns=dropped)


def _instance_outputs(r: _Rec, inst: dict, where: str) -> list[str]:
    outputs = r.get(inst, "output")
    if isinstance(outputs, str):
        outputs = [outputs]
    if outputs is None:
        raise r.err("missing_field", f"missing field {r._label('output', inst)}{where}; keys present: "
                                     f"{sorted(inst)}")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
        raise r.err("wrong_type", f"field {r._label('output', inst)}{where} must be a string or a non-empty list of "
                                  f"strings, found {_short(outputs)}")
    for o in outputs:
        r.check_text(o, r._label("output", inst), where)
    if not outputs[0].strip():
        raise r.err("empty_assistant", f"empty {r._label('output', inst)}{where}: nothing to train on")
    return outputs


def parse_records(rec, fmt: str, loc: str, name: str, source: str, fields: dict[str, str] | None = None,
                  task_field: str | None = None, strict_keys: bool = False, max_instances: int | None = None):
    """Every example of one record: ``(examples, over_cap)``, where ``examples`` lists ``(Example | None,
    RecordError | None, location)`` and ``over_cap`` counts instances beyond ``max_instances``.

    One-example formats give one item (:func:`parse_record`). Nested formats give one per instance, located as
    ``<record location> instances[J]``:

    - ``instances`` (Self-Instruct tasks and seed tasks): ``instruction`` + ``instances: [{"input", "output"}]``;
      each instance is an Alpaca example (``input`` may be empty or ``<noinput>``; ``output`` a string or a list
      whose first item is trained and all are references).
    - ``superni_jsonl``: one SuperNI task object per record (``Definition``, ``Positive Examples``, ``Instances``,
      ``Categories``), each instance rendered with the Tk-Instruct prompt (definition + 2 positive examples).

    The task of a nested record is ``task_field``'s value, else its ``name``, else its ``id``, else ``name`` (the
    source's). A record-level problem (no instance list, no instruction) rejects the record as one item; an
    instance's problem rejects that instance only.

    Raises:
        DataFormatError: an unknown format.
    """
    if fmt not in ("instances", "superni_jsonl"):
        try:
            return [(parse_record(rec, fmt, loc, name, source, fields, task_field, strict_keys), None, loc)], 0
        except RecordError as e:
            return [(None, e, loc)], 0
    fields = fields or {}
    r = _Rec(rec, loc, fields)
    try:
        if not isinstance(rec, dict):
            raise r.err("wrong_type", f"a record must be a JSON object, found {type(rec).__name__} {_short(rec)}")
        list_name = "instances" if fmt == "instances" else "Instances"
        list_key = r.key(list_name)
        instances = rec.get(list_key)
        r.used.add(list_key)
        if not isinstance(instances, list):
            raise r.err("missing_field" if instances is None else "wrong_type",
                        f"field {r._label(list_name)} must be a list of {{'input', 'output'}} objects, found "
                        f"{_short(instances)}; keys present: {sorted(rec)}")
        category = ""
        if fmt == "instances":
            instruction = r.text(rec, "instruction").strip()
            if not instruction:
                raise r.err("empty_instruction", f"empty {r._label('instruction')}")
            system = _system(r)
        else:
            definition = rec.get("Definition")
            r.used.update(("Definition", "Positive Examples", "Categories"))
            if isinstance(definition, list):
                definition = definition[0] if definition else ""
            definition = r.check_text(definition, "'Definition'")
            pos = rec.get("Positive Examples") or []
            if not isinstance(pos, list) or not all(isinstance(e, dict) and isinstance(e.get("input"), str)
                                                    and isinstance(e.get("output"), str) for e in pos[:2]):
                raise r.err("wrong_type", "'Positive Examples' must be a list of objects with string 'input' and "
                                          f"'output', found {_short(pos)}")
            pos = pos[:2]
            cats = rec.get("Categories") or []
            category = cats[0] if isinstance(cats, list) and cats and isinstance(cats[0], str) else ""
        task = _task_name(r, task_field, name, nested=True)
        base_id = _record_id(r, source, loc)
    except RecordError as e:
        return [(None, e, loc)], 0
    if not instances:
        return [(None, r.err("no_instances", f"field {r._label(list_name)} is an empty list: the task has no "
                                             "example"), loc)], 0
    take = instances if max_instances is None else instances[:max_instances]
    out = []
    for j, inst in enumerate(take):
        where = f" in {list_key}[{j}]"
        iloc = f"{loc} {list_key}[{j}]"
        try:
            r.loc = iloc
            if not isinstance(inst, dict):
                raise r.err("wrong_type", f"instance{where} must be an object, found {type(inst).__name__} "
                                          f"{_short(inst)}")
            r.turn_keys.update(k for k, v in inst.items() if v is not None)
            inp = r.text(inst, "input", required=False, where=where).strip()
            outputs = _instance_outputs(r, inst, where)
            iid = inst.get("id")
            r.turn_used.add("id")
            eid = str(iid) if isinstance(iid, (str, int)) and not isinstance(iid, bool) and str(iid) \
                else f"{base_id}#{j}"
            if fmt == "instances":
                inp = "" if inp.lower() in NO_INPUT else inp
                user = instruction + ("\n\n" + inp if inp else "")
                ex = Example(id=eid, messages=system + [Message("user", user), Message("assistant", outputs[0])],
                             task=task, references=outputs, source=source,
                             extra={"instruction": instruction, "input": inp})
            else:
                ex = Example(id=eid, messages=[Message("user", tk_instruct_prompt(definition, pos, inp)),
                                               Message("assistant", outputs[0])],
                             task=task, category=category, references=outputs, source=source)
            out.append((ex, None, iloc))
        except RecordError as e:
            out.append((None, e, iloc))
    r.loc = loc
    unused = r.unused(list_key)
    if strict_keys and unused:
        try:
            _strict(r, fmt, unused)
        except RecordError as e:
            return [(None, e, loc)], 0
    for ex, _, _ in out[:1]:
        if ex is not None:
            ex.unused_keys = unused  # reported once per record
    return out, len(instances) - len(take)


def read_source(path: str | Path, fmt: str = "auto", fields: dict[str, str] | None = None, name: str | None = None,
                task_field: str | None = None, strict_keys: bool = False, max_instances: int | None = None):
    """Yields ``(Example | None, RecordError | None, location)`` for every example of one instruction file (one per
    record; one per instance for nested formats, see :func:`parse_records`).

    Args:
        path: JSON array, JSONL, Parquet or Arrow file (see :func:`iter_records`).
        fmt: one of :data:`FORMATS`, or ``"auto"`` to detect it from the first record's keys.
        fields: canonical field name -> key in the file (see :data:`CANONICAL_FIELDS`).
        name: task name of the examples (default: the file's stem).
        task_field: read each example's task name from this record field instead.
        strict_keys: a record with a key the format does not read is a RecordError ``unused_key``.
        max_instances: nested formats: the first N instances of each record.

    Raises:
        DataFormatError: the file is unreadable as a whole, or ``auto`` cannot tell its format (the message shows
            the keys found and the accepted formats). Bad records are yielded, not raised.
    """
    path = Path(path)
    fields = fields or {}
    if fmt != "auto" and fmt not in FORMATS:
        raise DataFormatError(f"unknown format {fmt!r}; choose auto or one of {FORMATS}")
    name = name or path.stem
    for loc, rec in iter_records(path):
        if isinstance(rec, RecordError):
            yield None, rec, loc
            continue
        if fmt == "auto" and isinstance(rec, dict):
            fmt = detect_format(rec, path, fields)
        if fmt == "auto":  # records before the first object cannot be parsed: they are of the wrong type
            yield None, RecordError("wrong_type", loc, f"a record must be a JSON object, found "
                                                       f"{type(rec).__name__} {_short(rec)}"), loc
            continue
        yield from parse_records(rec, fmt, loc, name, str(path), fields, task_field, strict_keys, max_instances)[0]


def sniff_format(path: str | Path, fields: dict[str, str] | None = None) -> str:
    """The format ``auto`` detection picks for ``path`` (from its first JSON object).

    Raises:
        DataFormatError: as :func:`detect_format`, or the file holds no object at all.
    """
    first_error = None
    for _, rec in iter_records(path):
        if isinstance(rec, dict):
            return detect_format(rec, path, fields)
        if first_error is None and isinstance(rec, RecordError):
            first_error = rec
    if first_error is not None:
        raise DataFormatError(f"{path}: no record could be read; the first problem: {first_error}")
    raise DataFormatError(f"{path}: no record found (an empty file, or no line holds a JSON object)")
