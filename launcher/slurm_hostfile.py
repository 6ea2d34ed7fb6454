"""Write a DeepSpeed hostfile from the current Slurm allocation.

Usage (inside sbatch/salloc)::

    python -m launcher.slurm_hostfile [--out hostfile] [--slots N]

Each line is ``<host> slots=<N>``, one per node of ``SLURM_JOB_NODELIST`` in Slurm's order. Slots come
from ``--slots``, else ``SLURM_GPUS_ON_NODE`` (GPUs of this node, assumed the same on every node), else
``SLURM_NTASKS_PER_NODE``, else the per-node counts of ``SLURM_TASKS_PER_NODE`` (e.g. ``2(x3),1``).
Without ``--out`` the hostfile goes to stdout; with it, the file is written atomically.
Outside an allocation (no ``SLURM_JOB_NODELIST``) it exits with status 2 and a message.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from typing import Mapping, Sequence

from itune.dist import DistEnvError, expand_nodelist, parse_tasks_per_node

__all__ = ["HostfileError", "hostfile_lines", "main", "write_hostfile"]


class HostfileError(ValueError):
    """No Slurm allocation, or slots cannot be determined."""


def _positive(name: str, raw: str) -> int:
    if not re.fullmatch(r"[0-9]+", raw.strip()):
        raise HostfileError(f"{name}={raw!r} is not an integer; pass --slots N")
    value = int(raw.strip())
    if value < 1:
        raise HostfileError(f"{name}={raw!r} must be >= 1; pass --slots N")
    return value


def hostfile_lines(environ: Mapping[str, str] | None = None, slots: int | None = None) -> list[str]:
    """The hostfile lines (without newlines) for the allocation described by ``environ``.

    Args:
        environ: Environment to read (default ``os.environ``): ``SLURM_JOB_NODELIST`` (or
            ``SLURM_NODELIST``), ``SLURM_GPUS_ON_NODE``, ``SLURM_NTASKS_PER_NODE``, ``SLURM_TASKS_PER_NODE``.
        slots: Slots per host, overriding the environment.

    Returns:
        ``["host1 slots=N", ...]``.

    Raises:
        HostfileError: Not inside an allocation, or no usable slot count.
    """
    env = os.environ if environ is None else environ
    nodelist = (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "").strip()
    if not nodelist:
        raise HostfileError(
            "SLURM_JOB_NODELIST is not set: not inside a Slurm allocation; run this from an sbatch script or salloc"
        )
    try:
        hosts = expand_nodelist(nodelist, environ=env)
    except DistEnvError as exc:
        raise HostfileError(str(exc)) from None

    if slots is not None:
        if slots < 1:
            raise HostfileError(f"--slots {slots} must be >= 1")
        per_host = [slots] * len(hosts)
    elif (env.get("SLURM_GPUS_ON_NODE") or "").strip():
        per_host = [_positive("SLURM_GPUS_ON_NODE", env["SLURM_GPUS_ON_NODE"])] * len(hosts)
    elif (env.get("SLURM_NTASKS_PER_NODE") or "").strip():
        per_host = [_positive("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS_PER_NODE"])] * len(hosts)
    elif (env.get("SLURM_TASKS_PER_NODE") or "").strip():
        raw = env["SLURM_TASKS_PER_NODE"]
        try:
            per_host = parse_tasks_per_node(raw)
        except DistEnvError:
            raise HostfileError(f"SLURM_TASKS_PER_NODE={raw!r} is malformed; pass --slots N") from None
        if len(per_host) != len(hosts):
            raise HostfileError(
                f"SLURM_TASKS_PER_NODE={raw!r} lists {len(per_host)} nodes but {nodelist!r} has {len(hosts)}; "
                "pass --slots N"
            )
    else:
        raise HostfileError(
            "cannot tell slots per node: none of SLURM_GPUS_ON_NODE, SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE "
            "is set; request --gpus-per-node/--ntasks-per-node or pass --slots N"
        )
    return [f"{host} slots={n}" for host, n in zip(hosts, per_host)]


def write_hostfile(path: str, lines: Sequence[str]) -> None:
    """Write ``lines`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".hostfile.", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(line + "\n" for line in lines))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 error)."""
    parser = argparse.ArgumentParser(
        prog="python -m launcher.slurm_hostfile", description="Write a DeepSpeed hostfile from the Slurm allocation."
    )
    parser.add_argument("--out", help="hostfile path (default: stdout)")
    parser.add_argument("--slots", type=int, help="slots per host (default: from the Slurm environment)")
    args = parser.parse_args(argv)
    try:
        lines = hostfile_lines(environ, slots=args.slots)
    except HostfileError as exc:
        print(f"slurm_hostfile: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        write_hostfile(args.out, lines)
    else:
        sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
