"""``itune-data prepare``: SuperNI task files, or instruction files (Alpaca, prompt/completion, chat messages,
ShareGPT) -> rendered, masked, packed Arrow shards + manifest.

Counts reconcile for every split and every source file: ``read = written + sum(rejected.values())``. Rejected
records are also written, with their reason and location, to ``rejects.jsonl``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from itune.data import render, shards
from itune.data.render import TEMPLATES, TRAIN_ON
from itune.data.sources import FORMATS, read_split_file, sniff_format, superni_task_path, utf8_encodable
from itune.data.tokenizer import TextTokenizer
from itune.errors import ConfigError
from itune.lock import hold_dir_lock

#: Template used for each input format when none is given.
DEFAULT_TEMPLATE = {"alpaca": "alpaca", "prompt_completion": "completion", "messages": "chat", "sharegpt": "chat",
                    "instances": "alpaca", "superni_jsonl": "completion"}


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
        pack: best-fit-decreasing packing; False writes one example per row (for comparison).
        num_proc / shard_index / num_shards / keep_slices: as :class:`SourcesOptions`.
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
    pack: bool = True
    num_proc: int = 1
    shard_index: int | None = None
    num_shards: int | None = None
    keep_slices: bool = False


def _run(plan, opts, shard_index: int, num_shards: int, t0: float, tok: TextTokenizer | None = None) -> dict:
    """Prepares slice ``shard_index`` of ``num_shards`` into ``opts.out_dir``; with one slice, merges it too.
    ``tok``: the plan's tokenizer, already loaded (the workers inherit it instead of loading it again).

    Returns:
        The manifest, or with ``num_shards`` > 1 the slice summary (``itune-data merge`` writes the manifest).
    """
    from itune.data import pipeline

    if num_shards > 1:  # a job array task writes only its own slice directory (the merge locks --out)
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        (opts.out_dir / shards.MANIFEST).unlink(missing_ok=True)
        return pipeline.prepare_slice(plan, opts.out_dir, shard_index, opts.num_proc, tok)
    with hold_dir_lock(opts.out_dir, "itune-data prepare", choose="--out"):  # a single run owns the directory
        if (opts.out_dir / shards.MANIFEST).exists() and not opts.overwrite:  # finished since the options were checked
            raise ConfigError(f"{opts.out_dir} already holds prepared data; choose another --out or pass --overwrite")
        (opts.out_dir / shards.MANIFEST).unlink(missing_ok=True)
        clear_outputs(opts.out_dir, slices=True)
        pipeline.prepare_slice(plan, opts.out_dir, shard_index, opts.num_proc, tok)
        return pipeline.merge_slices(opts.out_dir, keep_slices=opts.keep_slices, started=t0, num_proc=opts.num_proc)


def check_superni_dir(root: Path) -> None:
    """Raises ConfigError unless ``root`` looks like a SuperNI checkout (``tasks/`` with task files)."""
    if not root.is_dir():
        raise ConfigError(f"{root}: directory does not exist (expected a SuperNI directory with tasks/ and splits/)")
    if not (root / "tasks").is_dir():
        raise ConfigError(f"{root}: no tasks/ directory; --superni takes the directory that holds tasks/ and "
                          f"splits/ (found: {sorted(p.name for p in root.iterdir())[:10]})")


def _split_file(opts: PrepareOptions, given: Path | None, name: str) -> Path:
    check_superni_dir(opts.superni_dir)
    if given is not None:
        return Path(given)
    for cand in (opts.superni_dir / "splits" / name, opts.superni_dir / "splits" / "default" / name):
        if cand.is_file():
            return cand
    raise ConfigError(f"{opts.superni_dir}/splits/{name}: not found; pass the split file explicitly")


def _tokenizer_info(path, tok) -> dict:
    return {"path": str(path), "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}


def prepare_superni(opts: PrepareOptions) -> dict:
    """Prepares a SuperNI checkout (train tasks -> split ``train``, test tasks -> held-out split ``test`` with
    ``test_eval.jsonl``) and returns the manifest (also ``out_dir/manifest.json``).

    Runs :mod:`itune.data.pipeline` with one source per task file (format ``superni``): ``num_proc`` workers, and
    with ``num_shards`` > 1 only slice ``shard_index`` (returning its summary; ``itune-data merge`` finishes).

    Raises:
        ConfigError: missing split files, a task in both splits, or an output directory that already holds
            prepared data.
        DataFormatError: an unreadable task file (names the file and line).
    """
    from itune.data import pipeline

    t0 = time.time()
    opts.superni_dir, opts.out_dir = Path(opts.superni_dir), Path(opts.out_dir)
    opts.tokenizer = Path(os.path.abspath(opts.tokenizer))  # the manifest names it for later readers, from any folder
    problems = _common_problems(opts)
    if opts.seq_len < 16:
        problems.append(f"seq_len {opts.seq_len} is too small (minimum 16 tokens)")
    if opts.max_instances_per_task is not None and opts.max_instances_per_task < 1:
        problems.append(f"max_instances_per_task {opts.max_instances_per_task}: must be >= 1")
    if opts.num_pos_examples < 0:
        problems.append(f"num_pos_examples {opts.num_pos_examples}: must be >= 0")
    if problems:
        raise ConfigError("; ".join(problems))
    train_tasks = read_split_file(_split_file(opts, opts.train_split, "train_tasks.txt"))
    test_tasks = read_split_file(_split_file(opts, opts.test_split, "test_tasks.txt"))
    overlap = sorted(set(train_tasks) & set(test_tasks))
    if overlap:
        raise ConfigError(f"tasks in both the train and the test split: {overlap}; held-out tasks must be unseen")
    shard_index, num_shards = slice_from_env(opts.shard_index, opts.num_shards)
    tok = TextTokenizer.load(opts.tokenizer)
    tasks_dir = opts.superni_dir / "tasks"
    specs = [pipeline.SourceSpec(str(superni_task_path(tasks_dir, name)), name, "superni", "completion", 1.0, cap)
             for names, cap in ((train_tasks, opts.max_instances_per_task),
                                (test_tasks, opts.max_eval_instances_per_task))
             for name in names]
    clobbered = [s.path for s in specs if overwritten_by_output(opts.out_dir, Path(s.path))]
    if clobbered:
        raise ConfigError(f"task files {clobbered[:3]} lie in --out {opts.out_dir} under names that preparation "
                          "removes or writes; choose another --out")
    sn = {"num_pos_examples": opts.num_pos_examples, "add_definition": opts.add_definition}
    plan = pipeline.PipelinePlan(
        sources=specs, source_sha256=[shards.sha256_file(s.path) for s in specs], tokenizer=str(opts.tokenizer),
        tokenizer_info=_tokenizer_info(opts.tokenizer, tok), seq_len=opts.seq_len, fields={}, train_on="all",
        overflow=opts.overflow, on_error="skip", max_bad_fraction=None, task_field=None, heldout_tasks=test_tasks,
        max_eval_instances_per_task=opts.max_eval_instances_per_task, max_per_task=None, seed=opts.seed,
        pack=opts.pack, max_rows_per_shard=opts.max_rows_per_shard,
        template_fingerprint=pipeline.template_fingerprint(["completion", "tk_instruct"], tok),
        num_slices=num_shards, superni=sn,
        source_kind={"kind": "superni", "path": str(opts.superni_dir), **sn,
                     "max_instances_per_task": opts.max_instances_per_task},
        extra_manifest={"prompt_format": "tk_instruct"})
    return _run(plan, opts, shard_index, num_shards, t0, tok)


@dataclass
class SourcesOptions:
    """Options of one preparation run over instruction files (split ``train`` only, no eval file).

    Attributes:
        inputs: JSON array / JSONL / Parquet / Arrow files (see :func:`itune.data.sources.iter_records`).
        tokenizer: tokenizer directory (``tokenizer.json`` + config).
        out_dir: output directory (created; must not hold a manifest unless ``overwrite``).
        seq_len: tokens per row.
        format: ``auto`` (detected per file from its first record's keys) or one of
            :data:`~itune.data.sources.FORMATS`, for every input.
        template: one of :data:`~itune.data.render.TEMPLATES` for every input; None = per format
            (:data:`DEFAULT_TEMPLATE`: alpaca -> ``alpaca``, prompt_completion -> ``completion``, messages and
            sharegpt -> ``chat``).
        fields: canonical field name -> key in the files (``{"prompt": "question"}``).
        train_on: ``all`` assistant turns or only the ``last`` one.
        on_error: ``raise`` stops at the first bad record (DataFormatError naming file and line); ``skip`` counts
            it under its reason and writes it to ``rejects.jsonl``.
        max_bad_fraction: with ``skip``, fail when more than this fraction of the records read are bad
            (rejected by a reader; over-long examples are not "bad"). None = no limit.
        overflow / seed / max_rows_per_shard / pack / overwrite: as :class:`PrepareOptions`.
        task_field / heldout_tasks: examples whose task (this record field) is named go to split ``test``
            (rows + the first ``max_eval_instances_per_task`` per task as eval instances), never to ``train``.
        max_per_task: cap on training examples per task (a seeded random subset of a larger task), applied before
            the source weights: examples-proportional mixing with a cap (T5, Raffel et al. 2020, sec. 3.5.2;
            FLAN). None = no cap.
        num_proc: worker processes that parse, render and tokenize, and processes that write the shards (the
            output is identical for any value).
        shard_index / num_shards: prepare only slice ``shard_index`` of ``num_shards`` (a Slurm job array task);
            None = from ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``, else one slice.
        keep_slices: keep ``out_dir/slices`` (tokenized examples) after the merge.
        chunk_records: records per unit of work (per source).
        strict_keys: a record holding a key that its format and ``fields`` do not read is a bad record
            (``unused_key``); else such keys are counted per source (manifest ``sources[].unused_keys``).
        max_instances_per_task: nested formats (``instances``, ``superni_jsonl``): read the first N instances of
            each record (the rest are counted, manifest ``sources[].dropped.instances_over_cap``). None = all.
        chat_template_kwargs: extra variables for the tokenizer's chat template (a dict or its JSON text, e.g.
            ``{"enable_thinking": false}``), as ``transformers``' ``apply_chat_template(**kwargs)``; they shape the
            training text and the eval prompts (manifest ``chat_template_kwargs``). Only with template
            ``tokenizer``; checked by :func:`itune.data.render.check_chat_template_kwargs`.

    ``inputs`` items are paths, or dicts ``{"path", "weight", "template", "format", "name"}`` (a mixture entry;
    missing keys take the run's values, weight 1).
    """

    inputs: list
    tokenizer: Path
    out_dir: Path
    seq_len: int = 1024
    format: str = "auto"
    template: str | None = None
    fields: dict = None
    train_on: str = "all"
    on_error: str = "raise"
    max_bad_fraction: float | None = None
    overflow: str = "truncate_prompt_left"
    seed: int = 0
    max_rows_per_shard: int = 4096
    pack: bool = True
    overwrite: bool = False
    task_field: str | None = None
    heldout_tasks: list = None
    max_eval_instances_per_task: int = 100
    max_per_task: int | None = None
    num_proc: int = 1
    shard_index: int | None = None
    num_shards: int | None = None
    keep_slices: bool = False
    chunk_records: int = 1024
    strict_keys: bool = False
    max_instances_per_task: int | None = None
    chat_template_kwargs: dict | str | None = None


def _check_sources_options(opts: SourcesOptions) -> None:
    problems = []
    if not opts.inputs:
        problems.append("no input file given (--input FILE)")
    if opts.seq_len < 16:
        problems.append(f"seq_len {opts.seq_len} is too small (minimum 16 tokens)")
    if opts.format != "auto" and opts.format not in FORMATS:
        problems.append(f"format {opts.format!r}: choose auto or one of {FORMATS}")
    if opts.template is not None and opts.template not in TEMPLATES:
        problems.append(f"template {opts.template!r}: choose one of {TEMPLATES}")
    if opts.train_on not in TRAIN_ON:
        problems.append(f"train_on {opts.train_on!r}: choose one of {TRAIN_ON}")
    if opts.on_error not in ("raise", "skip"):
        problems.append(f"on_error {opts.on_error!r}: choose raise or skip")
    if opts.max_bad_fraction is not None and not 0 <= opts.max_bad_fraction <= 1:
        problems.append(f"max_bad_fraction {opts.max_bad_fraction}: must be in [0, 1]")
    if opts.max_bad_fraction is not None and opts.on_error != "skip":
        problems.append("max_bad_fraction applies with on_error='skip' only")
    if opts.max_instances_per_task is not None and opts.max_instances_per_task < 1:
        problems.append(f"max_instances_per_task {opts.max_instances_per_task}: must be >= 1")
    for item in opts.inputs:
        p = item["path"] if isinstance(item, dict) else item
        if not Path(p).is_file():
            problems.append(f"{p}: input file not found")
        elif overwritten_by_output(opts.out_dir, Path(p)):
            problems.append(f"{p}: this input lies in --out {opts.out_dir} under a name that preparation removes or "
                            "writes; move it or choose another --out")
        if not utf8_encodable(str(p)):  # the file name is the task name and part of every example id
            problems.append(f"{str(p)!r}: the path is not valid UTF-8 (the file name becomes the task name and part "
                            "of every example id); rename the file")
        if isinstance(item, dict):
            w = item.get("weight", 1.0)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                problems.append(f"{p}: weight {w!r} must be a finite number >= 0")
            elif w > MAX_WEIGHT:
                problems.append(f"{p}: weight {w!r} is above {MAX_WEIGHT:g}; a weight is how many times each "
                                "example is taken (0.5 = half of them, 3 = each three times)")
            name = item.get("name")
            if name is not None and (not isinstance(name, str) or not name.strip() or not utf8_encodable(name)):
                problems.append(f"{p}: name {name!r} must be a non-empty string of valid UTF-8")
            unknown = sorted(set(item) - {"path", "weight", "template", "format", "name"})
            if unknown:
                problems.append(f"{p}: unknown mixture keys {unknown} (allowed: path, weight, template, format, "
                                f"name)")
            if item.get("template") is not None and item["template"] not in TEMPLATES:
                problems.append(f"{p}: template {item['template']!r}: choose one of {TEMPLATES}")
            if item.get("format") not in (None, "auto") and item["format"] not in FORMATS:
                problems.append(f"{p}: format {item['format']!r}: choose auto or one of {FORMATS}")
    if opts.max_per_task is not None and opts.max_per_task < 1:
        problems.append(f"max_per_task {opts.max_per_task}: must be >= 1")
    problems += _common_problems(opts)
    if problems:
        raise ConfigError("; ".join(problems))


def _common_problems(opts) -> list[str]:
    """Checks shared by both kinds of preparation (numbers, output directory)."""
    problems = []
    for name, lowest in (("num_proc", 1), ("max_rows_per_shard", 1), ("seed", 0), ("max_eval_instances_per_task", 1)):
        v = getattr(opts, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < lowest:
            problems.append(f"{name} {v!r}: must be >= {lowest}")
    paths = [("--out", opts.out_dir), ("--tokenizer", opts.tokenizer)]
    if isinstance(opts, PrepareOptions):
        paths.append(("--superni", opts.superni_dir))
    for what, path in paths:
        if not utf8_encodable(str(path)):
            problems.append(f"{what} {str(path)!r}: the path is not valid UTF-8; rename it (paths are written into "
                            "the manifest and read back by training and evaluation)")
    if opts.out_dir.exists() and not opts.out_dir.is_dir():
        problems.append(f"{opts.out_dir} is a file, not a directory; choose another --out")
    elif (opts.out_dir / shards.MANIFEST).exists() and not opts.overwrite:
        problems.append(f"{opts.out_dir} already holds prepared data; choose another --out or pass --overwrite")
    return problems


#: Largest mixture weight: a weight is a per-example repeat count (the data is copied that many times in shards).
MAX_WEIGHT = 1000.0

#: Names in the output directory that a preparation removes (an earlier run's files) and writes.
OUTPUT_PATTERNS = ("train-*-of-*.arrow", "test-*-of-*.arrow", "test_eval.jsonl", "rejects.jsonl", ".*.tmp")


def clear_outputs(out_dir: Path, slices: bool) -> None:
    """Removes what an earlier preparation left in ``out_dir`` (shards, eval and rejects files, temporary files,
    and with ``slices`` the slices directory), so that no stale file sits beside the new ones."""
    import shutil

    from itune.data.pipeline import SLICES_DIR

    for pattern in OUTPUT_PATTERNS:
        for p in out_dir.glob(pattern):
            p.unlink()
    if slices:
        shutil.rmtree(out_dir / SLICES_DIR, ignore_errors=True)


def overwritten_by_output(out_dir: Path, path: Path) -> bool:
    """Whether preparing into ``out_dir`` would remove or overwrite ``path``: a file directly in ``out_dir`` named
    like an output (:data:`OUTPUT_PATTERNS`, ``manifest.json``), or anything under ``out_dir/slices``."""
    from fnmatch import fnmatchcase

    from itune.data.pipeline import SLICES_DIR

    out, p = Path(os.path.realpath(out_dir)), Path(os.path.realpath(path))
    if p.parent == out:
        return p.name == shards.MANIFEST or any(fnmatchcase(p.name, pat) for pat in OUTPUT_PATTERNS)
    return p.is_relative_to(out / SLICES_DIR)


def _specs(opts: SourcesOptions, tok: TextTokenizer) -> list:
    """Every input's format and template, resolved (or refused) before any work."""
    from itune.data.pipeline import SourceSpec

    specs = []
    for item in opts.inputs:
        d = dict(item) if isinstance(item, dict) else {"path": item}
        path = Path(d["path"])
        fmt = d.get("format") or opts.format
        fmt = sniff_format(path, opts.fields) if fmt == "auto" else fmt
        template = d.get("template") or opts.template or DEFAULT_TEMPLATE[fmt]
        if template == "tokenizer" and not tok.chat_template:
            raise ConfigError(f"{opts.tokenizer}: --template tokenizer, but the tokenizer has no chat template")
        specs.append(SourceSpec(str(path), d.get("name") or path.stem, fmt, template, float(d.get("weight", 1.0))))
    return specs


def load_mixture(path: str | Path) -> tuple[list[dict], int | None]:
    """Reads a mixture file; returns its source entries (paths resolved against the file's folder) and its
    ``max_per_task``.

    Format (YAML)::

        sources:
          - path: ../shared/data/alpaca_libre/alpaca_libre_tasks_v3.jsonl
            weight: 0.5          # round(0.5 * n) examples: a seeded half
            template: alpaca     # optional: per-source template (default: per format)
          - path: chats.json
            weight: 2            # every example twice
            name: chat           # optional: task name of its examples (default: the file stem)
        max_per_task: 1000       # optional: cap per task before weighting

    Raises:
        ConfigError: unreadable YAML, a key given twice in one mapping (file, key and both lines named) or a
            malformed entry (file and entry named).
    """
    import yaml

    from itune.yamlio import safe_load_unique

    path = Path(path)
    try:
        doc = safe_load_unique(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the mixture file ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list) or not doc["sources"]:
        raise ConfigError(f"{path}: a mixture file is a mapping with a non-empty list 'sources' "
                          "(each entry: path, optional weight, template, format, name)")
    unknown = sorted(set(doc) - {"sources", "max_per_task"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} (allowed: sources, max_per_task)")
    out = []
    for i, e in enumerate(doc["sources"]):
        if isinstance(e, str):
            e = {"path": e}
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise ConfigError(f"{path}: sources[{i}] must be a mapping with a 'path' string, found {e!r}")
        p = Path(e["path"])
        out.append(dict(e, path=p if p.is_absolute() else Path(os.path.normpath(path.parent / p))))
    cap = doc.get("max_per_task")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool)):
        raise ConfigError(f"{path}: max_per_task must be an integer, found {cap!r}")
    return out, cap


