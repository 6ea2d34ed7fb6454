"""Training entry point for ``deepspeed``, ``torchrun`` and ``srun``.

    deepspeed --num_gpus 2 launcher/train.py --config configs/superni_tiny.yaml [key.sub=value ...]
    torchrun --nproc-per-node 2 launcher/train.py --config configs/superni_tiny.yaml
    srun python launcher/train.py --config configs/superni_tiny.yaml

The config is validated before any distributed work starts. The deepspeed launcher's ``--local_rank=N`` argument
is accepted (the local rank itself is read from the environment by ``itune.dist``).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _report(e: Exception) -> None:
    """``error: ...`` on stderr in one write (lines of ranks writing at once stay whole); an error that every rank
    raises alike (``every_rank``, e.g. a tracker that rank 0 could not start) is printed by rank 0 only."""
    if getattr(e, "every_rank", False) and os.environ.get("RANK", "0") != "0":
        return
    sys.stderr.write(f"error: {e}\n")
    sys.stderr.flush()


def main(argv=None) -> int:
    from itune.dist import resolve
    from itune.errors import ItuneError
    from itune.preemption import launcher_chain

    try:  # first, before the slow imports: the launcher may be gone by the time the model is built
        launcher = launcher_chain(resolve().source)
    except ItuneError:
        launcher = None  # a mis-launch: preflight reports it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (configs/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    from itune.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ItuneError as e:
        _report(e)
        return 2
    from itune.comm import close_distributed
    from itune.train import preflight, run

    try:
        preflight(cfg)
        run(cfg, launcher)
    except ItuneError as e:
        _report(e)
        return 2
    close_distributed()
    return 0


if __name__ == "__main__":
    from itune.comm import exit_process

    exit_process(main())  # after a distributed run: without interpreter shutdown (see exit_process)
