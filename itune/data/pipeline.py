"""Preparation at scale: chunks -> worker processes -> slices on disk -> one merge.

Flow of ``itune-data prepare`` (:func:`itune.data.prepare.prepare_sources` for instruction files,
:func:`itune.data.prepare.prepare_superni` for SuperNI task files, one source per task)::

    records of every source, in order ──▶ chunks of CHUNK_RECORDS records (chunk k belongs to slice k % num_slices)
      ──▶ process_chunk (parse, render, tokenize: a pure function of the chunk, run by --num-proc workers)
      ──▶ slice directory  OUT/slices/slice-IIIII-of-NNNNN/ : tokens.bin (uint32: id | trained << 31),
                          examples.arrow (one row per example), rejects.jsonl, eval.jsonl, slice.json (last)
      ──▶ merge_slices (every slice, in chunk order = the single-process order): mixture (cap per task, weight per
          source), held-out split, shuffle examples, best-fit-decreasing over lengths, shuffle rows, shards written
          batch by batch, manifest.json last.

Why it is exact and bounded:

- Chunks are cut by record count per source, never by worker or slice count, and :func:`process_chunk` depends on
  the chunk alone, so the examples (and therefore the shards) are identical for any ``--num-proc`` and for any number
  of slices once merged.
- A slice keeps tokens on disk. At most ``2 * num_proc`` chunks are in flight. The merge holds per-example
  metadata (about 40 bytes per example: length, trainable tokens, offsets, ids as Arrow) and one batch of
  ``WRITE_BATCH_ROWS`` rows; tokens are read back with ``preadv`` (a memory map would be faster, but the kernel maps
  64 KiB around every page fault, so scattered reads map most of the file: RSS would grow with the input). Peak
  memory does not grow with the size of the text, only with the number of examples, at that small rate.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from itune import __version__
from itune.data import pack, shards
from itune.data.render import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, CHAT_HEADERS, IGNORE_INDEX, \
    render_flat, render_prompt
from itune.data.shards import arrow_to_numpy as _to_np, numpy_to_arrow as _np, strings_to_arrow as _str
from itune.data.sources import (ARROW_SUFFIXES, PARQUET_SUFFIXES, LineBlock, RecordError, decode_jsonl_line,
                                is_json_array, iter_records, jsonl_blocks, parse_records, read_superni_task)
from itune.data.stats import int_edges, int_histogram
from itune.data.tokenizer import TextTokenizer
from itune.errors import ConfigError, DataFormatError, ManifestError, WorkerError
from itune.fileio import atomic_write_text

#: Formats whose records hold many examples, each record a task (:func:`itune.data.sources.parse_records`).
NESTED_FORMATS = ("instances", "superni_jsonl")
#: Records per chunk (per source; the last chunk of a source may be shorter).
CHUNK_RECORDS = 1024
#: Rows built and written at a time by the merge.
WRITE_BATCH_ROWS = 256
#: Most examples one source may contribute to a split after its mixture weight; more is a mistaken weight (the
#: selection's indices alone would take 16 GiB), refused before any memory is spent on it.
MAX_SELECTED = 2**31 - 1
SLICES_DIR = "slices"
SLICE_DONE = "slice.json"

EXAMPLES_SCHEMA = pa.schema([
    ("chunk", pa.int32()), ("source", pa.int32()), ("length", pa.int32()), ("trainable", pa.int32()),
    ("offset", pa.int64()), ("task", pa.string()), ("id", pa.string()),
])


@dataclass
class SourceSpec:
    """One input of a preparation (resolved: format and template known).

    Attributes:
        path: the file. name: task name of its examples when no task field is given (default: file stem).
        format / template: see :data:`itune.data.sources.FORMATS`, :data:`itune.data.render.TEMPLATES`.
        weight: mixture weight: the number of its examples written is ``round(weight * n)`` (n after the per-task
            cap); 0.5 keeps a seeded half, 2.0 writes each example twice, 2.5 twice plus a seeded half.
        cap: read only the first ``cap`` records (SuperNI task files: ``max_instances_per_task``, and the official
            first 100 instances of a test task).

    Format ``superni`` is a SuperNI task file (``tasks/<task>.json``); its records are its instances, rendered
    with the Tk-Instruct prompt (:data:`PipelinePlan.superni` options).
    """

    path: str
    name: str
    format: str
    template: str
    weight: float = 1.0
    cap: int | None = None


@dataclass
class PipelinePlan:
    """Everything a slice and the merge must agree on (stored in every ``slice.json``; compared by fingerprint)."""

    sources: list
    source_sha256: list
    tokenizer: str
    tokenizer_info: dict
    seq_len: int
    fields: dict
    train_on: str
    overflow: str
    on_error: str
    max_bad_fraction: float | None
    task_field: str | None
    heldout_tasks: list
    max_eval_instances_per_task: int
    max_per_task: int | None
    seed: int
    pack: bool
    max_rows_per_shard: int
    template_fingerprint: str
    num_slices: int = 1
    chunk_records: int = CHUNK_RECORDS
    source_kind: dict = field(default_factory=dict)
    superni: dict | None = None
    extra_manifest: dict = field(default_factory=dict)
    strict_keys: bool = False
    max_instances_per_task: int | None = None
    chat_template_kwargs: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        d = asdict(self)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def template_fingerprint(templates: list[str], tok: TextTokenizer) -> str:
    """sha256 (16 hex) of the template names in use and the text that defines them (Alpaca prompts, chat
    headers, the tokenizer's chat template)."""
    h = hashlib.sha256(json.dumps(sorted(set(templates))).encode())
    h.update(json.dumps([ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, CHAT_HEADERS]).encode())
    if "tokenizer" in templates:
        h.update((tok.chat_template or "").encode())
        if tok.chat_template_kwargs:  # (absent from the hash when empty: fingerprints of older data stay valid)
            h.update(json.dumps(tok.chat_template_kwargs, sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Chunks and the worker function
# ---------------------------------------------------------------------------------------------------------------

def iter_chunks(plan: PipelinePlan):
    """Yields ``(chunk index, source index, items)``: ``plan.chunk_records`` records of one source (fewer at the
    end of a source). ``items`` is a :class:`LineBlock` for a JSONL file, else a list of ``(location, payload,
    kind)`` with kind ``rec`` (a parsed record or a RecordError) or ``example`` (SuperNI: ``(Example or None,
    reject reason or None)``)."""
    k = 0
    for si, spec in enumerate(plan.sources):
        path = Path(spec.path)
        if spec.format != "superni" and path.suffix.lower() not in PARQUET_SUFFIXES + ARROW_SUFFIXES \
                and not is_json_array(path):
            for block in jsonl_blocks(path, plan.chunk_records, spec.cap):
                yield k, si, block
                k += 1
            continue
        if spec.format == "superni":
            sn = plan.superni
            items = ((ref, (ex, reason), "example") for ex, reason, ref in
                     read_superni_task(path, sn["num_pos_examples"], sn["add_definition"], spec.cap))
        else:
            items = ((loc, rec, "rec") for loc, rec in iter_records(path))
            if spec.cap is not None:
                items = itertools.islice(items, spec.cap)
        buf = []
        for item in items:
            buf.append(item)
            if len(buf) == plan.chunk_records:
                yield k, si, buf
                k, buf = k + 1, []
        if buf:
            yield k, si, buf
            k += 1


_WORKER: dict = {}


def _init_worker(plan: PipelinePlan, parallel_tokenizer: bool, tok: TextTokenizer | None = None) -> None:
    """Sets up a worker (or the main process with ``parallel_tokenizer``). ``tok``: the plan's tokenizer when the
    caller has it loaded; a forked worker inherits it (nothing is pickled) instead of loading it again."""
    if not parallel_tokenizer:  # a worker process: one core each; Ctrl-C is handled by the main process alone,
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # which then terminates the pool (no half-dead workers)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.clear()
    tok = tok if tok is not None else TextTokenizer.load(plan.tokenizer)
    tok.chat_template_kwargs = dict(plan.chat_template_kwargs)
    _WORKER.update(plan=plan, tok=tok, heldout=set(plan.heldout_tasks))


def process_chunk(job) -> dict:
    """Parses, renders and tokenizes one chunk (in a worker). Pure: the result depends on the chunk only.

    The cyclic garbage collector is paused for the chunk (its objects are short-lived and acyclic; a collection
    at the end frees any cycle), which saves a few percent of the chunk's time.

    Returns:
        ``{"chunk", "source", "read", "bad", "rejected" / "rejected_test": Counter (by split), "rejects": [dict],
        "error": str | None,
        "tokens": uint32 [tokens] (:func:`pack_tokens`), "lengths", "trainable" (int32 [examples]), "tasks",
        "example_ids" ([examples]), "eval": [dict]}``. ``error`` is set (and the rest is partial) when
        ``on_error="raise"`` met a bad record.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _process_chunk(job)
    finally:
        if enabled:
            gc.enable()


def _process_chunk(job) -> dict:
    k, si, items = job
    if isinstance(items, LineBlock):
        items = items.items()
    plan, tok = _WORKER["plan"], _WORKER["tok"]
    spec = plan.sources[si]
    notes: Counter = Counter()  # reported per source: unused keys, dropped turns, assistant turns trained
    res = {"chunk": k, "source": si, "read": len(items), "bad": 0, "rejected": Counter(),
           "rejected_test": Counter(), "rejects": [], "notes": notes,
           "error": None, "eval": []}
    examples, locs = [], []

    heldout = _WORKER["heldout"]
    # a held-out SuperNI task file (a source that is one task)
    source_heldout = plan.task_field is None and spec.format not in NESTED_FORMATS and spec.name in heldout

    def reject(loc, ex, reason, message=None):
        # a reject counts with the split of its task when the task is known (parsed), else with its source's
        split = "test" if source_heldout or (ex is not None and ex.task in heldout) else "train"
        res["rejected" if split == "train" else "rejected_test"][reason] += 1
        res["rejects"].append({"split": split, "source": spec.path, "record": loc,
                               "id": ex.id if ex is not None else None, "reason": reason,
                               **({"message": message} if message else {}), "_chunk": k})

    for loc, payload, kind in items:
        if kind == "example":
            ex, reason = payload
            if ex is None:
                res["bad"] += 1
                reject(loc, None, reason)
            else:
                examples.append(ex)
                locs.append(loc)
            continue
        rec = decode_jsonl_line(payload[0], loc, payload[1]) if kind == "raw" else payload
        if isinstance(rec, RecordError):
            parsed, over_cap = [(None, rec, loc)], 0
        else:
            parsed, over_cap = parse_records(rec, spec.format, loc, spec.name, spec.path, plan.fields,
                                             plan.task_field, plan.strict_keys, plan.max_instances_per_task)
        res["read"] += len(parsed) - 1  # a nested record holds one example per instance
        if over_cap:
            notes["instances_over_cap"] += over_cap
        for ex, err, iloc in parsed:
            if err is not None:
                if plan.on_error == "raise":
                    res["error"] = f"{err} (pass --on-error skip to count and skip bad records)"
                    return res
                res["bad"] += 1
                reject(iloc, None, err.reason, err.detail)
                continue
            for key in ex.unused_keys:
                notes["unused_key:" + key] += 1
            if ex.dropped_turns:
                notes["trailing_turns_dropped"] += ex.dropped_turns
            examples.append(ex)
            locs.append(iloc)
    dropped_by_template: Counter = Counter()
    flat_ids, flat_labels, lengths, status = render_flat(examples, tok, plan.seq_len, spec.template, plan.overflow,
                                                         plan.train_on, dropped_by_template)
    for role, n in dropped_by_template.items():
        notes["template_dropped:" + role] += n
    tasks, eids = [], []
    if not heldout and status.count(None) == len(status):  # the common case: every example written
        tasks, eids = [ex.task for ex in examples], [ex.id for ex in examples]
        status = ()
    for ex, loc, st in zip(examples, locs, status):
        reason, err = st if st is not None else (None, None)
        if err is not None:  # the template cannot render this record: a bad record, like a reader error
            if plan.on_error == "raise":
                res["error"] = (f"{loc}: {err.detail} (template {spec.template!r}; pass --on-error skip to count "
                                "and skip bad records)")
                return res
            res["bad"] += 1
            reject(loc, ex, reason, err.detail)
            continue
        if ex.task in heldout:  # evaluation instances do not depend on fitting the training rows (seq_len)
            res["eval"].append({"id": ex.id, "task_id": ex.task, "task_category": ex.category or ex.task,
                                "track": "default", "references": ex.references,
                                "prompt_ids": render_prompt(ex, tok, spec.template), "_chunk": k, "_loc": loc})
        if reason is not None:
            reject(loc, ex, reason, _REJECT_HINTS.get(reason, "").format(seq_len=plan.seq_len,
                                                                          overflow=plan.overflow))
            continue
        tasks.append(ex.task)
        eids.append(ex.id)
    if not status:
        status = [None] * len(examples)
    for ex, st in zip(examples, status):  # assistant turns of the written examples, trained or not
        if st is None:
            turns = [m for m in ex.messages if m.role == "assistant"]
            trained = _trained_turns(turns, plan.train_on)
            notes["assistant_turns_trained"] += trained
            notes["assistant_turns_untrained"] += len(turns) - trained
    lengths = lengths.astype(np.int32)
    trained = flat_labels != IGNORE_INDEX
    tokens = pack_tokens(flat_ids, trained)
    ends = np.cumsum(lengths, dtype=np.int64)
    seen = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
    trainable = (seen[ends] - seen[ends - lengths]).astype(np.int32)  # trained tokens per example
    res.update(tokens=tokens, lengths=lengths, trainable=trainable, tasks=tasks, example_ids=eids)
    return res


#: Bit of a stored token that marks it trained (ids are < 2**31).
TRAINED_BIT = np.uint32(1 << 31)


#: the message of a reject the renderer decided (not a bad record)
_REJECT_HINTS = {
    "too_long": "longer than seq_len {seq_len} tokens and not kept by --overflow {overflow}; use a larger --seq-len, "
                "or --overflow truncate_response",
    "no_trainable_tokens": "no trained token left (assistant turns with weight 0, --train-on last on an untrained "
                           "last turn, or a response cut away by --overflow {overflow})",
}


def _trained_turns(turns: list, train_on: str) -> int:
    """How many of an example's assistant turns are trained (weight not 0; ``last``: only the last one)."""
    if train_on == "last":
        return int(bool(turns) and turns[-1].trained)
    return sum(1 for m in turns if m.trained)


def pack_tokens(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """Token ids and their trained flags as one uint32 per token: ``id | trained << 31`` (``tokens.bin``)."""
    return ids.astype(np.uint32) | (trained.astype(np.uint32) << np.uint32(31))


def unpack_tokens(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_tokens`: ``(input_ids int32, labels int32 with -100 where not trained)``."""
    ids = (tokens & ~TRAINED_BIT).astype(np.int32)
    return ids, np.where(tokens >= TRAINED_BIT, ids, np.int32(IGNORE_INDEX))


# ---------------------------------------------------------------------------------------------------------------
# One slice
# ---------------------------------------------------------------------------------------------------------------

def slice_dir(out_dir: Path, index: int, num_slices: int) -> Path:
    return Path(out_dir) / SLICES_DIR / f"slice-{index:05d}-of-{num_slices:05d}"


def _ordered_results(jobs, num_proc: int, plan: PipelinePlan, tok: TextTokenizer | None = None):
    """Results of :func:`process_chunk` in job order; at most ``2 * num_proc`` jobs in flight (bounded memory).
    ``tok``: the plan's tokenizer if already loaded (see :func:`_init_worker`)."""
    if num_proc <= 1:
        _init_worker(plan, True, tok)
        for job in jobs:
            yield process_chunk(job)
        return
    pool = ProcessPoolExecutor(num_proc, mp_context=mp.get_context("fork"), initializer=_init_worker,
                               initargs=(plan, False, tok))
    pending: collections.deque = collections.deque()
    try:
        for job in jobs:
            pending.append(pool.submit(process_chunk, job))
            if len(pending) >= 2 * num_proc:
                yield _result(pending.popleft(), "a tokenizing")
        while pending:
            yield _result(pending.popleft(), "a tokenizing")
    finally:  # on an error or Ctrl-C: chunks not started are dropped, the ones running end (workers ignore SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future, who: str):
    """A worker's result; a worker that died (a signal, e.g. the out-of-memory killer) is a :class:`WorkerError`
    instead of a pool waiting forever."""
    try:
        return future.result()
    except BrokenProcessPool as e:
        raise WorkerError(f"{who} process died before returning its result (killed by a signal, e.g. the "
                          "out-of-memory killer: check `dmesg`); lower --num-proc or give the job more memory, "
                          "then run the same command again") from e


def prepare_slice(plan: PipelinePlan, out_dir: Path, index: int, num_proc: int = 1,
                  tok: TextTokenizer | None = None) -> dict:
    """Processes the chunks of slice ``index`` (``chunk % plan.num_slices == index``) into its slice directory.
    ``tok``: ``plan.tokenizer`` already loaded by the caller, or None to load it.

    Returns:
        The slice summary (also ``slice.json``, written last).

    Raises:
        DataFormatError: with ``on_error="raise"``, the first bad record (file and line).
    """
    d = slice_dir(out_dir, index, plan.num_slices)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    t0 = time.time()
    jobs = (j for j in iter_chunks(plan) if j[0] % plan.num_slices == index)
    per_source = [{"read": 0, "written": 0, "bad": 0, "rejected": Counter(), "rejected_test": Counter(),
                   "notes": Counter()} for _ in plan.sources]
    chunks, offset = [], 0
    with open(d / "tokens.bin", "wb") as f_tok, \
            open(d / "rejects.jsonl", "w", encoding="utf-8") as f_rej, \
            open(d / "eval.jsonl", "w", encoding="utf-8") as f_eval, \
            pa.OSFile(str(d / "examples.arrow"), "wb") as sink, pa.ipc.new_stream(sink, EXAMPLES_SCHEMA) as ex_w:
        for res in _ordered_results(jobs, num_proc, plan, tok):
            if res["error"] is not None:
                raise DataFormatError(res["error"])
            s = per_source[res["source"]]
            s["read"] += res["read"]
            s["bad"] += res["bad"]
            s["rejected"].update(res["rejected"])
            s["rejected_test"].update(res["rejected_test"])
            s["notes"].update(res["notes"])
            n = len(res["lengths"])
            s["written"] += n
            f_tok.write(res["tokens"].tobytes())
            offsets = offset + np.concatenate([[0], np.cumsum(res["lengths"], dtype=np.int64)[:-1]]) if n else []
            offset += int(res["lengths"].sum())
            ex_w.write_batch(pa.record_batch([
                _np(np.full(n, res["chunk"], np.int32)), _np(np.full(n, res["source"], np.int32)),
                _np(res["lengths"]), _np(res["trainable"]), _np(np.asarray(offsets, np.int64)),
                _str(res["tasks"]), _str(res["example_ids"])], schema=EXAMPLES_SCHEMA))
            for r in res["rejects"]:
                f_rej.write(json.dumps(r, ensure_ascii=False) + "\n")
            for r in res["eval"]:
                f_eval.write(json.dumps(r, ensure_ascii=False) + "\n")
            chunks.append(res["chunk"])
    summary = {"plan": asdict(plan), "plan_fingerprint": plan.fingerprint(), "index": index,
               "num_slices": plan.num_slices, "chunks": chunks, "tokens": offset,
               "sources": [dict(s, rejected=dict(s["rejected"]), rejected_test=dict(s["rejected_test"]),
                                notes=dict(s["notes"])) for s in per_source],
               "created_by": f"itune {__version__}", "seconds": round(time.time() - t0, 3)}
    atomic_write_text(d / SLICE_DONE, json.dumps(summary) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------------------------

#: What every slice.json holds (written by :func:`prepare_slice`).
SLICE_KEYS = frozenset({"plan", "plan_fingerprint", "index", "num_slices", "chunks", "tokens", "sources"})


def _load_slices(out_dir: Path) -> tuple[PipelinePlan, list[dict]]:
    root = Path(out_dir) / SLICES_DIR
    done = sorted(root.glob(f"slice-*-of-*/{SLICE_DONE}")) if root.is_dir() else []
    if not done:
        raise ManifestError(f"{root}: no finished slice (slice-*/slice.json); run `itune-data prepare ... "
                            f"--num-shards N --shard-index I` for every I first")
    summaries = []
    for p in done:
        try:
            summary = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{p}: not valid JSON ({e}); prepare this slice again") from e
        missing = sorted(SLICE_KEYS - set(summary)) if isinstance(summary, dict) else sorted(SLICE_KEYS)
        if missing:
            raise ManifestError(f"{p}: not a slice summary (missing {missing}); prepare this slice again")
        summaries.append(summary)
    # the preparation most slices belong to; any other slice is named, never merged
    groups = Counter((s["plan_fingerprint"], s["num_slices"]) for s in summaries)
    (fp, n), _ = groups.most_common(1)[0]
    stale = [p.parent for p, s in zip(done, summaries) if (s["plan_fingerprint"], s["num_slices"]) != (fp, n)]
    if stale:
        raise ManifestError(
            f"{root} holds slices of different preparations: "
            + "; ".join(f"{d.name}: from another preparation" for d in stale)
            + f" (other options, inputs or --num-shards than the {groups[(fp, n)]} slice(s) of {n}); delete those "
            "directories, or prepare every slice again with the same command")
    have = {s["index"] for s in summaries}
    missing = sorted(set(range(n)) - have)
    if missing:
        raise ManifestError(f"{root}: {len(missing)} of {n} slices are missing or unfinished (--shard-index "
                            f"{', '.join(map(str, missing))}); run them (e.g. resubmit those array tasks) before "
                            f"merging")
    summaries.sort(key=lambda s: s["index"])
    for s in summaries:
        tokens = slice_dir(out_dir, s["index"], n) / "tokens.bin"
        size = tokens.stat().st_size if tokens.is_file() else 0
        if size != 4 * s["tokens"]:
            raise ManifestError(f"{tokens}: {4 * s['tokens'] - size} bytes short of the {s['tokens']} tokens its "
                                "slice.json records; prepare this slice again")
    p = dict(summaries[0]["plan"])
    p["sources"] = [SourceSpec(**x) for x in p["sources"]]
    return PipelinePlan(**p), summaries


def _select(plan: PipelinePlan, idx: np.ndarray, meta: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Mixture of the training examples ``idx`` (global order): per-task cap, then per-source weight.

    The cap keeps a seeded random subset of ``max_per_task`` examples of each larger task (tasks visited in name
    order); a source's weight w then takes ``round(w * n)`` of its n remaining examples (whole copies, then a seeded
    subset for the fraction). Kept examples stay in their global order.

    Returns:
        (selected example indices, repeats allowed; the realised mixture).
    """
    keep = idx
    capped: dict = {}
    codes, names = meta["task_code"], meta["task_names"]
    if plan.max_per_task is not None and len(idx):
        grouped = idx[np.argsort(codes[idx], kind="stable")]  # examples by task, global order within a task
        counts = np.bincount(codes[idx], minlength=len(names))
        starts = np.concatenate([[0], np.cumsum(counts)])
        kept = []
        for c in sorted(range(len(names)), key=lambda c: names[c]):
            members = grouped[starts[c]:starts[c + 1]]
            if len(members) > plan.max_per_task:
                capped[names[c]] = len(members) - plan.max_per_task
                members = rng.permutation(members)[:plan.max_per_task]
            kept.append(members)
        keep = np.sort(np.concatenate(kept))
    chosen = []
    mixture = {"max_per_task": plan.max_per_task, "capped_per_task": dict(sorted(capped.items())), "sources": []}
    for si, spec in enumerate(plan.sources):
        members = keep[meta["source"][keep] == si]
        n = len(members)
        target = int(round(spec.weight * n))
        if target > MAX_SELECTED:
            raise ConfigError(f"{spec.path}: weight {spec.weight:g} x {n} examples = {target} examples, more than "
                              f"{MAX_SELECTED} in one split; lower the weight")
        whole, rest = divmod(target, n) if n else (0, 0)
        sel = [members] * whole
        if rest:
            sel.append(np.sort(rng.permutation(members)[:rest]))
        sel = np.concatenate(sel) if sel else np.zeros(0, np.int64)
        chosen.append(sel)
        mixture["sources"].append({"name": spec.name, "weight": spec.weight, "available": n, "examples": len(sel),
                                   "trainable_tokens": int(meta["trainable"][sel].sum())})
    return (np.concatenate(chosen) if chosen else np.zeros(0, np.int64)), mixture


class _TokenReader:
    """Reads examples' stored tokens (:func:`pack_tokens`) back from their slices' ``tokens.bin`` with ``preadv``
    straight into the output array (nothing mapped, so memory stays bounded). At most ``max_open`` slices have an
    open file at a time (a job array may have thousands of slices)."""

    def __init__(self, dirs: list[Path], max_open: int = 128):
        self.dirs, self.max_open, self.fds = dirs, max_open, {}

    def _fd(self, sl: int) -> int:
        fd = self.fds.get(sl)
        if fd is None:
            if len(self.fds) >= self.max_open:
                self.close()
            fd = self.fds[sl] = os.open(self.dirs[sl] / "tokens.bin", os.O_RDONLY)
        return fd

    def gather(self, slices: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """uint32 ``[sum(lengths)]``: the stored tokens of examples ``k`` (``lengths[k]`` tokens from token
        ``offsets[k]`` of slice ``slices[k]``), concatenated in the given order (one ``preadv`` per example).

        Raises:
            ManifestError: a ``tokens.bin`` is shorter than an example's end (a damaged slice).
        """
        lengths = [int(n) for n in lengths]
        out = np.empty(sum(lengths), dtype=np.uint32)
        view = memoryview(out).cast("B")
        pos = 0
        for sl, off, n in zip(np.asarray(slices).tolist(), np.asarray(offsets).tolist(), lengths):
            got = os.preadv(self._fd(sl), [view[pos:pos + 4 * n]], 4 * off)
            if got != 4 * n:
                raise ManifestError(f"{self.dirs[sl] / 'tokens.bin'}: {4 * n - got} bytes short at token {off}; "
                                    "prepare this slice again")
            pos += 4 * n
        return out

    def read(self, sl: int, offset: int, length: int) -> np.ndarray:
        """uint32 ``[length]`` stored tokens from token ``offset`` of slice ``sl``."""
        return self.gather([sl], [offset], [length])

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _histogram(values: np.ndarray, hi: int, bins: int = 32) -> dict:
    """``{"edges", "counts"}`` over integer bins of ``[0, hi]`` (as ``itune-data stats``)."""
    edges = int_edges(hi, bins)
    return {"edges": edges, "counts": int_histogram(np.asarray(values, dtype=np.int64), edges)}


def _write_shard(job: dict) -> dict:
    """Writes one shard from a self-contained job (built by :func:`write_split_rows`, run in any process); returns
    its manifest entry.

    ``job``: ``path`` (the shard file), ``dirs`` (slice directories), ``seq_len``, ``pad_id``, ``vocab_size``
    (optional: a stored id at or above it is a damaged slice, a :class:`ManifestError`), ``per_row`` (int64
    [rows]: examples per row), and per example of the shard in row order ``length``, ``slice``, ``offset`` (int64
    arrays) and ``id`` (Arrow strings).
    """
    path, seq_len, pad_id, vocab_size = Path(job["path"]), job["seq_len"], job["pad_id"], job.get("vocab_size")
    per_row_all = job["per_row"]
    first = np.concatenate([[0], np.cumsum(per_row_all)])  # first example of each row
    reader = _TokenReader(job["dirs"])
    tmp = path.parent / f".{path.name}.tmp"
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, shards.SCHEMA) as writer:
            for b in range(0, len(per_row_all), WRITE_BATCH_ROWS):
                per_row = per_row_all[b:b + WRITE_BATCH_ROWS]
                r = len(per_row)
                e0, e1 = int(first[b]), int(first[b + r])
                lens = job["length"][e0:e1]
                stored = reader.gather(job["slice"][e0:e1], job["offset"][e0:e1], lens)
                ids, labs = unpack_tokens(stored)  # the batch's examples one after another, in row order
                if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
                    k = int(np.searchsorted(np.cumsum(lens), int(np.argmax(ids >= vocab_size)), side="right"))
                    bad = Path(job["dirs"][int(job["slice"][e0 + k])]) / "tokens.bin"
                    raise ManifestError(f"{bad}: token id {int(ids.max())} is outside the tokenizer's vocabulary of "
                                        f"{vocab_size}; the file is damaged: prepare this slice again")
                row_of = np.repeat(np.arange(r, dtype=np.int64), per_row)  # row of each example
                fill = np.bincount(row_of, weights=lens, minlength=r).astype(np.int64)  # tokens per row
                # a row holds its examples back to back from position 0, then padding: in row-major order the
                # filled positions take the concatenated tokens as they are
                filled = np.arange(seq_len, dtype=np.int64)[None, :] < fill[:, None]  # [r, seq_len]
                input_ids = np.full((r, seq_len), pad_id, dtype=np.int32)
                labels = np.full((r, seq_len), IGNORE_INDEX, dtype=np.int32)
                input_ids[filled], labels[filled] = ids, labs
                # positions restart at 0 for every example and for the padding tail: one run per example, then
                # one (possibly empty) run of padding per row, each counting from its start
                n_ex = len(lens)
                runs = np.empty(n_ex + r, dtype=np.int64)
                runs[np.arange(n_ex, dtype=np.int64) + row_of] = lens
                runs[np.cumsum(per_row) + np.arange(r, dtype=np.int64)] = seq_len - fill
                position_ids = (np.arange(r * seq_len, dtype=np.int64)
                                - np.repeat(np.cumsum(runs) - runs, runs)).astype(np.int32)
                fixed = _np(np.arange(0, (r + 1) * seq_len, seq_len, dtype=np.int32))
                counts = _np(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))
                cols = [pa.ListArray.from_arrays(fixed, _np(input_ids.reshape(-1))),
                        pa.ListArray.from_arrays(fixed, _np(labels.reshape(-1))),
                        pa.ListArray.from_arrays(fixed, _np(position_ids)),
                        pa.ListArray.from_arrays(counts, _np(lens.astype(np.int32))),
                        pa.ListArray.from_arrays(counts, job["id"].take(_np(np.arange(e0, e1))))]
                writer.write_batch(pa.record_batch(cols, schema=shards.SCHEMA))
    finally:
        reader.close()
    os.replace(tmp, path)
    return {"file": path.name, "rows": len(per_row_all), "bytes": path.stat().st_size,
            "sha256": shards.sha256_file(path)}


def write_split_rows(out_dir: Path, split: str, sel: np.ndarray, meta: dict, dirs: list[Path], seq_len: int,
                     pad_id: int, seed: int, packed: bool, max_rows_per_shard: int, pool=None,
                     procs: int = 1, vocab_size: int | None = None) -> dict:
    """Shuffles the selected examples, packs them, shuffles the rows, writes the shards; returns the split entry.

    Args:
        sel: indices into ``meta`` of the examples to write (repeats allowed), in their global order.
        meta: per example ``length``, ``trainable``, ``slice``, ``offset`` (arrays), ``task_code``, ``id``.
        dirs: the slice directories (``meta["slice"]`` indexes them; tokens are read from their ``tokens.bin``).
        pool, procs: a ``ProcessPoolExecutor`` of ``procs - 1`` processes that write shards too (shard s is
            written by this process when ``s % procs == 0``); the files are the same without it.
        vocab_size: the tokenizer's vocabulary size; a stored token id at or above it raises
            :class:`ManifestError` naming the slice's ``tokens.bin`` (damaged after preparation).

    Shuffle order is decided over examples before packing (``random.Random(seed)``) and over rows after it.
    Rows are built ``WRITE_BATCH_ROWS`` at a time. The rows are split evenly over ``ceil(rows /
    max_rows_per_shard)`` shards, so that no shard holds more than ``max_rows_per_shard`` rows.
    """
    rnd = random.Random(seed)
    order = list(range(len(sel)))
    rnd.shuffle(order)  # example order before packing
    ex = sel[np.asarray(order, dtype=np.int64)] if len(sel) else sel
    lengths = meta["length"][ex]
    rows = pack.best_fit_decreasing(lengths.tolist(), seq_len) if packed else [[i] for i in range(len(ex))]
    rnd.shuffle(rows)  # row order after packing; the trainer reshuffles per epoch
    n_rows = len(rows)
    num_shards = max(1, -(-n_rows // max_rows_per_shard))
    bounds = [n_rows * s // num_shards for s in range(num_shards + 1)]

    def job(s: int) -> dict:  # everything shard s needs, small enough to send to another process
        part = rows[bounds[s]:bounds[s + 1]]
        g = ex[np.fromiter(itertools.chain.from_iterable(part), dtype=np.int64)] if part else ex[:0]
        return {"path": str(out_dir / f"{split}-{s:05d}-of-{num_shards:05d}.arrow"), "dirs": dirs,
                "seq_len": seq_len, "pad_id": pad_id, "vocab_size": vocab_size,
                "per_row": np.fromiter(map(len, part), dtype=np.int64, count=len(part)),
                "length": meta["length"][g].astype(np.int64), "slice": meta["slice"][g].astype(np.int64),
                "offset": meta["offset"][g].astype(np.int64), "id": meta["id"].take(_np(g))}

    procs = 1 if pool is None else max(1, min(procs, num_shards))
    theirs = [pool.submit(_write_shard, job(s)) for s in range(num_shards) if s % procs] if procs > 1 else []
    mine = {s: _write_shard(job(s)) for s in range(0, num_shards, procs)}
    others = iter([_result(f, "a shard-writing") for f in theirs])
    shard_list = [mine[s] if s in mine else next(others) for s in range(num_shards)]
    tokens = int(lengths.sum())
    row_of = np.repeat(np.arange(n_rows), np.fromiter(map(len, rows), dtype=np.int64, count=n_rows))
    fills = np.bincount(row_of, weights=lengths[np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64,
                                                            count=len(row_of))],
                        minlength=n_rows).astype(np.int64)  # tokens per row
    return {
        "examples": int(len(ex)),
        "examples_per_task": _per_task(meta, ex),
        "trainable_tokens_per_task": _per_task(meta, ex, meta["trainable"]),
        "rows": n_rows,
        "tokens": tokens,
        "trainable_tokens": int(meta["trainable"][ex].sum()),
        "padding_tokens": n_rows * seq_len - tokens,
        "packing_efficiency": round(tokens / (n_rows * seq_len), 6) if n_rows else 0.0,
        "max_example_tokens": int(lengths.max()) if len(lengths) else 0,
        "length_histogram": _histogram(lengths.astype(np.int64), seq_len),
        "row_fill_histogram": _histogram(fills, seq_len),
        "shards": shard_list,
    }


def _per_task(meta: dict, ex: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """Examples (or the sum of ``weights``) per task name over the example indices ``ex``, sorted by name."""
    names = meta["task_names"]
    codes = meta["task_code"][ex]
    total = np.bincount(codes, weights=None if weights is None else weights[ex].astype(np.float64),
                        minlength=len(names))
    return {names[c]: int(total[c]) for c in sorted(np.flatnonzero(np.bincount(codes, minlength=len(names))),
                                                    key=lambda c: names[c])}


def merge_slices(out_dir: str | Path, keep_slices: bool = False, started: float | None = None,
                 num_proc: int = 1) -> dict:
    """Combines every slice of ``out_dir/slices`` into packed shards and ``manifest.json`` (written last).

    The examples are taken in chunk order, which is the order a single process reads them, so the output equals a
    one-slice preparation byte for byte. ``started`` (``time.time()``) is when the whole preparation began, for the
    manifest's ``seconds`` (default: the merge's own start). ``num_proc`` processes write the shards (the output
    is the same for any value).

    Raises:
        ManifestError: a slice is missing or unfinished, or slices disagree on options or inputs.
        DataFormatError: more bad records than ``max_bad_fraction``.
        ConfigError: a held-out task without any example.
    """
    t0 = time.time() if started is None else started
    out_dir = Path(out_dir)
    plan, summaries = _load_slices(out_dir)
    # shard writers, forked now (a first task starts them), before the examples' metadata is loaded, so that they
    # hold little memory
    pool = ProcessPoolExecutor(num_proc - 1, mp_context=mp.get_context("fork")) if num_proc > 1 else None
    try:
        if pool is not None:
            _result(pool.submit(os.getpid), "a shard-writing")
        return _merge(out_dir, plan, summaries, keep_slices, t0, pool, num_proc)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _merge(out_dir: Path, plan: PipelinePlan, summaries: list[dict], keep_slices: bool, t0: float, pool,
           num_proc: int) -> dict:
    from itune.data.prepare import clear_outputs

    clear_outputs(out_dir, slices=False)
    dirs = [slice_dir(out_dir, s["index"], plan.num_slices) for s in summaries]
    tables = []
    for sl, (d, summary) in enumerate(zip(dirs, summaries)):
        try:
            t = pa.ipc.open_stream(pa.memory_map(str(d / "examples.arrow"), "r")).read_all()
        except (OSError, pa.ArrowException) as e:
            raise ManifestError(f"{d / 'examples.arrow'}: unreadable ({e}); prepare this slice again") from e
        written = sum(x["written"] for x in summary["sources"])
        if t.schema != EXAMPLES_SCHEMA or t.num_rows != written:
            raise ManifestError(f"{d / 'examples.arrow'}: {t.num_rows} examples (or another schema), its slice.json "
                                f"records {written}; prepare this slice again")
        tables.append(t.append_column("slice", _np(np.full(t.num_rows, sl, np.int32))))
    table = pa.concat_tables(tables) if tables else EXAMPLES_SCHEMA.empty_table()
    order = np.argsort(_to_np(table["chunk"]), kind="stable")  # chunk order = single-process order
    table = table.take(_np(order))
    meta = {k: _to_np(table[k]) for k in ("source", "length", "trainable", "offset", "slice")}
    tasks = pc.dictionary_encode(table["task"].combine_chunks())
    meta["task_code"] = _to_np(tasks.indices).astype(np.int64)
    meta["task_names"] = tasks.dictionary.to_pylist()
    meta["id"] = table["id"].combine_chunks()  # Arrow strings, taken per batch of rows
    del table, tables, tasks
    # counts per source (read = written + rejected), rejects and eval candidates in chunk order
    sources = []
    read = bad = 0
    rejected: Counter = Counter()
    rejected_test: Counter = Counter()
    for si, spec in enumerate(plan.sources):
        s_read = sum(s["sources"][si]["read"] for s in summaries)
        if s_read == 0 and spec.format != "superni":
            raise DataFormatError(f"{spec.path}: no record found (an empty file?)")
        s_train, s_test = Counter(), Counter()
        for s in summaries:
            s_train.update(s["sources"][si]["rejected"])
            s_test.update(s["sources"][si]["rejected_test"])
        s_rej = s_train + s_test
        read += s_read
        bad += sum(s["sources"][si]["bad"] for s in summaries)
        rejected.update(s_train)  # by the split of the record's task (or of its source)
        rejected_test.update(s_test)
        notes: Counter = Counter()
        for s in summaries:
            notes.update(s["sources"][si].get("notes", {}))
        sources.append({"path": spec.path, "sha256": plan.source_sha256[si], "name": spec.name,
                        "format": spec.format, "template": spec.template, "weight": spec.weight,
                        "counts": {"read": s_read, "written": sum(s["sources"][si]["written"] for s in summaries),
                                   "rejected": {k: s_rej[k] for k in sorted(s_rej)}},
                        **source_notes(notes)})
    rejects = _merge_jsonl([d / "rejects.jsonl" for d in dirs])
    atomic_write_text(out_dir / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    if read and not any(src["counts"]["written"] for src in sources):
        raise DataFormatError(
            f"no example written: read {read} = written 0 + rejected {read}; reasons {dict(rejected + rejected_test)}"
            f" (every one is listed in {out_dir / 'rejects.jsonl'}); check --format, --field and --template")
    if plan.max_bad_fraction is not None and bad > plan.max_bad_fraction * read:
        raise DataFormatError(
            f"{bad} of {read} records ({bad / read:.2%}) are bad, above --max-bad-fraction {plan.max_bad_fraction}; "
            f"reasons {dict(rejected + rejected_test)}; every one is listed in {out_dir / 'rejects.jsonl'}")
    heldout = list(plan.heldout_tasks)
    names = meta["task_names"]
    is_test = np.isin(meta["task_code"], [c for c, t in enumerate(names) if t in set(heldout)])
    tasks_from_records = plan.task_field is not None or any(s.format in NESTED_FORMATS for s in plan.sources)
    if heldout and tasks_from_records:
        present = set(names)
        missing = [t for t in heldout if t not in present]
        if missing:
            raise ConfigError(f"held-out tasks {missing} have no example (tasks found via "
                              f"{f'--task-field {plan.task_field!r}' if plan.task_field else 'name / id'}: "
                              f"{sorted(present)[:20]})")
    rng = np.random.default_rng(plan.seed)
    train_idx = np.flatnonzero(~is_test)
    sel, mixture = _select(plan, train_idx, meta, rng)
    for src, mix in zip(sources, mixture["sources"]):
        src["mixture"] = {k: mix[k] for k in ("available", "examples", "trainable_tokens")}
    pad_id = plan.tokenizer_info.get("pad_id")
    if pad_id is None:
        pad_id = TextTokenizer.load(plan.tokenizer).pad_id
    splits = {}
    parts = [("train", sel)] + ([("test", np.flatnonzero(is_test))] if heldout else [])
    for split, idx in parts:
        info = write_split_rows(out_dir, split, idx, meta, dirs, plan.seq_len, pad_id, plan.seed, plan.pack,
                                plan.max_rows_per_shard, pool, num_proc, plan.tokenizer_info.get("vocab_size"))
        written = int((~is_test).sum()) if split == "train" else int(is_test.sum())
        rej = rejected if split == "train" else rejected_test
        if tasks_from_records:
            first = np.unique(meta["task_code"][idx], return_index=True)
            tasks = [names[c] for _, c in sorted(zip(first[1].tolist(), first[0].tolist()))]
        else:  # a source is a task: every source of the split, even one left without examples
            tasks = list(dict.fromkeys(s.name for s in plan.sources if (s.name in heldout) == (split == "test")))
        info = {"tasks": tasks,
                "counts": {"read": written + sum(rej.values()), "written": written,
                           "rejected": {k: rej[k] for k in sorted(rej)}}, **info}
        if split == "test":
            recs = _first_per_task(_merge_jsonl([d / "eval.jsonl" for d in dirs]),
                                   plan.max_eval_instances_per_task)
            dup = sorted(k for k, v in Counter(x["id"] for x in recs).items() if v > 1)
            if dup:
                where = [f"{x['id']!r} at {x['_loc']}" for x in recs if x["id"] in set(dup[:3])]
                raise ConfigError(f"held-out instances share ids ({len(dup)} ids in all; {'; '.join(where[:6])}); "
                                  "scores are matched by id, so give every record (every instance of a nested record) "
                                  "a unique 'id' field")
            for x in recs:
                del x["_loc"]
            atomic_write_text(out_dir / "test_eval.jsonl",
                              "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in recs))
            info.update(eval_file="test_eval.jsonl", eval_instances=len(recs),
                        eval_sha256=shards.sha256_file(out_dir / "test_eval.jsonl"))
        splits[split] = info
    templates = sorted({s.template for s in plan.sources})
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "created_by": f"itune {__version__}",
        "source": plan.source_kind,
        "source_files": {s["path"]: s["sha256"] for s in sources},
        "sources": sources,
        "mixture": mixture,
        "template": templates[0] if len(templates) == 1 else "per_source",
        **plan.extra_manifest,
        "template_fingerprint": plan.template_fingerprint,
        "chat_template_kwargs": plan.chat_template_kwargs,
        "tokenizer": plan.tokenizer_info,
        "packing": "best_fit_decreasing" if plan.pack else "none",
        "overflow": plan.overflow,
        "seq_len": plan.seq_len,
        "seed": plan.seed,
        "heldout_tasks": heldout,
        "preparation": {"slices": plan.num_slices, "chunk_records": plan.chunk_records,
                        "slice_seconds": [s.get("seconds") for s in summaries]},
        "splits": splits,
        "seconds": round(time.time() - t0, 3),
    }
    manifest = shards.write_manifest(out_dir, manifest)
    if not keep_slices:
        shutil.rmtree(out_dir / SLICES_DIR, ignore_errors=True)
    return manifest


def source_notes(notes: dict) -> dict:
    """What a source's examples held that was not trained or not rendered, for the manifest's ``sources``
    entries: ``unused_keys`` (key -> records holding it), ``dropped`` (``trailing_turns``: turns after the last
    assistant turn; ``template_ROLE``: messages the chat template left out; ``instances_over_cap``) and
    ``assistant_turns`` (``trained`` / ``untrained`` in the written examples). Empty parts are left out."""
    out: dict = {}
    unused = {k.split(":", 1)[1]: v for k, v in sorted(notes.items()) if k.startswith("unused_key:")}
    if unused:
        out["unused_keys"] = unused
    dropped = {("template_" + k.split(":", 1)[1] if k.startswith("template_dropped:") else
                k.replace("_dropped", "")): v for k, v in sorted(notes.items())
               if k.startswith("template_dropped:") or k in ("trailing_turns_dropped", "instances_over_cap")}
    if dropped:
        out["dropped"] = dropped
    if notes.get("assistant_turns_trained") is not None or notes.get("assistant_turns_untrained") is not None:
        out["assistant_turns"] = {"trained": notes.get("assistant_turns_trained", 0),
                                  "untrained": notes.get("assistant_turns_untrained", 0)}
    return out


def _merge_jsonl(paths: list[Path]) -> list[dict]:
    """Records of several slices' JSONL files in chunk order (their ``_chunk`` key, then removed)."""
    recs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            recs.extend(json.loads(line) for line in f)
    recs.sort(key=lambda r: r["_chunk"])  # stable: order within a chunk is kept
    for r in recs:
        del r["_chunk"]
    return recs


def _first_per_task(recs: list[dict], cap: int) -> list[dict]:
    per_task: Counter = Counter()
    out = []
    for r in recs:
        if per_task[r["task_id"]] < cap:
            per_task[r["task_id"]] += 1
            out.append(r)
    return out
