"""Runs the trainer (``itune.train.run``) with a non-finite loss or gradient injected on one rank at chosen
optimizer steps, and saves each rank's state before and after chosen steps.

    deepspeed --num_gpus 2 tests/scripts/nonfinite_run.py OUT --inject 2:1:loss --inject 4:0:grad --snapshot 2 \
        --config C.yaml [overrides]

``--inject STEP:RANK:KIND`` (STEP 1-based): on that rank, during that optimizer step, the training loss of every
micro-batch becomes ``loss x nan`` (KIND ``loss``: nan loss, nan gradients, as a forward pass that overflowed) or
keeps its value with nan gradients (KIND ``grad``: finite loss, non-finite gradient norm). The injection lives in
this script only (it wraps ``itune.train.packed_loss_sum``); the trainer has no test hook.

``--snapshot STEP`` writes ``OUT/rank{R}_step{STEP}_{before,after}.pt`` on every rank: the rank's ZeRO-3 weight
partitions, DeepSpeed's fp32 partitions, the AdamW state, the lr scheduler position and DeepSpeed's skip counter.

Used by tests/test_nonfinite_skip.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402


class NanGradient(torch.autograd.Function):
    """Identity in forward, nan gradient in backward."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def snapshot(engine) -> dict:
    opt = engine.optimizer  # DeepSpeed's ZeRO-3 optimizer; .optimizer is itune's AdamW
    return {"weights": {n: p.ds_tensor.detach().clone() for n, p in engine.module.named_parameters()},
            "fp32": [t.detach().clone() for t in opt.fp32_partitioned_groups_flat],
            "adam": [{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in opt.optimizer.state[t].items()}
                     for t in opt.fp32_partitioned_groups_flat],  # AdamW state is keyed by the fp32 partitions
            "lr": engine.lr_scheduler.get_last_lr(), "scheduler_step": engine.lr_scheduler.last_epoch,
            "skipped_steps": engine.skipped_steps}


def main():
    import argparse

    import torch.distributed as tdist

    import itune.train
    from itune.config import load_config

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--inject", action="append", default=[])
    p.add_argument("--snapshot", action="append", type=int, default=[])
    p.add_argument("--config")
    p.add_argument("--local_rank", type=int)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    inject = {(int(s), int(r)): kind for s, r, kind in (x.split(":") for x in a.inject)}
    state = {"step": 0, "in_step": False}

    loss_fn, step_fn = itune.train.packed_loss_sum, itune.train.train_step

    def packed_loss_sum(*args, **kwargs):
        s = loss_fn(*args, **kwargs)
        kind = inject.get((state["step"], tdist.get_rank())) if state["in_step"] else None
        if kind == "loss":
            return s * float("nan")
        if kind == "grad":
            return NanGradient.apply(s)
        return s

    def train_step(engine, batches, world, before_optimizer_step=None, **kw):
        state["step"] += 1
        k, rank = state["step"], tdist.get_rank()
        if k in a.snapshot:
            torch.save(snapshot(engine), os.path.join(a.out, f"rank{rank}_step{k}_before.pt"))
        state["in_step"] = True
        try:
            r = step_fn(engine, batches, world, before_optimizer_step, **kw)
        finally:
            state["in_step"] = False
        if k in a.snapshot:
            torch.save(snapshot(engine), os.path.join(a.out, f"rank{rank}_step{k}_after.pt"))
        return r

    itune.train.packed_loss_sum, itune.train.train_step = packed_loss_sum, train_step
    os.makedirs(a.out, exist_ok=True)
    cfg = load_config(a.config, a.overrides)
    itune.train.preflight(cfg)
    itune.train.run(cfg)


if __name__ == "__main__":
    main()
