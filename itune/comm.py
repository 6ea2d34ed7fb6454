"""Process-group start-up and shutdown, shared by the trainer and ZeRO-3 evaluation.

The identity (rank, world size, master address) must already be in ``os.environ`` (``itune.dist.export_for_torch``).
"""

from __future__ import annotations

import gc
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as tdist

SHM_COMM_OP = "deepspeed_shm_comm"


def broadcast_from_rank0(value, world: int):
    """Rank 0's ``value`` (a picklable object, e.g. a one-line refusal or None) on every rank; a collective when
    ``world`` > 1, which every rank must call."""
    if world <= 1:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


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
    _STARTED[0] = True
    return cuda


_STARTED = [False]  # whether this process started a process group (its threads may outlive its destruction)


def close_distributed() -> None:
    """Barrier, then every process group destroyed, its communication threads joined, before the interpreter
    shuts down. Does nothing when no process group is up.

    DeepSpeed's ``destroy_process_group`` is used when DeepSpeed is loaded: it also drops DeepSpeed's own
    references to the groups (``deepspeed.utils.groups``); a garbage collection then frees the last ones (a
    released engine's parameters hold ``ds_process_group``). A gloo group that outlives this keeps two worker
    threads running into interpreter shutdown; when one of them releases a tensor there it needs the GIL, Python
    ends the thread with ``pthread_exit``, and the unwinding through C++ aborts the process: "terminate called
    without an active exception" (the run's files are complete, but the rank exits with SIGABRT).
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    tdist.barrier()
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None and ds_comm.cdb.is_initialized():
        ds_comm.destroy_process_group()
    else:
        tdist.destroy_process_group()
    gc.collect()


def exit_process(code: int) -> None:
    """Ends a process that ran a process group: ``sys.exit(code)`` when none was started, else standard streams
    and logging flushed, then ``os._exit(code)``, skipping interpreter shutdown.

    Why: the process groups outlive :func:`close_distributed` in a DeepSpeed run (ZeRO-3 registers autograd hooks
    on its parameters, which hold the engine, its parameters and through them every group, in a cycle the
    garbage collector cannot see through), so two gloo worker threads per group keep running. If one of them
    releases a tensor while the interpreter is shutting down, it needs the GIL; Python 3.11 ends such a thread
    with ``pthread_exit``, whose unwinding through a C++ ``noexcept`` frame calls ``std::terminate``: the rank
    prints "terminate called without an active exception" and dies with SIGABRT after a complete run (1 launch
    in 28 under load). Nothing is left for shutdown to do: the trainer and evaluation close their files and
    locks themselves, and the groups were closed collectively first.
    """
    if not _STARTED[0]:
        sys.exit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
    os._exit(code)
