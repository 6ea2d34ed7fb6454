"""The training recipe: prepared rows -> DeepSpeed ZeRO-3 engine -> checkpoints -> verified HF export.

Reads top to bottom as the loop. Every rank runs this; only rank 0 prints and writes shared files.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from itune import __version__, checkpoint, dist
from itune.config import BatchPlan, RunConfig, to_dict
from itune.data import shards
from itune.data.tokenizer import TextTokenizer
from itune.errors import ConfigError, ManifestError
from itune.loader import PackedRows, step_row_ids
from itune.loss import count_targets, sum_cross_entropy
from itune.model import build_ds_config, build_model, flops_per_token, lr_lambda, model_config, param_groups, use_bf16

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved after SIGTERM/SIGUSR1; relaunch to resume


class RankZeroLog:
    """Console + TensorBoard + ``metrics.jsonl`` on rank 0; a no-op on every other rank."""

    def __init__(self, rank: int, out_dir: Path):
        self.on = rank == 0
        self.tb = None
        self.metrics = None
        if self.on:
            out_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            self.metrics = open(out_dir / "metrics.jsonl", "a")

    def print(self, *a):
        if self.on:
            print(*a, flush=True)

    def scalars(self, step: int, values: dict, kind: str = "train"):
        if not self.on:
            return
        for k, v in values.items():
            self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.metrics.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.metrics.flush()

    def close(self):
        if self.on:
            self.tb.close()
            self.metrics.close()


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; ranks agree on it with an all-reduce (MAX) at each step boundary."""

    def __init__(self):
        self.raised = False
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.raised = True

    def agreed(self) -> bool:
        t = torch.tensor([1 if self.raised else 0])
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())


