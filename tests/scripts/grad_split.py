"""Runs the first optimizer step of a run config and saves the loss and the full (gathered) gradients.

    deepspeed --num_gpus 2 tests/scripts/grad_split.py OUT.pt --config C.yaml [overrides]

Used by tests/test_loss_normalisation.py: the loss and gradients must not depend on how the step's rows are split
into ranks and micro-batches.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    import argparse

    import torch
    from deepspeed.utils import safe_get_full_grad

    from itune.config import load_config
    from itune.loader import step_row_ids
    from itune.train import setup, train_step

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--config")
    p.add_argument("--local_rank", type=int)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    s = setup(load_config(a.config, a.overrides))
    grads = {}

    def grab():  # every rank must take part in the gathers
        for name, param in s.engine.module.named_parameters():
            if param.requires_grad:  # frozen (LoRA base) parameters have none
                grads[name] = safe_get_full_grad(param).detach().clone().cpu()

    dp_rank = s.rank // s.plan.sequence_parallel_size
    batches = [s.train_rows.rows(ids) for ids in step_row_ids(s.plan, s.cfg.train.seed, 0, 0, dp_rank)]
    rows = [None] * s.world
    torch.distributed.all_gather_object(rows, [b.row_ids for b in batches])
    r = train_step(s.engine, batches, s.world, before_optimizer_step=grab, isolation=s.isolation, aux=s.aux,
                   tile_tokens=s.loss_tile_tokens, sp=s.sp, kernel=s.loss_kernel)
    if s.rank == 0:
        torch.save({"loss": r.loss, "target_tokens": r.target_tokens, "aux_loss": r.aux_loss, "grads": grads,
                    "isolation": s.isolation.name, "loss_tile_tokens": s.loss_tile_tokens,
                    "position_ids": torch.cat([b.position_ids for b in batches]), "world": s.world,
                    "rows": rows}, a.out)


if __name__ == "__main__":
    main()
