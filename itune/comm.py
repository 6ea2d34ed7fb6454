"""Process-group start-up and shutdown, shared by the trainer and ZeRO-3 evaluation.

The identity (rank, world size, master address) must already be in ``os.environ`` (``itune.dist.export_for_torch``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as tdist

SHM_COMM_OP = "deepspeed_shm_comm"


def init_distributed(timeout_s: float | None = None) -> bool:
    """Starts the process group through ``deepspeed.init_distributed``: NCCL when CUDA is available, else gloo with
    ``DS_ACCELERATOR=cpu``. Returns whether CUDA is used.

    On CPU, DeepSpeed's shared-memory all-reduce op (``deepspeed_shm_comm``) is switched off before the backend is
    created. DeepSpeed uses it only for ``inference_all_reduce`` (tensor-parallel inference), never for ZeRO, but
    creating the backend would otherwise JIT-compile it with g++ on first use, hold a lock file under
    ``~/.cache/torch_extensions`` during every load (a rank killed inside that window leaves the lock behind and
    every later launch on the machine waits on it forever), and leave two 66 MB files per launch in ``/dev/shm``
    that are never unlinked. With the op off, gloo carries every collective.

    Args:
        timeout_s: timeout of one collective in seconds (a dead peer fails the group after it); None: torch's
            default.
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if not cuda:
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", **kwargs)
    return cuda


def close_distributed() -> None:
    """Barrier, then ``destroy_process_group``: every rank leaves together and no communication thread is left
    running at interpreter exit (where it can abort the process: "terminate called without an active exception").
    Does nothing when no process group is up."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