def slice_from_env(shard_index: int | None, num_shards: int | None, env=None) -> tuple[int, int]:
    """``(shard_index, num_shards)`` of this preparation: the given values, else the Slurm job array's
    (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``), else ``(0, 1)``.

    Raises:
        ConfigError: an index outside ``[0, num_shards)``, or only one of the two given.
    """
    env = os.environ if env is None else env
    if num_shards is None and shard_index is None and env.get("SLURM_ARRAY_TASK_COUNT"):
        if not env.get("SLURM_ARRAY_TASK_ID"):
            raise ConfigError("SLURM_ARRAY_TASK_COUNT is set but SLURM_ARRAY_TASK_ID is not; run inside a job array "
                              "or pass --shard-index and --num-shards")
        values = {}
        for k in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN"):
            try:
                values[k] = int(env.get(k, "0"))
            except ValueError:
                raise ConfigError(f"{k} {env[k]!r} is not an integer") from None
        num_shards = values["SLURM_ARRAY_TASK_COUNT"]
        shard_index = values["SLURM_ARRAY_TASK_ID"] - values["SLURM_ARRAY_TASK_MIN"]
    if (num_shards is None) != (shard_index is None):
        raise ConfigError("give both --shard-index and --num-shards (or neither)")
    if num_shards is None:
        return 0, 1
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index {shard_index} of --num-shards {num_shards}: the index must be in "
                          f"[0, {num_shards}) (a Slurm array must be numbered contiguously)")
    return shard_index, num_shards


