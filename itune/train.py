"""The training recipe: prepared rows -> DeepSpeed ZeRO-3 engine -> checkpoints -> verified HF export.

Reads top to bottom as the loop. Every rank runs this; only rank 0 prints and writes shared files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
from tqdm import tqdm

from itune import __version__, checkpoint, dist, sequence_parallel, tracking
from itune.comm import broadcast_from_rank0, close_distributed, exit_process, init_distributed
from itune.config import BatchPlan, RunConfig, to_dict
from itune.data import shards
from itune.data.tokenizer import TextTokenizer
from itune.errors import ConfigError, ManifestError
from itune.families import Isolation, RouterAux, moe_leaf_classes, probe_isolation, refusal_message, \
    router_aux
from itune.loader import PackedRows, step_row_ids
from itune.lock import DirLock, hold_dir_lock_rank0
from itune.preemption import EXIT_PREEMPTED, PreemptionFlag, launcher_chain  # noqa: F401  (EXIT_PREEMPTED: API)
from itune.loss import check_tiled_loss, count_targets, packed_loss_sum
from itune.model import (apply_lora, apply_tiled_mlp, attention, build_ds_config, build_model, embedding_rows,
                         flops_per_token, is_lora, lr_lambda, model_config, param_groups, resize_embeddings, use_bf16)

#: the isolation of a model whose forward builds a block-diagonal mask from restarting position_ids (most families)
POSITION_IDS = Isolation(("position_ids",))



class RankZeroLog:
    """Console + ``metrics.jsonl`` + the trackers of ``train.report_to`` (:mod:`itune.tracking`) on rank 0; a
    no-op on every other rank."""

    def __init__(self, rank: int, out_dir: Path):
        self.on = rank == 0
        self.out_dir = out_dir
        self.trackers = None
        self.metrics = None
        if self.on:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = open(out_dir / "metrics.jsonl", "a")

    def start_trackers(self, cfg: RunConfig, manifest: dict) -> None:
        """Starts the trackers on rank 0 with the run config and the data summary; every rank must call it.

        Raises:
            ConfigError: on every rank, the same line, when a tracker cannot start.
        """
        err = None
        if self.on:
            try:
                self.trackers = tracking.Trackers(cfg.train.report_to, self.out_dir, cfg.train.run_name,
                                                  to_dict(cfg), tracking.data_summary(cfg.data.path, manifest))
            except ConfigError as e:
                err = str(e)
        err = broadcast_from_rank0(err, tdist.get_world_size() if tdist.is_initialized() else 1)
        if err:
            e = ConfigError(err)
            e.every_rank = True  # launcher/train.py prints it once
            raise e

    def print(self, *a):
        if self.on:
            tqdm.write(" ".join(str(x) for x in a))  # above the progress bar, if one is shown
            sys.stdout.flush()

    def scalars(self, step: int, values: dict, kind: str = "train"):
        if not self.on:
            return
        if self.trackers is not None:
            self.trackers.log(step, {f"{kind}/{k}": v for k, v in values.items()})
        self.metrics.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.metrics.flush()

    def close(self, status: str = "FINISHED"):
        if self.on:
            if self.trackers is not None:
                self.trackers.close(status)
            self.metrics.close()


def all_reduce_sum(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    tdist.all_reduce(t)
    return float(t.item())


def tokenizer_extends(base: Path, ext: Path) -> bool:
    """True when the tokenizer in ``ext`` is the one in ``base`` with tokens added (e.g. special tokens added with
    transformers' ``add_special_tokens`` and saved): every token of ``base`` (added ones included) has the same
    id in ``ext``, and both have the same normalizer, pre-tokenizer, model type and BPE merges, so text
    tokenizes the same except where the new tokens occur."""
    from tokenizers import Tokenizer

    def parts(d: Path):
        t = json.loads((Path(d) / "tokenizer.json").read_text(encoding="utf-8"))
        m = t.get("model") or {}
        # merges are saved as "a b" or, by newer `tokenizers`, as ["a", "b"]
        merges = [x.split(" ", 1) if isinstance(x, str) else list(x) for x in m.get("merges") or []]
        vocab = Tokenizer.from_file(str(Path(d) / "tokenizer.json")).get_vocab(with_added_tokens=True)
        return [t.get("normalizer"), t.get("pre_tokenizer"), m.get("type"), merges], vocab

    (b, b_vocab), (e, e_vocab) = parts(base), parts(ext)
    return b == e and all(e_vocab.get(k) == i for k, i in b_vocab.items())


def verify_checksums(cfg: RunConfig, manifest: dict, rank: int, world: int) -> None:
    """Re-hashes the shards of the training and held-out splits (sha256, as ``itune-data verify``) against the
    manifest before training: shard ``i`` on rank ``i % world``, the findings shared by every rank.

    Raises:
        ManifestError: on every rank, naming each missing or changed shard.
    """
    files = [sh for split in (cfg.data.train_split, cfg.data.eval_split) if split in manifest["splits"]
             for sh in manifest["splits"][split].get("shards", [])]
    mine = [x for sh in files[rank::world] if (x := shards.check_shard_file(cfg.data.path, sh)) is not None]
    found: list = [None] * world
    tdist.all_gather_object(found, mine)
    problems = [x for part in found for x in part]
    if problems:
        raise ManifestError(f"{cfg.data.path}: damaged data:\n  - " + "\n  - ".join(problems)
                            + "\nPrepare the data again (`itune-data verify DIR` re-checks it)")


def check_train_split(cfg: RunConfig, manifest: dict) -> None:
    """Raises ManifestError when the data has no split ``data.train_split``."""
    if cfg.data.train_split not in manifest["splits"]:
        raise ManifestError(f"{cfg.data.path}: no split {cfg.data.train_split!r} for data.train_split (have "
                            f"{sorted(manifest['splits'])})")


def check_data(cfg: RunConfig, manifest: dict) -> Path:
    """Refuses a run whose data was prepared with another tokenizer, or trains on a held-out task.

    Returns:
        the tokenizer directory exported with the model: the data's tokenizer (``manifest["tokenizer"]["path"]``)
        for a model built from ``architecture``; for ``model.pretrained``, the model's own, or the data's when it
        is the model's tokenizer with tokens added (:func:`tokenizer_extends`; the embedding is then resized, see
        :func:`itune.model.embedding_rows`).

    Raises:
        ManifestError: no training split, another tokenizer, or held-out tasks in the training split.
    """
    check_train_split(cfg, manifest)
    tok = manifest["tokenizer"]
    tokenizer_dir = Path(tok["path"])
    if cfg.model.pretrained:
        model_dir = Path(cfg.model.pretrained)
        fp = TextTokenizer.load(model_dir).fingerprint
        if fp != tok["fingerprint"]:
            if not ((tokenizer_dir / "tokenizer.json").is_file()
                    and TextTokenizer.load(tokenizer_dir).fingerprint == tok["fingerprint"]
                    and tokenizer_extends(model_dir, tokenizer_dir)):
                raise ManifestError(
                    f"{cfg.data.path}: prepared with tokenizer {tok['path']} (fingerprint {tok['fingerprint']}), "
                    f"but the model's tokenizer {model_dir} has fingerprint {fp} and the data's tokenizer is not "
                    "the model's with tokens added; prepare the data again with the model's tokenizer (or with "
                    "a copy of it to which tokens were added)")
        else:
            tokenizer_dir = model_dir
    leaked = sorted(set(manifest["splits"][cfg.data.train_split]["tasks"]) & set(manifest.get("heldout_tasks", [])))
    if leaked:
        raise ManifestError(f"{cfg.data.path}: held-out tasks appear in the training split: {leaked}")
    return tokenizer_dir


def evaluate_loss(engine, rows: PackedRows, rank: int, world: int, micro: int,
                  isolation: Isolation = POSITION_IDS, tile_tokens: int | None = None) -> tuple[float, int]:
    """Held-out loss (sum CE / trained tokens) over every row of ``rows``; every rank runs the same number of
    forward passes (padding rows fill the last ones) so ZeRO-3 gathers stay in step."""
    n = len(rows)
    per_pass = micro * world
    passes = max(1, math.ceil(n / per_pass))
    total, count = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for p in range(passes):
            ids = [p * per_pass + rank * micro + j for j in range(micro)]
            b = rows.rows([i if i < n else -1 for i in ids])
            total += float(packed_loss_sum(engine, b.input_ids, b.position_ids, b.labels, isolation, tile_tokens))
            count += count_targets(b.labels, b.position_ids)
    engine.train()
    total, count = all_reduce_sum(total), int(all_reduce_sum(count))
    return (total / count if count else float("nan")), count


def choose_loss(model, isolation, vocab: int, tile_tokens: int, liger: bool) -> tuple[int | None, str, list]:
    """The training loss: tiled with Liger's kernel (``liger``) or itune's, each proven on the loaded model
    (:func:`itune.loss.check_tiled_loss`), else from the full logits. Every rank must call it (ZeRO-3).

    Returns:
        ``(tile_tokens or None for the full logits, kernel, the lines to print)``.
    """
    lines = []
    for kernel in (("liger", "itune") if liger else ("itune",)):
        why = check_tiled_loss(model, isolation, vocab, tile_tokens, kernel=kernel)
        if why is None:
            name = "Liger's fused linear cross-entropy (train.liger_loss)" if kernel == "liger" else \
                f"{tile_tokens} positions per tile (train.loss_tile_tokens)"
            return tile_tokens, kernel, lines + [f"loss: tiled, {name}"]
        lines.append(f"loss: Liger's fused linear cross-entropy does not fit this model ({why}); using itune's "
                     "tiled loss" if kernel == "liger" else
                     f"loss: from the full logits: the tiled loss does not fit this model ({why})")
    return None, "itune", lines


def fixed_batch_loss(model_fn, rows: PackedRows, n: int = 2, isolation: Isolation = POSITION_IDS,
                     tile_tokens: int | None = None) -> float:
    """Loss of rows 0..n-1 (sum CE / trained tokens): compares the engine with its export."""
    b = rows.rows(list(range(min(n, len(rows)))))
    with torch.no_grad():
        total = packed_loss_sum(model_fn, b.input_ids, b.position_ids, b.labels, isolation, tile_tokens)
        return float(total) / max(1, count_targets(b.labels, b.position_ids))


def training_record(s: "Setup", step: int) -> dict:
    """What an export was trained on (``itune_training.json``): evaluation uses it to refuse contaminated
    held-out tasks and to measure n-gram overlap with the training rows."""
    m = shards.read_manifest(s.cfg.data.path)
    return {"step": step, "data_path": str(Path(s.cfg.data.path).resolve()), "train_split": s.cfg.data.train_split,
            "manifest_hash": shards.manifest_hash(s.cfg.data.path),
            "tokenizer_fingerprint": m["tokenizer"]["fingerprint"],
            "train_tasks": m["splits"][s.cfg.data.train_split]["tasks"]}


def export_verified(engine, hf_config, tokenizer_dir: Path, export_dir: Path, rows: PackedRows, rank: int,
                    record: dict | None = None, isolation: Isolation = POSITION_IDS) -> Path:
    """Gathers the weights (every rank), writes the HF export (rank 0), reloads it with ``from_pretrained`` and
    checks that its loss on a fixed batch equals the engine's (|diff| <= 1e-4), both called with the run's
    isolation method; writes ``export_check.json`` and ``itune_training.json`` (``record``).

    Raises:
        RuntimeError: an empty or misshapen tensor, or a loss mismatch.
    """
    engine.eval()
    engine_loss = fixed_batch_loss(engine, rows, isolation=isolation)
    sd = checkpoint.gathered_state_dict(engine)
    if rank == 0:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # plain (unpartitioned) models from here on: the LoRA copy, the reloaded export
        if is_lora(engine.module):
            checkpoint.write_lora_export(engine.module, sd, hf_config, tokenizer_dir, export_dir)
        else:
            checkpoint.write_export(engine.module, sd, hf_config, tokenizer_dir, export_dir)
        exported = checkpoint.load_export(export_dir, attn_implementation=engine.module.config._attn_implementation)
        export_loss = fixed_batch_loss(exported, rows, isolation=Isolation(isolation.methods,
                                                                           exported.config.get_text_config()))
        check = {"engine_loss": engine_loss, "export_loss": export_loss, "rows": [0, 1],
                 "abs_diff": abs(engine_loss - export_loss), "isolation": isolation.name,
                 "tied_embeddings": _tied(exported)}
        (export_dir / "export_check.json").write_text(json.dumps(check, indent=2))
        if record is not None:  # (the adapter with its base is the same trained model: evaluated, it is checked alike)
            for d in (export_dir, export_dir / "adapter"):
                if d.is_dir():
                    (d / "itune_training.json").write_text(json.dumps(record, indent=2))
        if check["abs_diff"] > 1e-4:
            raise RuntimeError(f"export {export_dir} does not reproduce the engine: {check}")
    engine.train()
    tdist.barrier()
    return export_dir


@dataclass
class Setup:
    """Everything a training loop needs, built once by :func:`setup`."""

    cfg: RunConfig
    env: "dist.DistEnv"
    rank: int
    world: int
    engine: object
    scheduler: object
    plan: BatchPlan
    train_rows: PackedRows
    eval_rows: PackedRows | None
    hf_config: object
    tokenizer_dir: Path
    out: Path
    ckpt_dir: Path
    resume_state: dict | None
    log: RankZeroLog
    keepalive: object
    vocab_resize: dict | None = None  # rows before/after and per-rank partition sizes, when embeddings were resized
    isolation: Isolation = POSITION_IDS  # how packed rows are kept apart (chosen by the probe)
    probe: dict | None = None  # the isolation probe's result (start-up log, train_summary.json)
    aux: RouterAux | None = None  # the router load-balancing loss of a MoE model
    loss_tile_tokens: int | None = None  # the tiled loss's positions per tile; None: from the full logits
    loss_kernel: str = "itune"  # the tiled loss's kernel (itune.loss.LOSS_KERNELS)
    sp: "sequence_parallel.SequenceParallel | None" = None  # this rank's place in sequence parallelism
    model_info: dict = field(default_factory=dict)  # family, attention, tied embeddings, MoE leaf modules
    skipped_at: list = field(default_factory=list)  # optimizer steps skipped as non-finite (1-based), resumes included
    lock: DirLock | None = None  # rank 0: output_dir/.itune.lock, held for the whole run (itune.lock)


#: Settings a resumed run may change: how it runs, not what it trains (model.* and optim.* are all fixed but
#: these, and so are train.seed and data.train_split; the batch and step count have their own checks).
RESUME_FREE_MODEL_KEYS = ("gradient_checkpointing", "attn_implementation", "tiled_mlp", "activation_offload")


def resume_config_changes(old: dict, new: dict) -> list[str]:
    """The run-defining settings (``model``, ``optim``, ``train.seed``, ``data.train_split``) that differ between
    a checkpoint's saved config ``old`` and ``new`` (both :func:`~itune.config.to_dict` trees), one line each.
    Keys the checkpoint does not have (settings added in a later version) are not compared."""
    out: list[str] = []

    def walk(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                if k in b:
                    walk(a[k], b[k], f"{where}.{k}")
        elif a != b:
            out.append(f"{where}: checkpoint {a!r}, this config {b!r}")

    for section in ("model", "optim"):
        o = {k: v for k, v in old.get(section, {}).items() if k not in RESUME_FREE_MODEL_KEYS or section != "model"}
        if section == "model" and new["model"].get("pretrained"):
            o.pop("architecture", None)  # unused with a checkpoint (earlier versions saved the default there)
        walk(o, new[section], section)
    for section, key in (("train", "seed"), ("data", "train_split")):
        if key in old.get(section, {}):
            walk(old[section][key], new[section][key], f"{section}.{key}")
    return out


def _resume_state(cfg: RunConfig, ckpt_dir: Path, plan: BatchPlan) -> dict | None:
    """Reads the trainer state of ``latest`` (before the engine exists: a world-size change needs the engine
    configured for DeepSpeed's universal checkpoint).

    Raises:
        ConfigError: the checkpoint used another global batch (rows per optimizer step) or another schedule
            length, so the same global position cannot be continued; the config changes a run-defining setting
            (:func:`resume_config_changes`); ``latest`` names a missing, incomplete or damaged checkpoint.
    """
    tag = checkpoint.latest_tag(ckpt_dir) if cfg.checkpoint.resume else None
    if tag is None:
        return None
    state_file = ckpt_dir / tag / "itune_state.json"
    others = sorted(p.name for p in ckpt_dir.glob("global_step*") if (p / "itune_state.json").is_file())
    fix = (f"point {ckpt_dir / 'latest'} at a complete checkpoint ({', '.join(others)}: write its name into the "
           "file) or use another output_dir" if others else "use another output_dir to start afresh")
    try:
        state = json.loads(state_file.read_text())
        state["config"]["train"]["micro_batch_size"]  # noqa: B018  (the keys every resume reads)
    except FileNotFoundError:
        raise ConfigError(f"{ckpt_dir / 'latest'} names {tag!r}, but {state_file} does not exist (a missing or "
                          f"incomplete checkpoint); {fix}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{state_file}: damaged ({type(e).__name__}: {e}); {fix}") from None
    changed = resume_config_changes(state["config"], to_dict(cfg))
    if changed:
        raise ConfigError(f"{ckpt_dir / tag}: this config changes what the run trains, which a resume cannot "
                          "continue:\n  - " + "\n  - ".join(changed) + "\nResume with the values the checkpoint "
                          "was trained with, or use another output_dir to start a new run")
    old = state["config"]["train"]
    old_rows = (old["micro_batch_size"] * old["gradient_accumulation_steps"] * state["world_size"]
                // old.get("sequence_parallel_size", 1))
    if old_rows != plan.global_rows_per_step:
        per_acc = plan.micro_batch_size * plan.world_size
        hint = (f"set train.gradient_accumulation_steps={old_rows // per_acc}" if old_rows % per_acc == 0
                else "choose micro_batch_size x gradient_accumulation_steps x ranks equal to it")
        raise ConfigError(
            f"{ckpt_dir / tag}: trained with {old_rows} rows per optimizer step ({old['micro_batch_size']} micro x "
            f"{old['gradient_accumulation_steps']} accumulation x {state['world_size']} ranks); this run has "
            f"{plan.global_rows_per_step}. To continue it, {hint} (or use another output_dir to start afresh)")
    if state.get("total_steps", plan.total_steps) != plan.total_steps:
        raise ConfigError(f"{ckpt_dir / tag}: the run was planned for {state['total_steps']} optimizer steps, this "
                          f"config gives {plan.total_steps}; the learning-rate schedule would change. Use the same "
                          "train.epochs / train.max_steps, or another output_dir")
    state["tag"] = tag
    return state


def output_dir_problem(output_dir: str | Path) -> str | None:
    """Why ``output_dir`` cannot be created or written, in one line naming it (None when it can): an existing
    directory must take a new file, else its nearest existing parent must be a directory that takes a new
    directory. Probes with uniquely named temporary entries removed at once, so every rank may run it at the same
    time and nothing is left behind (the directory itself is created by rank 0 in :func:`setup`)."""
    import os
    import tempfile

    from itune.config import RELATIVE_PATHS

    out = Path(output_dir)
    note = "" if out.is_absolute() else f" ({RELATIVE_PATHS.format(cwd=Path.cwd())})"
    for parent in (out, *out.parents):
        if parent.is_symlink() and not parent.exists():
            return f"output_dir: {parent} is a broken symbolic link{note}"
        if parent.exists():
            break
    if not parent.is_dir():
        return f"output_dir: {parent} exists and is not a directory{note}"
    try:
        if parent == out:
            fd, tmp = tempfile.mkstemp(dir=out, prefix=".itune-write-check-")
            os.close(fd)
            os.unlink(tmp)
        else:
            os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".itune-write-check-"))
    except OSError as e:
        what = (f"is not writable ({e.strerror or e} when creating a file in it)" if parent == out else
                f"cannot be created ({e.strerror or e} when creating a directory in {parent})")
        return f"output_dir: {out} {what}{note}; choose a directory you can write to"
    return None


def preflight(cfg: RunConfig) -> None:
    """Checks that need no process group: the launch environment, the paths of the run config (``ds_config``,
    ``data.path`` and ``model.pretrained`` exist, relative ones read from the current directory;
    ``output_dir`` can be created and written), the data manifest, the DeepSpeed JSON, the model section and the
    checkpoint's safetensors headers.
    Run by the launcher entry point before any distributed work starts.

    Raises:
        ConfigError / ManifestError: listing the problems.
    """
    from itune.config import path_not_found
    from itune.model import check_model_config

    dist.resolve()  # a mis-launch is reported first (DistEnvError names the variable)
    problems = check_model_config(cfg)
    if not Path(cfg.ds_config).is_file():
        problems.append(path_not_found("ds_config", cfg.ds_config))
    if not Path(cfg.data.path).exists():
        problems.append(path_not_found("data.path", cfg.data.path))
    if (problem := output_dir_problem(cfg.output_dir)) is not None:
        problems.append(problem)
    if problems:
        raise ConfigError("invalid run config:\n  - " + "\n  - ".join(problems))
    manifest = shards.read_manifest(cfg.data.path)  # its integrity record is checked here
    check_train_split(cfg, manifest)
    if mismatch := shards.tokenizer_problems(manifest):
        raise ManifestError(f"{Path(cfg.data.path) / shards.MANIFEST}: {'; '.join(mismatch)}; the tokenizer changed "
                            "after preparation: prepare the data again")
    vocab = manifest["tokenizer"]["vocab_size"]
    try:
        embedding_rows(model_config(cfg, vocab).vocab_size, vocab, cfg.model)
    except ConfigError as e:
        raise ConfigError(f"invalid run config:\n  - {e}") from None
    build_ds_config(cfg.ds_config, BatchPlan(1, 1, cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps,
                                             1, 1, None), cfg.optim, 64, False)


def lock_output_dir(out: Path, rank: int, world: int) -> DirLock | None:
    """One run per ``output_dir``: rank 0 takes ``out/.itune.lock`` (:func:`itune.lock.hold_dir_lock`), then the
    outcome is broadcast. Every rank must call it.

    Returns:
        The lock on rank 0 (keep it for the whole run), None on the other ranks.

    Raises:
        ConfigError: on every rank, the same line, when another process holds the directory.
    """
    return hold_dir_lock_rank0(out, "training", rank, world, choose="output_dir")


def setup(cfg: RunConfig) -> Setup:
    """Distributed init, data, model under ZeRO-3, optimizer, schedule, engine, and (if any) the resume state.

    Raises:
        ConfigError / ManifestError: before any model is built, for bad configs or mismatched data.
    """
    env = dist.resolve()
    dist.export_for_torch(env)
    cuda = init_distributed(cfg.train.collective_timeout_s)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    rank, world = tdist.get_rank(), tdist.get_world_size()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    out = Path(cfg.output_dir)
    lock = lock_output_dir(out, rank, world)  # before anything is written there; a refusal stops every rank
    log = RankZeroLog(rank, out)
    log.print(dist.startup_line(env))

    # data: verified manifest, memory-mapped rows
    manifest = shards.read_manifest(cfg.data.path)
    tokenizer_dir = check_data(cfg, manifest)
    if cfg.data.verify_checksums:
        verify_checksums(cfg, manifest, rank, world)
    log.start_trackers(cfg, manifest)  # before the model: a tracker that cannot start stops the run here
    seq_len, pad_id = manifest["seq_len"], manifest["tokenizer"]["pad_id"]
    train_rows = PackedRows(shards.open_split(cfg.data.path, cfg.data.train_split), seq_len, pad_id)
    if len(train_rows) == 0:
        raise ConfigError(f"{cfg.data.path}: the training split has no rows")
    eval_rows = (PackedRows(shards.open_split(cfg.data.path, cfg.data.eval_split), seq_len, pad_id)
                 if cfg.data.eval_split in manifest["splits"] else None)
    sp_size = cfg.train.sequence_parallel_size
    if early := sequence_parallel.problems(sp_size, world, seq_len):  # before the model: world and seq_len
        raise ConfigError("; ".join(early))
    plan = BatchPlan(len(train_rows), seq_len, cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps,
                     world // sp_size, cfg.train.epochs, cfg.train.max_steps, sp_size)
    log.print(plan.describe())
    ckpt_dir = out / "checkpoints"
    resume_state = _resume_state(cfg, ckpt_dir, plan)

    # model under ZeRO-3: partitioned at construction
    torch.manual_seed(cfg.train.seed)
    hf_config = model_config(cfg, manifest["tokenizer"]["vocab_size"])
    rows = embedding_rows(hf_config.vocab_size, manifest["tokenizer"]["vocab_size"], cfg.model)
    token_ids = {k.replace("_id", "_token_id"): manifest["tokenizer"][k] for k in ("bos_id", "eos_id", "pad_id")}
    if not cfg.model.pretrained:  # a checkpoint is built with its own ids: pad_token_id fixes the embedding's
        for k, v in token_ids.items():  # padding_idx, whose row gets no gradient (the data's pad may be its EOS)
            setattr(hf_config, k, v)
    bf16 = use_bf16(cfg.model, cuda)
    ds_config = build_ds_config(cfg.ds_config, plan, cfg.optim, hf_config.hidden_size, bf16)
    if resume_state is not None and resume_state["world_size"] != world:
        ds_config["checkpoint"] = {"load_universal": True}
    attn, attn_reason = attention(cfg, hf_config, cuda)
    sp, mpu = None, None
    if sp_size > 1:
        problems = sequence_parallel.problems(sp_size, world, seq_len, hf_config, attn)
        if problems:
            raise ConfigError("; ".join(problems))
        mpu = sequence_parallel.register(hf_config, attn, sp_size, cfg.train.micro_batch_size, seq_len)
        sp = sequence_parallel.SequenceParallel(sp_size, mpu.get_sequence_parallel_rank())
    keepalive = HfDeepSpeedConfig(ds_config)  # transformers builds under zero.Init while this object lives
    model = build_model(cfg, hf_config, bf16, attn)
    old_rows = resize_embeddings(model, rows, ds_config)  # before the optimizer: it holds the new parameters
    hf_config.vocab_size = rows  # the export's config
    for k, v in token_ids.items():  # the data's ids, for the export's generation config
        setattr(hf_config, k, v)
    if cfg.model.tiled_mlp and apply_tiled_mlp(model) == 0:
        raise ConfigError(f"model.tiled_mlp: {type(model).__name__} has no gated MLP (gate_proj / up_proj / "
                          "down_proj) to tile; set model.tiled_mlp=false")
    if cfg.model.lora is not None:
        model = apply_lora(model, cfg.model.lora, cfg.train.seed)
    leaves = moe_leaf_classes(model)
    if leaves and cfg.model.zero3_leaf_modules and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, leaves)  # ZeRO-3 gathers an expert block at once (before initialize)
    aux = router_aux(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, plan.total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config, mpu=mpu)
    engine.itune_activation_offload = cfg.model.activation_offload  # read by train_step (CUDA only: preflight)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    local = sum(p.numel() if getattr(p, "ds_tensor", None) is None else p.ds_tensor.numel()
                for p in engine.module.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    model_info = {"model_type": getattr(hf_config, "model_type", None), "class": type(engine.module).__name__,
                  "attn_implementation": attn, "attn_reason": attn_reason, "tied_embeddings": _tied(engine.module),
                  "parameters": n_params, "zero3_leaf_modules": leaves if cfg.model.zero3_leaf_modules else [],
                  "router_aux_loss_coef": aux.coef if aux is not None else None, "trainable_parameters": trainable,
                  "lora": dataclasses.asdict(cfg.model.lora) if cfg.model.lora is not None else None}
    log.print(f"model: {model_info['class']} ({model_info['model_type']}), {n_params:,} parameters, {trainable:,} "
              f"trainable{' (LoRA r=%d)' % cfg.model.lora.r if cfg.model.lora is not None else ''} ({local:,} held "
              f"by rank 0), bf16={bf16}, attention={attn} ({attn_reason}), tied embeddings="
              f"{model_info['tied_embeddings']}, gradient checkpointing={cfg.model.gradient_checkpointing}"
              + (f", router aux loss x {aux.coef}" if aux is not None else "")
              + (f", ZeRO-3 leaf modules {leaves}" if model_info["zero3_leaf_modules"] else ""))
    packed = manifest.get("packing", "best_fit_decreasing") != "none"
    if sp is not None:  # whole-row probes: Ulysses attention steps aside in eval mode
        engine.eval()
    probe = probe_isolation(engine.module, min(rows, manifest["tokenizer"]["vocab_size"]), packed=packed)
    log.print(f"packed-row isolation: {probe['method'] or 'none'} ("
              + "; ".join(f"{t['method']}: " + (t["error"] if "error" in t else
                                                 f"leak {t['leak']:.2g}, packed vs alone {t['diff_later']:.2g}, "
                                                 f"tolerance {t['tolerance']:.2g}") for t in probe["tried"])
              + f"; {probe['seconds']:.1f} s)" + ("" if packed else "; the data is not packed"))
    if probe["isolation"] is None:
        raise ConfigError(refusal_message(probe, cfg.data.path))
    if sp is not None and probe["isolation"].methods != ("position_ids",):
        raise ConfigError(f"train.sequence_parallel_size {sp_size}: this model keeps packed examples apart with "
                          f"{probe['isolation'].name}, which the sequence-parallel attention does not carry; use "
                          "train.sequence_parallel_size=1 (or unpacked data: itune-data prepare --no-pack)")
    tile, kernel = None, "itune"
    if cfg.train.tiled_loss:
        tile, kernel, lines = choose_loss(engine, probe["isolation"], min(rows, manifest["tokenizer"]["vocab_size"]),
                                          cfg.train.loss_tile_tokens, cfg.train.liger_loss)
        for line in lines:
            log.print(line)
    else:
        log.print("loss: from the full logits (train.tiled_loss=false)")
    model_info["loss_tile_tokens"] = tile
    model_info["loss_kernel"] = kernel if tile else None
    model_info["sequence_parallel_size"] = sp_size
    if sp is not None:
        engine.train()
        log.print(f"sequence parallelism: {sp_size} ranks per row (Ulysses all-to-all attention, per-example "
                  f"causal masks from position_ids), {world // sp_size} data-parallel groups")
    vocab_resize = None
    if old_rows is not None:
        vocab_resize = {"tokenizer_vocab_size": manifest["tokenizer"]["vocab_size"], "old_rows": old_rows,
                        "rows": rows, "multiple_of": cfg.model.pad_vocab_size_to_multiple_of,
                        **embedding_partitions(engine.module, rank, world)}
        log.print(f"embeddings resized for tokenizer {tokenizer_dir} ({vocab_resize['tokenizer_vocab_size']} "
                  f"tokens): {old_rows} -> {rows} rows (model.pad_vocab_size_to_multiple_of="
                  f"{vocab_resize['multiple_of']}), rows {old_rows}..{rows - 1} set to the mean of the old rows; "
                  f"parameters held per rank: input {vocab_resize['input_per_rank']}, output "
                  f"{vocab_resize['output_per_rank']}")
    return Setup(cfg, env, rank, world, engine, scheduler, plan, train_rows, eval_rows, hf_config, tokenizer_dir,
                 out, ckpt_dir, resume_state, log, keepalive, vocab_resize, isolation=probe["isolation"],
                 probe={k: v for k, v in probe.items() if k != "isolation"}, aux=aux, model_info=model_info,
                 loss_tile_tokens=tile, loss_kernel=kernel, sp=sp,
                 lock=lock)


def _tied(module) -> bool:
    """Whether the output embedding is the input embedding (tied weights)."""
    out = module.get_output_embeddings()
    return out is not None and out.weight is module.get_input_embeddings().weight


def embedding_partitions(module, rank: int, world: int) -> dict:
    """Elements of the input and output embedding weights held by each rank (ZeRO-3 partitions; the whole
    tensor on every rank otherwise). Every rank must call it (all-reduce).

    Returns:
        ``{"input_per_rank": [world ints], "output_per_rank": [world ints] or None}``.
    """
    out = module.get_output_embeddings()
    weights = [module.get_input_embeddings().weight] + ([out.weight] if out is not None else [])
    held = torch.zeros(len(weights), world, dtype=torch.int64)
    for i, w in enumerate(weights):
        held[i, rank] = w.numel() if getattr(w, "ds_tensor", None) is None else w.ds_tensor.numel()
    tdist.all_reduce(held)
    return {"input_per_rank": held[0].tolist(), "output_per_rank": held[1].tolist() if out is not None else None}


@dataclass
class StepResult:
    loss: float  # sum CE of the step (all ranks) / trained tokens of the step (all ranks)
    target_tokens: int  # trained tokens of the step, all ranks
    real_tokens: int  # non-padding tokens of the step, all ranks
    nonfinite_loss_ranks: list  # ranks whose loss of the step is inf or nan (same list on every rank)
    skipped_ranks: list  # ranks on which DeepSpeed skipped the update (non-finite gradient norm); all or none
    aux_loss: float | None = None  # router load-balancing loss of the step (token-weighted, before its coefficient)


def train_step(engine, batches: list, world: int, before_optimizer_step=None, *,
               isolation: Isolation = POSITION_IDS, aux: RouterAux | None = None,
               tile_tokens: int | None = None, sp=None, kernel: str = "itune") -> StepResult:
    """One optimizer step over this rank's micro-batches (forward, backward, DeepSpeed step per micro-batch).

    Each micro-batch backpropagates ``sum_CE x accumulation x world / N`` with N the global count of trained
    tokens of the step, so after DeepSpeed's 1/accumulation scaling and mean over ranks the gradient is that of
    ``sum CE / N`` over the whole step, whatever the split (see :mod:`itune.loss`).

    MoE models (``aux``) add the router load-balancing loss with the model's coefficient c:
    ``loss_step = sum CE / N + c x sum_m (T_m / T) x aux_m``, with ``aux_m`` the model's own
    ``load_balancing_loss_func`` over the real (non-padding) tokens of micro-batch m (all layers pooled), T_m its
    real tokens and T the real tokens of the step over all micro-batches and ranks: a token-weighted mean, so a
    micro-batch weighs by its tokens as in the cross-entropy, and a filler micro-batch of padding weighs 0. Each
    micro-batch backpropagates ``(sum_CE_m / N + c x T_m x aux_m / T) x accumulation x world``. The returned
    ``loss`` stays the token cross-entropy (runs with and without the aux loss compare); ``aux_loss`` is
    ``sum_m T_m x aux_m / T``.

    DeepSpeed's ZeRO optimizers (stages 1-3, fp32 and bf16) skip the update when the global gradient norm is
    inf or nan: gradients are dropped, weights and optimizer state stay as they are, the lr scheduler is not
    stepped and ``engine.skipped_steps`` grows. A non-finite loss makes non-finite gradients, so it takes the
    same path. One all-reduce gives every rank the loss, the token counts and each rank's non-finite flags.

    Args:
        batches: this rank's micro-batches (:class:`itune.loader.Batch`), ``gradient_accumulation_steps`` of them.
        before_optimizer_step: called after the last backward and before the optimizer step (tests read
            gradients there).
        isolation: how packed rows are kept apart (:func:`itune.families.probe_isolation`).
        aux: the router auxiliary loss of a MoE model (:func:`itune.families.router_aux`), or None.
        tile_tokens: the tiled loss's positions per tile (:func:`itune.loss.packed_loss_sum`); None: the loss
            from the full logits.
        sp: sequence parallelism (:class:`itune.sequence_parallel.SequenceParallel`): each rank computes its shard
            of the rows; token counts and sums are of the shards, so every trained token counts once.
        kernel: the tiled loss's kernel (:data:`itune.loss.LOSS_KERNELS`).
    """
    gas = len(batches)
    rank = tdist.get_rank()
    offload = getattr(engine, "itune_activation_offload", False)
    skipped_before = engine.skipped_steps
    reals = [b.real_tokens if sp is None else int(sp.shard(b.real_mask).sum()) for b in batches]
    counts = torch.tensor([sum(count_targets(b.labels, b.position_ids, sp) for b in batches), sum(reals)],
                          dtype=torch.float64)
    tdist.all_reduce(counts)
    global_targets, global_real = float(counts[0]), float(counts[1])
    scale = gas * world / max(global_targets, 1.0)
    loss_sum, aux_sum, real = 0.0, 0.0, 0
    for i, b in enumerate(batches):
        with aux.capture(engine.module) if aux is not None else contextlib.nullcontext([]) as router_logits, \
                torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
            s = packed_loss_sum(engine, b.input_ids, b.position_ids, b.labels, isolation, tile_tokens, sp, kernel)
        objective = s * scale
        if aux is not None and reals[i] > 0:
            a = aux.loss(router_logits, b.real_mask if sp is None else sp.shard(b.real_mask))
            weight = reals[i] / global_real
            objective = objective + aux.coef * weight * gas * world * a
            aux_sum += float(a.detach()) * weight
        engine.backward(objective)
        if i == gas - 1 and before_optimizer_step is not None:
            before_optimizer_step()
        engine.step()
        loss_sum += float(s.detach())
        real += reals[i]
    t = torch.zeros(3 + 2 * world, dtype=torch.float64)  # [loss sum, real, aux, (loss non-finite, skipped) x rank]
    t[0], t[1], t[2] = loss_sum, real, aux_sum
    t[3 + 2 * rank] = not math.isfinite(loss_sum)
    t[4 + 2 * rank] = engine.skipped_steps > skipped_before
    tdist.all_reduce(t)
    flags = t[3:].view(world, 2) > 0
    return StepResult(float(t[0]) / max(global_targets, 1.0), int(global_targets), int(t[1]),
                      flags[:, 0].nonzero().flatten().tolist(), flags[:, 1].nonzero().flatten().tolist(),
                      float(t[2]) if aux is not None else None)


def check_nonfinite(r: StepResult, step: int, world: int, skipped_at: list, allowed: int,
                    ckpt_dir: Path) -> str | None:
    """What was non-finite in optimizer step ``step`` (1-based), which DeepSpeed skipped (the step is appended
    to ``skipped_at``); None for a finite step. Every rank reaches the same answer from the all-reduced flags
    of ``r``.

    Raises:
        FloatingPointError: a non-finite step beyond ``allowed`` (``train.skip_nonfinite_steps``) skipped steps,
            or one whose update DeepSpeed applied (a non-finite loss with a finite gradient norm: the weights
            already changed). Names the step, the ranks and the last good checkpoint.
    """
    if not r.nonfinite_loss_ranks and not r.skipped_ranks:
        return None
    what = (f"non-finite loss {r.loss} at optimizer step {step} (rank {', '.join(map(str, r.nonfinite_loss_ranks))})"
            if r.nonfinite_loss_ranks else f"non-finite gradient norm at optimizer step {step} (loss {r.loss:.4f})")
    last = f"last good checkpoint: {checkpoint.latest_tag(ckpt_dir)} in {ckpt_dir}"
    if len(r.skipped_ranks) < world:
        raise FloatingPointError(f"{what}; DeepSpeed applied the update (ranks {r.skipped_ranks} skipped it), so "
                                 f"the step cannot be skipped; {last}")
    skipped_at.append(step)
    if len(skipped_at) > allowed:
        raise FloatingPointError(f"{what}; {len(skipped_at)} non-finite step(s) {skipped_at}, more than "
                                 f"train.skip_nonfinite_steps={allowed} allows; {last}")
    return what


def generate_and_score(s: Setup, step: int) -> dict:
    """Held-out generation on a subset (``train.generate_max_instances`` per task) with the engine's model,
    scored with the official protocol; results in ``output_dir/eval/step{step}/`` and TensorBoard."""
    from itune.eval.run import evaluate

    res = evaluate(s.engine.module, s.cfg.data.path, s.out / "eval" / f"step{step}", split=s.cfg.data.eval_split,
                   max_instances=s.cfg.train.generate_max_instances,
                   max_new_tokens=s.cfg.train.generate_max_new_tokens,
                   synced_gpus=s.engine.zero_optimization_partition_weights(), model_name=str(s.out), step=step,
                   training=training_record(s, step))["results"]
    s.engine.train()
    s.log.scalars(step, {"rougeL": res["rougeL_default_track"], "exact_match": res["exact_match_default_track"]},
                  kind="heldout_generation")
    return res


def _trainer_state(s: Setup, step: int) -> dict:
    """The ``itune_state.json`` of a checkpoint. Besides the config as given it records the absolute paths the
    run read (``paths``) and what it trained on (``training``, as :func:`training_record`), so a checkpoint can
    be evaluated from another directory, or with a copy of the data (:func:`itune.eval.run.engine_from_run`)."""
    import deepspeed

    epoch, in_epoch = divmod(step, s.plan.steps_per_epoch)
    paths = {k: str(Path(v).resolve()) for k, v in (("ds_config", s.cfg.ds_config), ("data.path", s.cfg.data.path),
                                                     ("model.pretrained", s.cfg.model.pretrained)) if v}
    return {"global_step": step, "epoch": epoch, "step_in_epoch": in_epoch, "total_steps": s.plan.total_steps,
            "seed": s.cfg.train.seed, "world_size": s.world, "config": to_dict(s.cfg), "skipped_at": s.skipped_at,
            "manifest_hash": shards.manifest_hash(s.cfg.data.path), "paths": paths,
            "training": training_record(s, step),
            "versions": {"itune": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__}}


def _save(s: Setup, step: int, export: bool = False) -> None:
    checkpoint.save(s.engine, s.ckpt_dir, step, _trainer_state(s, step), s.cfg.checkpoint.keep_last, s.rank)
    if export:
        export_verified(s.engine, s.hf_config, s.tokenizer_dir, s.ckpt_dir / f"global_step{step}" / "hf",
                        s.train_rows, s.rank, training_record(s, step), s.isolation)


def _resume(s: Setup) -> int:
    """Loads ``latest`` (converting it to a universal checkpoint first when the world size changed); returns the
    optimizer step to continue from."""
    st = s.resume_state
    if st is None:
        return 0
    if st["manifest_hash"] != shards.manifest_hash(s.cfg.data.path):
        raise ManifestError(f"{s.ckpt_dir}: checkpoint was trained on other data (manifest hash differs); use "
                            "the same data or another output_dir")
    tag = st["tag"]
    if st["world_size"] != s.world:
        tag = checkpoint.to_universal(s.ckpt_dir, tag, s.rank)
    try:
        checkpoint.load(s.engine, s.ckpt_dir, tag)
    except Exception as e:  # a truncated or damaged file: name it and the way out
        raise ConfigError(f"{s.ckpt_dir / tag}: cannot be loaded ({type(e).__name__}: {str(e)[:300]}); point "
                          f"{s.ckpt_dir / 'latest'} at an earlier global_stepN directory or use another "
                          "output_dir") from e
    s.skipped_at[:] = st.get("skipped_at", [])
    s.log.print(f"resumed from {s.ckpt_dir / tag} at optimizer step {st['global_step']} (epoch {st['epoch']}, "
                f"step in epoch {st['step_in_epoch']}; saved with {st['world_size']} ranks, now {s.world})")
    return st["global_step"]


def run(cfg: RunConfig, launcher: list | None = None) -> dict:
    """Trains per ``cfg``; returns a summary (also ``output_dir/train_summary.json``).

    Args:
        launcher: the launcher processes to watch (:func:`itune.preemption.launcher_chain`), best recorded when
            the process starts (``launcher/train.py`` does); None: recorded now.

    Exits the process with :data:`EXIT_PREEMPTED` after saving a checkpoint on SIGTERM/SIGUSR1.
    """
    # first: a signal or a launcher gone during start-up (model loading) is honoured at the first step boundary
    preempt = PreemptionFlag(orphan_timeout_s=cfg.train.orphan_timeout_s)
    preempt.watch(launcher_chain(dist.resolve().source) if launcher is None else launcher)
    s = setup(cfg)
    engine, plan, log, rank = s.engine, s.plan, s.log, s.rank
    start_step = _resume(s)
    if cfg.checkpoint.export_initial and start_step == 0:
        export_verified(engine, s.hf_config, s.tokenizer_dir, s.out / "export_step0", s.train_rows, rank,
                        training_record(s, 0), s.isolation)
    fpt = flops_per_token(s.hf_config, plan.seq_len)
    losses_path = s.out / "losses.jsonl"
    if rank == 0:
        keep = [x for x in (losses_path.read_text().splitlines() if losses_path.exists() else [])
                if json.loads(x)["step"] <= start_step]  # steps after the checkpoint are redone
        shards.atomic_write_text(losses_path, "".join(x + "\n" for x in keep))
    # rank 0 only; None hides the bar when the output is not a terminal (logs stay readable)
    progress = tqdm(total=plan.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                    disable=True if rank != 0 or not cfg.train.progress_bar else None)
    for step in range(start_step, plan.total_steps):
        t0 = time.time()
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        dp_rank = rank // plan.sequence_parallel_size  # an SP group's ranks read the same rows
        batches = [s.train_rows.rows(ids) for ids in step_row_ids(plan, cfg.train.seed, epoch, step_in_epoch, dp_rank)]
        lr = s.scheduler.get_last_lr()[0]  # the lr this step applies (the scheduler steps inside engine.step)
        r = train_step(engine, batches, s.world, isolation=s.isolation, aux=s.aux, tile_tokens=s.loss_tile_tokens,
                       kernel=s.loss_kernel,
                       sp=s.sp)
        done = step + 1
        skipped = check_nonfinite(r, done, s.world, s.skipped_at, cfg.train.skip_nonfinite_steps, s.ckpt_dir)
        dt = time.time() - t0
        grad_norm = engine.get_global_grad_norm()
        record = {"loss": r.loss, "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "target_tokens": r.target_tokens, "real_tokens_per_s": r.real_tokens / dt,
                  "padding_fraction": 1 - r.real_tokens / plan.tokens_per_step, "step_time_s": dt,
                  "model_flops_per_s": fpt * r.real_tokens / dt, "memory_gb": peak_memory_gb(),
                  "skipped_steps": len(s.skipped_at)}
        if r.aux_loss is not None:
            record["aux_loss"] = r.aux_loss
        if cfg.train.peak_flops_per_s:
            record["mfu"] = record["model_flops_per_s"] / (cfg.train.peak_flops_per_s * s.world)
        if rank == 0:
            with open(losses_path, "a") as f:
                line = ({"step": done, "loss": r.loss} if not skipped else
                        {"step": done, "loss": r.loss if math.isfinite(r.loss) else None, "skipped": True})
                if r.aux_loss is not None:
                    line["aux_loss"] = r.aux_loss
                f.write(json.dumps(line) + "\n")
        progress.update(1)
        if skipped:
            log.print(f"step {done}/{plan.total_steps} skipped: {skipped}; weights, optimizer state and lr schedule "
                      f"unchanged (skipped steps {s.skipped_at}, at most {cfg.train.skip_nonfinite_steps} allowed)")
        if skipped or done % cfg.train.log_every == 0 or done == plan.total_steps:
            log.scalars(done, record)
            log.print(f"step {done}/{plan.total_steps} loss {r.loss:.4f}"
                      + (f" aux_loss {r.aux_loss:.4f}" if r.aux_loss is not None else "")
                      + f" lr {record['lr']:.3g} grad_norm {record['grad_norm']:.3f} real tokens/s "
                        f"{record['real_tokens_per_s']:.0f} ({dt:.2f} s)")
        if s.eval_rows is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0:
            el, _ = evaluate_loss(engine, s.eval_rows, rank, s.world, cfg.train.micro_batch_size, s.isolation,
                                  s.loss_tile_tokens)
            log.scalars(done, {"loss": el}, kind="heldout")
            log.print(f"step {done} held-out loss {el:.4f}")
        if s.eval_rows is not None and cfg.train.generate_every and done % cfg.train.generate_every == 0:
            res = generate_and_score(s, done)
            log.print(f"step {done} held-out generation: ROUGE-L {res['rougeL_default_track']:.4f} "
                      f"EM {res['exact_match_default_track']:.4f}")
        if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done < plan.total_steps:
            _save(s, done, export=cfg.checkpoint.export_checkpoints)
        if preempt.agreed():
            _save(s, done)
            log.print(f"preempted ({preempt.reason or 'another rank'}): checkpoint saved at optimizer step {done}; "
                      f"exiting with {EXIT_PREEMPTED}")
            log.close("KILLED")
            close_distributed()
            exit_process(EXIT_PREEMPTED)
    progress.close()

    summary = {"steps": plan.total_steps, "world_size": s.world, "batch": plan.describe(),
               "manifest_hash": shards.manifest_hash(cfg.data.path), "skipped_steps": len(s.skipped_at),
               "skipped_at": s.skipped_at, "model": s.model_info, "packed_isolation": s.probe}
    if s.vocab_resize is not None:
        summary["vocab_resize"] = s.vocab_resize
    if start_step < plan.total_steps or checkpoint.latest_tag(s.ckpt_dir) is None:
        _save(s, plan.total_steps)
    if s.eval_rows is not None:
        summary["heldout_loss"], _ = evaluate_loss(engine, s.eval_rows, rank, s.world, cfg.train.micro_batch_size,
                                                   s.isolation, s.loss_tile_tokens)
        log.scalars(plan.total_steps, {"loss": summary["heldout_loss"]}, kind="heldout")
        log.print(f"held-out loss {summary['heldout_loss']:.4f}")
    if cfg.checkpoint.export:
        summary["export"] = str(export_verified(engine, s.hf_config, s.tokenizer_dir, s.out / "export",
                                                s.train_rows, rank, training_record(s, plan.total_steps),
                                                s.isolation))
        log.print(f"export: {summary['export']}")
    if rank == 0:
        shards.atomic_write_text(s.out / "train_summary.json", json.dumps(summary, indent=2))
    log.close()
    if s.lock is not None:
        s.lock.release()
    engine.destroy()  # ZeRO-3's hooks and the optimizer's references go: the process groups can be freed
    return summary


def peak_memory_gb() -> float:
    """Peak memory of this process in GiB: CUDA max allocated, or the process's max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
