"""Entry points executed by ``deepspeed``, ``torchrun`` and ``srun``."""