def all_reduce_sum(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    tdist.all_reduce(t)
    return float(t.item())


def check_data(cfg: RunConfig, manifest: dict, tokenizer_dir: Path) -> None:
    """Refuses a run whose data was prepared with another tokenizer, or trains on a held-out task."""
    if cfg.data.train_split not in manifest["splits"]:
        raise ManifestError(f"{cfg.data.path}: no split {cfg.data.train_split!r} (have {sorted(manifest['splits'])})")
    if cfg.model.pretrained:
        fp = TextTokenizer.load(tokenizer_dir).fingerprint
        if fp != manifest["tokenizer"]["fingerprint"]:
            raise ManifestError(
                f"{cfg.data.path}: prepared with tokenizer {manifest['tokenizer']['path']} (fingerprint "
                f"{manifest['tokenizer']['fingerprint']}), but the model's tokenizer {tokenizer_dir} has "
                f"fingerprint {fp}; prepare the data again with the model's tokenizer")
    leaked = sorted(set(manifest["splits"][cfg.data.train_split]["tasks"]) & set(manifest.get("heldout_tasks", [])))
    if leaked:
        raise ManifestError(f"{cfg.data.path}: held-out tasks appear in the training split: {leaked}")


def evaluate_loss(engine, rows: PackedRows, rank: int, world: int, micro: int) -> tuple[float, int]:
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
            logits = engine(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
            total += float(sum_cross_entropy(logits, b.labels, b.position_ids))
            count += count_targets(b.labels, b.position_ids)
    engine.train()
    total, count = all_reduce_sum(total), int(all_reduce_sum(count))
    return (total / count if count else float("nan")), count


def fixed_batch_loss(model_fn, rows: PackedRows, n: int = 2) -> float:
    """Loss of rows 0..n-1 (sum CE / trained tokens): compares the engine with its export."""
    b = rows.rows(list(range(min(n, len(rows)))))
    with torch.no_grad():
        logits = model_fn(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
        return float(sum_cross_entropy(logits, b.labels, b.position_ids)) / max(1, count_targets(b.labels,
                                                                                               b.position_ids))


def export_verified(engine, hf_config, tokenizer_dir: Path, export_dir: Path, rows: PackedRows, rank: int) -> Path:
    """Gathers the weights (every rank), writes the HF export (rank 0), reloads it with ``from_pretrained`` and
    checks that its loss on a fixed batch equals the engine's (|diff| <= 1e-4); writes ``export_check.json``.

    Raises:
        RuntimeError: an empty or misshapen tensor, or a loss mismatch.
    """
    engine.eval()
    engine_loss = fixed_batch_loss(engine, rows)
    sd = checkpoint.gathered_state_dict(engine)
    if rank == 0:
        checkpoint.write_export(engine.module, sd, hf_config, tokenizer_dir, export_dir)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # load the export as a plain (unpartitioned) model
        export_loss = fixed_batch_loss(checkpoint.load_export(export_dir), rows)
        check = {"engine_loss": engine_loss, "export_loss": export_loss, "rows": [0, 1],
                 "abs_diff": abs(engine_loss - export_loss)}
        (export_dir / "export_check.json").write_text(json.dumps(check, indent=2))
        if check["abs_diff"] > 1e-4:
            raise RuntimeError(f"export {export_dir} does not reproduce the engine: {check}")
    engine.train()
    tdist.barrier()
    return export_dir


def run(cfg: RunConfig, config_path: str | None = None) -> dict:
    """Trains per ``cfg``; returns a summary (also ``output_dir/train_summary.json``).

    Exits the process with :data:`EXIT_PREEMPTED` after saving a checkpoint on SIGTERM/SIGUSR1.
    """
    env = dist.resolve()
    dist.export_for_torch(env)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    out = Path(cfg.output_dir)
    log = RankZeroLog(rank, out)
    log.print(dist.startup_line(env))
    preempt = PreemptionFlag()

    # data: verified manifest, memory-mapped rows
    manifest = shards.read_manifest(cfg.data.path)
    tokenizer_dir = Path(cfg.model.pretrained) if cfg.model.pretrained else Path(manifest["tokenizer"]["path"])
    check_data(cfg, manifest, tokenizer_dir)
    seq_len = manifest["seq_len"]
    pad_id = manifest["tokenizer"]["pad_id"]
    train_rows = PackedRows(shards.open_split(cfg.data.path, cfg.data.train_split), seq_len, pad_id)
    eval_rows = (PackedRows(shards.open_split(cfg.data.path, cfg.data.eval_split), seq_len, pad_id)
                 if cfg.data.eval_split in manifest["splits"] else None)
    plan = BatchPlan(len(train_rows), seq_len, cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps,
                     world, cfg.train.epochs, cfg.train.max_steps)
    if len(train_rows) == 0:
        raise ConfigError(f"{cfg.data.path}: the training split has no rows")
    log.print(plan.describe())

    # model under ZeRO-3: partitioned at construction
    torch.manual_seed(cfg.train.seed)
    hf_config = model_config(cfg, manifest["tokenizer"]["vocab_size"])
    for k in ("bos_id", "eos_id", "pad_id"):
        setattr(hf_config, k.replace("_id", "_token_id"), manifest["tokenizer"][k])
    bf16 = use_bf16(cfg.model, cuda)
    ds_config = build_ds_config(cfg.ds_config, plan, cfg.optim, hf_config.hidden_size, bf16)
    dschf = HfDeepSpeedConfig(ds_config)  # keep alive: transformers builds under zero.Init while it exists
    model = build_model(cfg, hf_config, bf16)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, plan.total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    local_params = sum(p.numel() if getattr(p, "ds_tensor", None) is None else p.ds_tensor.numel()
                       for p in engine.module.parameters())
    log.print(f"model: {n_params:,} parameters ({local_params:,} on rank 0), bf16={bf16}, "
              f"attention={cfg.model.attn_implementation}, gradient checkpointing={cfg.model.gradient_checkpointing}")

    # resume
    ckpt_dir = out / "checkpoints"
    start_step = 0
    if cfg.checkpoint.resume and checkpoint.latest_tag(ckpt_dir):
        state = checkpoint.load(engine, ckpt_dir)
        if state["manifest_hash"] != shards.manifest_hash(cfg.data.path):
            raise ManifestError(f"{ckpt_dir}: checkpoint was trained on other data (manifest hash differs)")
        start_step = state["global_step"]
        log.print(f"resumed from {ckpt_dir / checkpoint.latest_tag(ckpt_dir)} at optimizer step {start_step} "
                  f"(epoch {state['epoch']}, step in epoch {state['step_in_epoch']})")

    def trainer_state(step: int) -> dict:
        epoch, s = divmod(step, plan.steps_per_epoch)
        return {"global_step": step, "epoch": epoch, "step_in_epoch": s, "seed": cfg.train.seed,
                "world_size": world, "config": to_dict(cfg), "manifest_hash": shards.manifest_hash(cfg.data.path),
                "versions": {"itune": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__}}

    if cfg.checkpoint.export_initial and start_step == 0:
        export_verified(engine, hf_config, tokenizer_dir, out / "export_step0", train_rows, rank)
    fpt = flops_per_token(hf_config, seq_len)
    example_lengths = train_rows.table.column("example_lengths")
    losses_path = out / "losses.jsonl"
    if rank == 0 and start_step == 0:
        losses_path.unlink(missing_ok=True)
    for step in range(start_step, plan.total_steps):
        t0 = time.time()
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        micro_ids = step_row_ids(plan, cfg.train.seed, epoch, step_in_epoch, rank)
        batches = [train_rows.rows(ids) for ids in micro_ids]
        local_targets = sum(count_targets(b.labels, b.position_ids) for b in batches)
        global_targets = all_reduce_sum(local_targets)
        scale = plan.gradient_accumulation_steps * world / max(global_targets, 1.0)
        loss_sum = 0.0
        real_tokens = 0
        for b in batches:
            logits = engine(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
            s = sum_cross_entropy(logits, b.labels, b.position_ids)
            engine.backward(s * scale)
            engine.step()
            loss_sum += float(s.detach())
            real_tokens += sum(sum(example_lengths[r].as_py()) for r in b.row_ids if r >= 0)
        loss = all_reduce_sum(loss_sum) / max(global_targets, 1.0)
        real_tokens = all_reduce_sum(real_tokens)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at optimizer step {step + 1} (rank {rank}); last good "
                                     f"checkpoint: {checkpoint.latest_tag(ckpt_dir)} in {ckpt_dir}")
        dt = time.time() - t0
        done = step + 1
        grad_norm = engine.get_global_grad_norm()
        record = {"step": done, "loss": loss, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "target_tokens": int(global_targets), "real_tokens_per_s": real_tokens / dt,
                  "padding_fraction": 1 - real_tokens / plan.tokens_per_step, "step_time_s": dt,
                  "model_flops_per_s": fpt * real_tokens / dt}
        if rank == 0:
            with open(losses_path, "a") as f:
                f.write(json.dumps({"step": done, "loss": loss}) + "\n")
        if done % cfg.train.log_every == 0 or done == plan.total_steps:
            log.scalars(done, record)
            log.print(f"step {done}/{plan.total_steps} loss {loss:.4f} lr {record['lr']:.3g} "
                      f"grad_norm {record['grad_norm']:.3f} real tokens/s {record['real_tokens_per_s']:.0f} "
                      f"({dt:.2f} s)")
        if eval_rows is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0:
            el, _ = evaluate_loss(engine, eval_rows, rank, world, cfg.train.micro_batch_size)
            log.scalars(done, {"loss": el}, kind="heldout")
            log.print(f"step {done} held-out loss {el:.4f}")
        if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done < plan.total_steps:
            checkpoint.save(engine, ckpt_dir, done, trainer_state(done), cfg.checkpoint.keep_last, rank)
        if preempt.agreed():
            checkpoint.save(engine, ckpt_dir, done, trainer_state(done), cfg.checkpoint.keep_last, rank)
            log.print(f"preempted: checkpoint saved at optimizer step {done}; exiting with {EXIT_PREEMPTED}")
            log.close()
            tdist.barrier()
            sys.exit(EXIT_PREEMPTED)

    summary = {"steps": plan.total_steps, "world_size": world, "batch": plan.describe(),
               "manifest_hash": shards.manifest_hash(cfg.data.path)}
    if start_step < plan.total_steps or not checkpoint.latest_tag(ckpt_dir):
        checkpoint.save(engine, ckpt_dir, plan.total_steps, trainer_state(plan.total_steps),
                        cfg.checkpoint.keep_last, rank)
    if eval_rows is not None:
        summary["heldout_loss"], _ = evaluate_loss(engine, eval_rows, rank, world, cfg.train.micro_batch_size)
        log.scalars(plan.total_steps, {"loss": summary["heldout_loss"]}, kind="heldout")
        log.print(f"held-out loss {summary['heldout_loss']:.4f}")
    if cfg.checkpoint.export:
        summary["export"] = str(export_verified(engine, hf_config, tokenizer_dir, out / "export", train_rows, rank))
        log.print(f"export: {summary['export']}")
    if rank == 0:
        shards.atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2))
    log.close()
    del dschf
    return summary