def prepare_sources(opts: SourcesOptions) -> dict:
    """Reads every input, renders, masks, packs and shards them as split ``train``; returns the manifest.

    Runs :mod:`itune.data.pipeline`: with ``num_shards`` 1, the one slice and the merge; with ``num_shards`` N > 1,
    only slice ``shard_index`` (``itune-data merge OUT`` combines the N slices), returning the slice summary.

    The manifest has the keys of :func:`prepare_superni` plus ``sources`` (per input file its path, sha256,
    format, template, weight, counts (read = written + rejected) and realised mixture), ``mixture``,
    ``template_fingerprint`` and, per split, ``length_histogram`` / ``row_fill_histogram``.

    Raises:
        ConfigError: bad options, a missing input, an output directory that already holds prepared data, or the
            tokenizer template requested for a tokenizer without one.
        DataFormatError: a file that cannot be read or whose format cannot be detected; with ``on_error="raise"``
            the first bad record (file and line); with ``skip``, more bad records than ``max_bad_fraction``.
    """
    from itune.data import pipeline

    t0 = time.time()
    opts.inputs = [x if isinstance(x, dict) else Path(x) for x in opts.inputs]
    opts.out_dir, opts.tokenizer = Path(opts.out_dir), Path(os.path.abspath(opts.tokenizer))
    opts.fields = dict(opts.fields or {})
    _check_sources_options(opts)
    shard_index, num_shards = slice_from_env(opts.shard_index, opts.num_shards)
    tok = TextTokenizer.load(opts.tokenizer)
    specs = _specs(opts, tok)
    effects = {}
    if opts.chat_template_kwargs not in (None, {}, ""):
        if not any(s.template == "tokenizer" for s in specs):
            raise ConfigError("--chat-template-kwargs: no source uses the tokenizer's chat template (templates: "
                              f"{', '.join(sorted({s.template for s in specs}))}); use --template tokenizer or "
                              "drop the option")
        tok.chat_template_kwargs = render.check_chat_template_kwargs(opts.chat_template_kwargs, tok)
        effects = render.template_kwargs_effects(tok.chat_template_kwargs, tok)
    if opts.heldout_tasks and not opts.task_field and not all(s.format in pipeline.NESTED_FORMATS for s in specs):
        raise ConfigError("held-out tasks need --task-field (the record field that names each example's task); "
                          "records of the instances and superni_jsonl formats name their task by name or id")
    plan = pipeline.PipelinePlan(
        sources=specs, source_sha256=[shards.sha256_file(s.path) for s in specs], tokenizer=str(opts.tokenizer),
        tokenizer_info=_tokenizer_info(opts.tokenizer, tok), seq_len=opts.seq_len, fields=opts.fields,
        train_on=opts.train_on, overflow=opts.overflow, on_error=opts.on_error,
        max_bad_fraction=opts.max_bad_fraction, task_field=opts.task_field,
        heldout_tasks=list(opts.heldout_tasks or []), max_eval_instances_per_task=opts.max_eval_instances_per_task,
        max_per_task=opts.max_per_task, seed=opts.seed, pack=opts.pack, max_rows_per_shard=opts.max_rows_per_shard,
        template_fingerprint=pipeline.template_fingerprint([s.template for s in specs], tok),
        num_slices=num_shards, chunk_records=opts.chunk_records, strict_keys=opts.strict_keys,
        max_instances_per_task=opts.max_instances_per_task, chat_template_kwargs=dict(tok.chat_template_kwargs),
        extra_manifest={"chat_template_kwargs_effects": effects} if tok.chat_template_kwargs else {},
        source_kind={"kind": "files", "format": opts.format, "fields": opts.fields, "train_on": opts.train_on,
                     "task_field": opts.task_field, "on_error": opts.on_error,
                     "max_bad_fraction": opts.max_bad_fraction})
    return _run(plan, opts, shard_index, num_shards, t0, tok)
