"""Padded one-example-per-row baseline on itune's own DeepSpeed engine (a benchmark helper, not a test).

    deepspeed --num_gpus 2 bench/train_padded_baseline.py OUT.json --config C.yaml data.path=NOPACK [overrides]

The engine, model, optimizer and ZeRO-3 settings come from :func:`itune.train.setup`, so only the batching and
the loss differ from itune's trainer. The data must be prepared with ``itune-data prepare ... --no-pack`` (one
example per row). Each micro-batch takes ``train.micro_batch_size`` examples (itune's seeded order) and, as
DeepSpeed-Chat step 1 does, right-pads them to the longest example of the micro-batch (columns trimmed to the max
real length), attends with an ``attention_mask`` over the padded batch, and backpropagates the mean token
cross-entropy of the micro-batch over its trained tokens (DeepSpeed then divides by the accumulation steps).

Rank 0 writes OUT.json: per-step real (non-pad) tokens, padded tokens and wall time, and every rank's max RSS.
Driven by bench/train_throughput.py.
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
    import torch.distributed as tdist

    from itune.config import load_config
    from itune.loader import step_row_ids
    from itune.loss import count_targets, sum_cross_entropy
    from itune.train import all_reduce_sum, setup

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--config")
    p.add_argument("--local_rank", "--local-rank", type=int)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    s = setup(load_config(a.config, a.overrides))
    engine, plan, rows, rank = s.engine, s.plan, s.train_rows, s.rank
    lengths = rows._real  # one example per row: its length
    steps = []
    for step in range(plan.total_steps):
        t0 = time.time()
        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        real = padded = 0
        loss_sum = 0.0
        for ids in step_row_ids(plan, s.cfg.train.seed, epoch, in_epoch, rank):
            if min(ids) < 0:
                raise SystemExit("train_padded_baseline: train.max_steps reaches the partial last step of an epoch; "
                                 "measure whole steps only")
            b = rows.rows(ids)
            n = [lengths[i] for i in ids]
            width = max(n)
            input_ids, labels = b.input_ids[:, :width], b.labels[:, :width]
            mask = (torch.arange(width)[None, :] < torch.tensor(n)[:, None]).long()
            pos = torch.arange(width).expand(len(ids), width)  # no restarts: targets are labels shifted by one
            logits = engine(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            loss = sum_cross_entropy(logits, labels, pos) / max(1, count_targets(labels, pos))
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
            real += sum(n)
            padded += len(ids) * width
        dt = time.time() - t0
        rec = {"step": step + 1, "real_tokens": int(all_reduce_sum(real)), "padded_tokens": int(all_reduce_sum(padded)),
               "time_s": dt, "loss": all_reduce_sum(loss_sum) / (s.world * plan.gradient_accumulation_steps)}
        steps.append(rec)
        s.log.print(f"baseline step {rec['step']}/{plan.total_steps} loss {rec['loss']:.4f} real tokens "
                    f"{rec['real_tokens']} (padded batch {rec['padded_tokens']}) {dt:.2f} s "
                    f"-> {rec['real_tokens'] / dt:.0f} real tokens/s")
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], dtype=torch.float64)
    all_rss = [torch.zeros_like(rss) for _ in range(s.world)]
    tdist.all_gather(all_rss, rss)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump({"world": s.world, "batch": plan.describe(), "torch_threads": torch.get_num_threads(),
                       "steps": steps, "max_rss_gb_per_rank": [float(x) for x in all_rss]}, f, indent=2)
    s.log.close()
    tdist.barrier()


if __name__ == "__main__":
    main()
