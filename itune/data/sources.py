"""Readers that turn raw instruction data into one example type: a list of messages with roles.

Every reader yields :class:`Example` objects or, for a record that cannot be used, raises
:class:`~itune.errors.DataFormatError` naming the file and record (callers that asked to skip count it instead).
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from itune.errors import DataFormatError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn. ``role`` is one of ``system``, ``user``, ``assistant``."""

    role: str
    content: str


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
    """

    id: str
    messages: list[Message]
    task: str
    category: str = ""
    references: list[str] = field(default_factory=list)
    source: str = ""


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
        if not outputs or not outputs[0].strip():
            yield None, "empty_output", ref
            continue
        iid = inst.get("id") or f"{name}-{hashlib.md5(f'{name}:{i}'.encode()).hexdigest()}"
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
