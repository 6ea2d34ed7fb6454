"""Single-process plain PyTorch training loop over itune's packed rows (no DeepSpeed, no process group): the
framework-overhead reference of bench/train_throughput.py (a benchmark helper, not a test).

    python bench/train_plain_loop.py OUT.json --config C.yaml data.path=PACKED [overrides]

Same model construction (:func:`itune.model.build_model`, gradient checkpointing), AdamW groups, schedule, seeded
row order and loss (sum CE / trained tokens of the step) as the trainer, and gradient clipping; one process, so the
run config's ``micro_batch_size x gradient_accumulation_steps`` rows make one optimizer step.
Writes OUT.json: per-step real (non-pad) tokens and wall time, and the process's max RSS.
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    import argparse

    import torch

    from itune.config import BatchPlan, load_config
    from itune.data import shards
    from itune.loader import PackedRows, step_row_ids
    from itune.loss import count_targets, sum_cross_entropy
    from itune.model import attention, build_model, lr_lambda, model_config, param_groups

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    cfg = load_config(a.config, a.overrides)
    m = shards.read_manifest(cfg.data.path)
    rows = PackedRows(shards.open_split(cfg.data.path, cfg.data.train_split), m["seq_len"], m["tokenizer"]["pad_id"])
    plan = BatchPlan(len(rows), m["seq_len"], cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, 1,
                     cfg.train.epochs, cfg.train.max_steps)
    print(plan.describe(), flush=True)
    torch.manual_seed(cfg.train.seed)
    hf_config = model_config(cfg, m["tokenizer"]["vocab_size"])
    for k in ("bos_id", "eos_id", "pad_id"):
        setattr(hf_config, k.replace("_id", "_token_id"), m["tokenizer"][k])
    model = build_model(cfg, hf_config, False, attention(cfg, hf_config, False)[0])
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, plan.total_steps))
    steps = []
    for step in range(plan.total_steps):
        t0 = time.time()
        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        batches = [rows.rows(ids) for ids in step_row_ids(plan, cfg.train.seed, epoch, in_epoch, 0)]
        n = max(1, sum(count_targets(b.labels, b.position_ids) for b in batches))
        loss_sum = 0.0
        for b in batches:
            logits = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
            s = sum_cross_entropy(logits, b.labels, b.position_ids)
            (s / n).backward()
            loss_sum += float(s.detach())
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        real = sum(b.real_tokens for b in batches)
        steps.append({"step": step + 1, "real_tokens": real, "time_s": dt, "loss": loss_sum / n})
        print(f"plain loop step {step + 1}/{plan.total_steps} loss {loss_sum / n:.4f} real tokens {real} "
              f"{dt:.2f} s -> {real / dt:.0f} real tokens/s", flush=True)
    with open(a.out, "w") as f:
        json.dump({"world": 1, "batch": plan.describe(), "torch_threads": torch.get_num_threads(), "steps": steps,
                   "max_rss_gb_per_rank": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20]}, f, indent=2)


if __name__ == "__main__":
    main()
