"""``itune-data``: offline data preparation.

    itune-data prepare --superni ../shared/data/superni --tokenizer ../shared/tokenizers/mistral-7b-v0.3 \\
        --seq-len 512 --out runs/data/superni_512
    itune-data prepare --input ../shared/data/alpaca_libre/alpaca_libre_tasks_v3.jsonl \\
        --input ../shared/data/fastchat_sharegpt_dummy/dummy_conversation.json \\
        --tokenizer ../shared/tokenizers/mistral-7b-v0.3 --seq-len 1024 --out runs/data/mix --on-error skip
    itune-data prepare --input qa.jsonl --field prompt=question --field completion=answer --template completion ...
    itune-data synthetic-suite --out runs/demo/suite            # the embedded default task suite
    itune-data train-tokenizer --superni runs/demo/suite --vocab-size 1024 --out runs/demo/tokenizer
    itune-data prepare --input a.jsonl --input b.json --num-proc 2 --tokenizer TOK --seq-len 2048 --out runs/data/mix
    itune-data prepare --mixture configs/mixture_example.yaml --on-error skip --tokenizer TOK --out runs/data/mix
    itune-data prepare --input a.jsonl ... --num-shards 2 --shard-index 0 --out OUT   # one slice (job array task)
    itune-data merge OUT                                                            # after every slice
    itune-data verify runs/data/superni_512
    itune-data inspect runs/data/superni_512 --rows 1
    itune-data stats runs/data/superni_512 --split train    # writes runs/data/superni_512/stats-train.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _prepare(a) -> int:
    from itune.data.prepare import PrepareOptions, prepare_superni

    if bool(a.superni) == bool(a.input or a.mixture):
        print("error: give either --superni DIR or one or more --input FILE (or --mixture FILE)", file=sys.stderr)
        return 2
    if a.input or a.mixture:
        return _prepare_sources(a)
    given = [f"--{k.replace('_', '-')}" for k in ("format", "template", "field", "on_error", "max_bad_fraction",
                                                  "task_field", "heldout_tasks", "max_per_task", "strict_keys",
                                                  "chat_template_kwargs")
             if getattr(a, k) not in (None, [], "auto", "raise", False)]
    if a.train_on != "all":
        given.append("--train-on")
    if given:
        print(f"error: {', '.join(given)} apply to --input files only (SuperNI uses the Tk-Instruct completion "
              "format)", file=sys.stderr)
        return 2
    m = prepare_superni(PrepareOptions(
        superni_dir=Path(a.superni), tokenizer=Path(a.tokenizer), out_dir=Path(a.out), seq_len=a.seq_len,
        train_split=Path(a.train_split) if a.train_split else None,
        test_split=Path(a.test_split) if a.test_split else None,
        max_instances_per_task=a.max_instances_per_task, max_eval_instances_per_task=a.max_eval_instances_per_task,
        num_pos_examples=a.num_pos_examples, add_definition=not a.no_definition, overflow=a.overflow, seed=a.seed,
        max_rows_per_shard=a.max_rows_per_shard, overwrite=a.overwrite, pack=not a.no_pack, num_proc=a.num_proc,
        shard_index=a.shard_index, num_shards=a.num_shards, keep_slices=a.keep_slices))
    if "splits" not in m:
        return _print_slice(m, a.out)
    return _print_splits(m, a.out)


def _prepare_sources(a) -> int:
    from itune.data.prepare import SourcesOptions, load_mixture, prepare_sources
    from itune.data.sources import parse_field_mapping

    inputs: list = [Path(p) for p in a.input]
    max_per_task = a.max_per_task
    if a.mixture:
        entries, cap = load_mixture(a.mixture)
        inputs += entries
        max_per_task = max_per_task if max_per_task is not None else cap
    m = prepare_sources(SourcesOptions(
        inputs=inputs, tokenizer=Path(a.tokenizer), out_dir=Path(a.out), seq_len=a.seq_len,
        format=a.format, template=a.template, fields=parse_field_mapping(a.field), train_on=a.train_on,
        on_error=a.on_error, max_bad_fraction=a.max_bad_fraction, overflow=a.overflow, seed=a.seed,
        max_rows_per_shard=a.max_rows_per_shard, pack=not a.no_pack, overwrite=a.overwrite,
        task_field=a.task_field, heldout_tasks=[t.strip() for t in (a.heldout_tasks or "").split(",") if t.strip()],
        max_eval_instances_per_task=a.max_eval_instances_per_task, max_per_task=max_per_task,
        num_proc=a.num_proc, shard_index=a.shard_index, num_shards=a.num_shards, keep_slices=a.keep_slices,
        strict_keys=a.strict_keys, max_instances_per_task=a.max_instances_per_task,
        chat_template_kwargs=a.chat_template_kwargs))
    if "splits" not in m:
        return _print_slice(m, a.out)
    return _print_sources(m, a.out)


def _print_slice(m: dict, out) -> int:
    """One slice of a job array: the merge writes the shards and the manifest."""
    print(f"slice {m['index']} of {m['num_slices']}: {len(m['chunks'])} chunks, {m['tokens']} tokens written "
          f"to {Path(out) / 'slices'}; when every slice is done: itune-data merge {out}")
    return 0


def _merge(a) -> int:
    from itune.data.pipeline import merge_slices

    if a.num_proc < 1:
        from itune.errors import ConfigError

        raise ConfigError(f"--num-proc {a.num_proc}: must be >= 1")
    from contextlib import nullcontext

    from itune.lock import hold_dir_lock

    # one merge or single-run prepare at a time in OUT (a missing OUT is left to merge_slices to report)
    with hold_dir_lock(a.out, "itune-data merge", choose=None) if Path(a.out).is_dir() else nullcontext():
        m = merge_slices(Path(a.out), keep_slices=a.keep_slices, num_proc=a.num_proc)
    return _print_sources(m, a.out) if m["source"].get("kind") == "files" else _print_splits(m, a.out)


def _print_sources(m: dict, out) -> int:
    for s in m["sources"]:
        c = s["counts"]
        print(f"{s['path']}: {s['format']}, template {s['template']}: read {c['read']} = written {c['written']} + "
              f"rejected {sum(c['rejected'].values())} {c['rejected'] or ''}"
              + (f"; mixture weight {s['weight']:g}: {s['mixture']['examples']} of {s['mixture']['available']} "
                 f"examples written" if s.get("weight", 1.0) != 1.0 or m["mixture"]["max_per_task"] else ""))
        for line in source_note_lines(s):
            print(f"  {line}")
    for k, where in (m.get("chat_template_kwargs_effects") or {}).items():
        note = " (the training text lacks what the held-out prompts have)" if where == "prompts only" else ""
        print(f"chat template variable {k}={m['chat_template_kwargs'][k]!r}: changes {where}{note}")
    return _print_splits(m, out)


def source_note_lines(s: dict) -> list[str]:
    """A source's manifest notes as console lines: keys not read, turns or messages not rendered, assistant turns
    trained."""
    lines = []
    if s.get("unused_keys"):
        lines.append("unused keys: " + ", ".join(f"{k} ({n} records)" for k, n in s["unused_keys"].items())
                     + " (map one with --field NAME=KEY; --strict-keys refuses them)")
    d = s.get("dropped", {})
    for k, n in d.items():
        if k.startswith("template_"):
            lines.append(f"the chat template left out {n} {k[len('template_'):]} messages (it renders them only in "
                         "some positions; see the template, or use --template chat)")
    if d.get("trailing_turns"):
        lines.append(f"{d['trailing_turns']} turns after the last assistant turn dropped (no response to train on)")
    if d.get("instances_over_cap"):
        lines.append(f"{d['instances_over_cap']} instances beyond --max-instances-per-task not read")
    t = s.get("assistant_turns")
    if t and t["untrained"]:
        lines.append(f"assistant turns: {t['trained']} trained, {t['untrained']} not trained (weight 0 or "
                     "--train-on last)")
    return lines


def _print_splits(m: dict, out) -> int:
    """One line per split: counts (read = written + rejected), rows, trainable tokens, packing efficiency."""
    for split, info in m["splits"].items():
        c = info["counts"]
        print(f"{split}: {len(info['tasks'])} tasks, read {c['read']} = written {c['written']} + rejected "
              f"{sum(c['rejected'].values())} {c['rejected'] or ''}; "
              + (f"mixture -> {info['examples']} examples; " if info.get("examples", c["written"]) != c["written"]
                 else "")
              + f"{info['rows']} rows of {m['seq_len']} tokens "
              f"({m['packing']}), {info['trainable_tokens']} trainable tokens, packing efficiency "
              f"{info['packing_efficiency']:.4f}" + (f", {info['eval_instances']} eval instances"
                                                     if "eval_instances" in info else ""))
    print(f"wrote {out}/manifest.json ({m['seconds']:.1f} s)")
    return 0


def _synthetic(a) -> int:
    from itune.data.synthetic import write_task_suite

    s = write_task_suite(a.out, seed=a.seed, instances_per_task=a.instances_per_task)
    print(f"wrote {s['num_tasks']} tasks ({s['splits']['train']['num_tasks']} train, "
          f"{s['splits']['test']['num_tasks']} held-out), {s['num_instances']} instances to {a.out}")
    return 0


def _train_tokenizer(a) -> int:
    from itune.data.sources import read_split_file, read_superni_task, superni_task_path
    from itune.data.tokenizer import train_sentencepiece

    from itune.data.prepare import check_superni_dir

    root = Path(a.superni)
    check_superni_dir(root)
    lines: list[str] = []
    for split in ("train_tasks.txt", "test_tasks.txt"):
        p = root / "splits" / split
        if not p.is_file():
            continue
        for name in read_split_file(p):
            for ex, _, _ in read_superni_task(superni_task_path(root / "tasks", name)):
                if ex is not None:
                    lines.extend(m.content for m in ex.messages)
    if not lines:
        print(f"error: no text found under {root}/splits + tasks", file=sys.stderr)
        return 2
    out = train_sentencepiece(lines, a.out, vocab_size=a.vocab_size)
    print(f"wrote SentencePiece tokenizer ({a.vocab_size} pieces requested) to {out}")
    return 0


def _verify(a) -> int:
    from itune.data.shards import verify

    problems = verify(a.data)
    for p in problems:
        print(p)
    print("ok" if not problems else f"{len(problems)} problems")
    return 0 if not problems else 1


def _shown(tok, ids: list[int], labels: list[int]) -> str:
    """Readable form of tokens, each trained one in ``[[...]]``: metaspace as a space, and runs of byte-fallback
    tokens (``<0xF0>``...) decoded together as UTF-8 (a character split over trained and untrained bytes is shown
    per part, undecodable bytes as U+FFFD)."""
    out: list[tuple[str, bool]] = []
    buf, buf_trained = b"", False

    def flush():
        nonlocal buf
        if buf:
            out.append((buf.decode("utf-8", "replace"), buf_trained))
            buf = b""

    for i, lab in zip(ids, labels):
        p = tok.id_to_token(i) or f"<{i}>"
        trained = lab != -100
        if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            if buf and trained != buf_trained:
                flush()
            buf, buf_trained = buf + bytes([int(p[3:5], 16)]), trained
            continue
        flush()
        out.append((p.replace("\u2581", " "), trained))
    flush()
    return "".join(f"[[{t}]]" if trained else t for t, trained in out)


def _inspect(a) -> int:
    from itune.data.shards import open_split, read_manifest
    from itune.data.tokenizer import TextTokenizer

    m = read_manifest(a.data)
    tok_path = (m.get("tokenizer") or {}).get("path")
    if not isinstance(tok_path, str):
        from itune.errors import ManifestError

        raise ManifestError(f"{a.data}: the manifest names no tokenizer path; prepare the data again")
    if a.rows < 1:
        from itune.errors import ConfigError

        raise ConfigError(f"--rows {a.rows}: give the number of rows to show (>= 1)")
    tok = TextTokenizer.load(tok_path)
    t = open_split(a.data, a.split)
    for r in range(min(a.rows, t.num_rows)):
        ids = t["input_ids"][r].as_py()
        labels = t["labels"][r].as_py()
        pos = 0
        print(f"== row {r}: examples {t['example_ids'][r].as_py()}")
        for n in t["example_lengths"][r].as_py():
            print(_shown(tok, ids[pos:pos + n], labels[pos:pos + n]))
            print("--")
            pos += n
    for split, info in m["splits"].items():  # per-task statistics
        trained = info.get("trainable_tokens_per_task", {})
        print(f"== {split}: task, examples" + (", trained tokens" if trained else ""))
        for task, n in info.get("examples_per_task", {}).items():
            name = task if task.isprintable() else repr(task)  # a tab or newline in a name would break the table
            print(f"{name}\t{n}" + (f"\t{trained.get(task, 0)}" if trained else ""))
    return 0


def _stats(a) -> int:
    from itune.data.stats import length_stats, write_stats_png

    s = length_stats(a.data, a.split)
    out = Path(a.out) if a.out else Path(a.data) / f"stats-{a.split}.png"
    el = s["example_length"]
    print(f"{a.split}: {s['examples']} examples in {s['rows']} rows of {s['seq_len']} tokens; {s['tokens']} tokens "
          f"({s['trainable_tokens']} trainable, {s['padding_tokens']} padding), packing efficiency "
          f"{s['packing_efficiency']:.4f}; example length mean {el['mean']:.1f}, median {el['median']:g}, "
          f"max {el['max']}")
    write_stats_png(s, out)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="itune-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare", help="render, mask, pack and shard SuperNI task files or instruction files")
    q.add_argument("--superni", help="directory with tasks/ and splits/")
    q.add_argument("--input", action="append", default=[], metavar="FILE",
                   help="instruction file (JSON array, JSONL, Parquet, Arrow); repeat for several; split 'train'")
    q.add_argument("--format", default="auto",
                   choices=["auto", "alpaca", "prompt_completion", "messages", "sharegpt", "instances",
                            "superni_jsonl"],
                   help="input format (auto: from the first record's keys)")
    q.add_argument("--template", default=None, choices=["completion", "alpaca", "chat", "tokenizer"],
                   help="rendering (default per format: alpaca->alpaca, prompt_completion->completion, "
                        "messages/sharegpt->chat; tokenizer = the tokenizer's chat template)")
    q.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help="extra variables for the tokenizer's chat template, e.g. '{\"enable_thinking\": false}' "
                        "(Qwen3, SmolLM3); with --template tokenizer; recorded in the manifest")
    q.add_argument("--field", action="append", default=[], metavar="NAME=KEY",
                   help="read field NAME from key KEY, e.g. --field prompt=question --field completion=answer")
    q.add_argument("--train-on", default="all", choices=["all", "last"], help="assistant turns to train on")
    q.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="bad record: stop (raise) or count it and write it to rejects.jsonl (skip)")
    q.add_argument("--max-bad-fraction", type=float, default=None,
                   help="with --on-error skip: fail when more than this fraction of records is bad")
    q.add_argument("--no-pack", action="store_true", help="one example per row (no packing), for comparison")
    q.add_argument("--task-field", help="record field naming each example's task (e.g. category)")
    q.add_argument("--strict-keys", action="store_true",
                   help="refuse a record holding a key its format and --field mapping do not read (default: count "
                        "such keys per source and report them)")
    q.add_argument("--heldout-tasks", help="comma-separated task names (values of --task-field) written to the "
                   "held-out split 'test' with eval instances, never to 'train'")
    q.add_argument("--mixture", metavar="YAML", help="mixture file: sources with per-source weight, template, "
                   "format, name, and an optional max_per_task (see README, Mixtures)")
    q.add_argument("--max-per-task", type=int, default=None,
                   help="cap on training examples per task (examples-proportional mixing with a cap)")
    q.add_argument("--num-proc", type=int, default=1,
                   help="worker processes that parse, render and tokenize, and that write the shards (output "
                   "identical for any value)")
    q.add_argument("--shard-index", type=int, default=None,
                   help="prepare only this slice of the inputs (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)")
    q.add_argument("--num-shards", type=int, default=None,
                   help="number of slices (default: SLURM_ARRAY_TASK_COUNT, else 1); combine with itune-data merge")
    q.add_argument("--keep-slices", action="store_true", help="keep OUT/slices (tokenized examples) after merging")
    q.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json)")
    q.add_argument("--out", required=True)
    q.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row")
    q.add_argument("--train-split", help="train task list (default splits/train_tasks.txt)")
    q.add_argument("--test-split", help="held-out task list (default splits/test_tasks.txt)")
    q.add_argument("--max-instances-per-task", type=int, default=None)
    q.add_argument("--max-eval-instances-per-task", type=int, default=100)
    q.add_argument("--num-pos-examples", type=int, default=2)
    q.add_argument("--no-definition", action="store_true")
    q.add_argument("--overflow", default="truncate_prompt_left",
                   choices=["truncate_prompt_left", "truncate_response", "drop"])
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--max-rows-per-shard", type=int, default=4096)
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(fn=_prepare)
    q = sub.add_parser("merge", help="combine the slices of a job-array preparation into shards + one manifest")
    q.add_argument("out", help="the --out directory every slice was prepared into")
    q.add_argument("--keep-slices", action="store_true")
    q.add_argument("--num-proc", type=int, default=1,
                   help="processes that write the shards (output identical for any value)")
    q.set_defaults(fn=_merge)
    q = sub.add_parser("synthetic-suite", help="write the embedded default task suite (SuperNI format)")
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--instances-per-task", type=int, default=60)
    q.set_defaults(fn=_synthetic)
    q = sub.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on SuperNI-format tasks")
    q.add_argument("--superni", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--vocab-size", type=int, default=1024)
    q.set_defaults(fn=_train_tokenizer)
    q = sub.add_parser("verify", help="re-check shards against the manifest")
    q.add_argument("data")
    q.set_defaults(fn=_verify)
    q = sub.add_parser("inspect", help="show decoded rows, trained tokens in [[...]]")
    q.add_argument("data")
    q.add_argument("--split", default="train", help="split to show (train, or test when there are held-out tasks)")
    q.add_argument("--rows", type=int, default=1, help="rows to decode (default 1)")
    q.set_defaults(fn=_inspect)
    q = sub.add_parser("stats", help="plot example lengths and row fill of a split to a PNG")
    q.add_argument("data")
    q.add_argument("--split", default="train", help="split to plot (default train)")
    q.add_argument("--out", help="PNG path (default DATA/stats-SPLIT.png)")
    q.set_defaults(fn=_stats)
    a = p.parse_args(argv)
    from itune.errors import ItuneError

    try:
        return a.fn(a)
    except ItuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly
        from itune.fileio import stdout_closed_by_reader

        return stdout_closed_by_reader()
    except OSError as e:  # a path that cannot be written or read: name it
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
