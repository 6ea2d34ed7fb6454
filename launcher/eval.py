"""Evaluation entry point for ``deepspeed``, ``torchrun`` and ``srun`` (ZeRO-3 generation from a run directory).

    deepspeed --num_gpus 2 launcher/eval.py --data runs/data/superni_512 --run-dir runs/superni_tiny

Arguments are those of ``itune-eval``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from itune.eval.cli import main

    rc = main()
    if "torch.distributed" in sys.modules:  # ZeRO-3 generation ran: leave the process group together
        from itune.comm import close_distributed

        close_distributed()
    from itune.comm import exit_process

    exit_process(rc)  # after ZeRO-3 generation: without interpreter shutdown (see exit_process)
