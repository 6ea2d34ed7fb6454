"""``itune-data prepare``: SuperNI task files -> rendered, masked, packed Arrow shards + manifest.

Counts reconcile for every split: ``read = written + sum(rejected.values())``. Rejected instances are also
written, with their reason, to ``rejects.jsonl``.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from itune import __version__
from itune.data import pack, shards
from itune.data.render import IGNORE_INDEX, render, render_prompt
from itune.data.sources import read_split_file, read_superni_task, superni_task_path
from itune.data.tokenizer import TextTokenizer
from itune.errors import ConfigError


@dataclass
class PrepareOptions:
    """Options of one preparation run.

    Attributes:
        superni_dir: directory with ``tasks/`` and ``splits/`` (the layout of allenai/natural-instructions).
        tokenizer: tokenizer directory (``tokenizer.json`` + config).
        out_dir: output directory (created; must not hold a manifest unless ``overwrite``).
        seq_len: tokens per packed row.
        train_split / test_split: split files (default ``splits/train_tasks.txt`` / ``splits/test_tasks.txt``;
            the upstream repo has them under ``splits/default/``).
        max_instances_per_task: cap on training instances per task (None = all).
        max_eval_instances_per_task: evaluated instances per test task (official protocol: first 100).
        num_pos_examples / add_definition: Tk-Instruct prompt options.
        overflow: over-long example policy, see :func:`itune.data.render.render`.
        seed: shuffle seed (rows are shuffled after packing).
        max_rows_per_shard: rows per Arrow file.
    """

    superni_dir: Path
    tokenizer: Path
    out_dir: Path
    seq_len: int = 1024
    train_split: Path | None = None
    test_split: Path | None = None
    max_instances_per_task: int | None = None
    max_eval_instances_per_task: int = 100
    num_pos_examples: int = 2
    add_definition: bool = True
    overflow: str = "truncate_prompt_left"
    seed: int = 0
    max_rows_per_shard: int = 4096
    overwrite: bool = False


def _split_file(opts: PrepareOptions, given: Path | None, name: str) -> Path:
    if given is not None:
        return Path(given)
    for cand in (opts.superni_dir / "splits" / name, opts.superni_dir / "splits" / "default" / name):
        if cand.is_file():
            return cand
    raise ConfigError(f"{opts.superni_dir}/splits/{name}: not found; pass the split file explicitly")


def _prepare_split(split, task_names, opts, tok, cap, rejects, eval_cap=None):
    read = 0
    rejected: Counter = Counter()
    rendered, examples, eval_records, files = [], [], [], {}
    tasks_dir = opts.superni_dir / "tasks"
    for name in task_names:
        path = superni_task_path(tasks_dir, name)
        files[str(path)] = shards.sha256_file(path)
        for ex, reason, ref in read_superni_task(path, opts.num_pos_examples, opts.add_definition, cap):
            read += 1
            if ex is not None:
                r, reason = render(ex, tok, opts.seq_len, overflow=opts.overflow)
            if reason is not None:
                rejected[reason] += 1
                rejects.append({"split": split, "record": ref, "id": ex.id if ex else None, "reason": reason})
                continue
            rendered.append(r)
            examples.append(ex)
    if eval_cap is not None:
        per_task: Counter = Counter()
        for ex in examples:
            if per_task[ex.task] < eval_cap:
                per_task[ex.task] += 1
                eval_records.append({"id": ex.id, "task_id": ex.task, "task_category": ex.category,
                                     "track": "default", "references": ex.references,
                                     "prompt_ids": render_prompt(ex, tok)})
    return read, rejected, rendered, examples, eval_records, files


def _pack_columns(rendered, examples, seq_len, pad_id, seed):
    lengths = [len(r.input_ids) for r in rendered]
    rows = pack.best_fit_decreasing(lengths, seq_len)
    random.Random(seed).shuffle(rows)  # row order after packing; the trainer reshuffles per epoch
    cols = {k: [] for k in shards.SCHEMA.names}
    for row in rows:
        ids, labels = [], []
        for i in row:
            ids.extend(rendered[i].input_ids)
            labels.extend(rendered[i].labels)
        pad = seq_len - len(ids)
        cols["input_ids"].append(ids + [pad_id] * pad)
        cols["labels"].append(labels + [IGNORE_INDEX] * pad)
        cols["example_lengths"].append([lengths[i] for i in row])
        cols["position_ids"].append(pack.position_ids_for(cols["example_lengths"][-1], seq_len))
        cols["example_ids"].append([examples[i].id for i in row])
    return cols, lengths


def prepare_superni(opts: PrepareOptions) -> dict:
    """Runs the whole preparation and returns the manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ConfigError: missing split files, or an output directory that already holds prepared data.
        DataFormatError: an unreadable task file (names the file and line).
    """
    t0 = time.time()
    opts.superni_dir, opts.out_dir, opts.tokenizer = Path(opts.superni_dir), Path(opts.out_dir), Path(opts.tokenizer)
    if opts.seq_len < 16:
        raise ConfigError(f"seq_len {opts.seq_len} is too small (minimum 16 tokens)")
    if (opts.out_dir / shards.MANIFEST).exists() and not opts.overwrite:
        raise ConfigError(f"{opts.out_dir} already holds prepared data; choose another --out or pass --overwrite")
    train_tasks = read_split_file(_split_file(opts, opts.train_split, "train_tasks.txt"))
    test_tasks = read_split_file(_split_file(opts, opts.test_split, "test_tasks.txt"))
    overlap = sorted(set(train_tasks) & set(test_tasks))
    if overlap:
        raise ConfigError(f"tasks in both the train and the test split: {overlap}; held-out tasks must be unseen")
    tok = TextTokenizer.load(opts.tokenizer)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    (opts.out_dir / shards.MANIFEST).unlink(missing_ok=True)
    rejects: list[dict] = []
    splits, files = {}, {}
    for split, names, cap, eval_cap in (
        ("train", train_tasks, opts.max_instances_per_task, None),
        ("test", test_tasks, opts.max_eval_instances_per_task, opts.max_eval_instances_per_task),
    ):
        read, rejected, rendered, examples, eval_records, f = _prepare_split(split, names, opts, tok, cap,
                                                                             rejects, eval_cap)
        files.update(f)
        cols, lengths = _pack_columns(rendered, examples, opts.seq_len, tok.pad_id, opts.seed)
        shard_list = shards.write_shards(opts.out_dir, split, cols, opts.max_rows_per_shard)
        rows = len(cols["input_ids"])
        tokens = sum(lengths)
        trainable = sum(r.num_trainable for r in rendered)
        info = {
            "tasks": names,
            "counts": {"read": read, "written": len(rendered),
                       "rejected": {k: rejected[k] for k in sorted(rejected)}},
            "examples_per_task": dict(sorted(Counter(e.task for e in examples).items())),
            "rows": rows,
            "tokens": tokens,
            "trainable_tokens": trainable,
            "padding_tokens": rows * opts.seq_len - tokens,
            "packing_efficiency": round(tokens / (rows * opts.seq_len), 6) if rows else 0.0,
            "max_example_tokens": max(lengths, default=0),
            "shards": shard_list,
        }
        if eval_cap is not None:
            eval_name = f"{split}_eval.jsonl"
            shards.atomic_write_text(opts.out_dir / eval_name,
                                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in eval_records))
            info["eval_file"] = eval_name
            info["eval_instances"] = len(eval_records)
            info["eval_sha256"] = shards.sha256_file(opts.out_dir / eval_name)
        splits[split] = info
    shards.atomic_write_text(opts.out_dir / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "created_by": f"itune {__version__}",
        "source": {"kind": "superni", "path": str(opts.superni_dir), "num_pos_examples": opts.num_pos_examples,
                   "add_definition": opts.add_definition, "max_instances_per_task": opts.max_instances_per_task},
        "source_files": files,
        "tokenizer": {"path": str(opts.tokenizer), "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
        "template": "completion",
        "prompt_format": "tk_instruct",
        "overflow": opts.overflow,
        "seq_len": opts.seq_len,
        "seed": opts.seed,
        "heldout_tasks": test_tasks,
        "splits": splits,
        "seconds": round(time.time() - t0, 3),
    }
    shards.atomic_write_text(opts.out_dir / shards.MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
