"""Distributed identity: the one place that turns a launcher's environment into rank/world/master.

Supported launchers (detected in this order):

* ``torchrun`` (torch elastic agent): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``GROUP_RANK`` (the node rank), ``MASTER_ADDR``, ``MASTER_PORT``; recognised by ``TORCHELASTIC_RUN_ID``
  or ``GROUP_RANK``.
* ``deepspeed`` (``deepspeed.launcher.launch``): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_SIZE``,
  ``CROSS_RANK`` (the node rank), ``CROSS_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; recognised by
  ``CROSS_RANK`` or ``LOCAL_SIZE``.
* ``slurm`` (``srun``, one task per process): ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``,
  ``SLURM_NTASKS``, the tasks-per-node layout and the node list; used when ``SLURM_PROCID`` is set and no
  launcher above is recognised.
* ``single``: nothing set (or only ``RANK=0``/``WORLD_SIZE=1``): one process.

The node rank is always read from the launcher's own node variable (``GROUP_RANK``, ``CROSS_RANK``,
``SLURM_NODEID``), never derived from the global rank, and every value is checked for consistency so a
mis-launched job fails at start-up with a :class:`DistEnvError` instead of hanging in the first collective.

This module does not import torch at import time.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import Mapping

from itune.errors import ItuneError

__all__ = [
    "DEFAULT_MASTER_ADDR",
    "DEFAULT_MASTER_PORT",
    "DistEnv",
    "DistEnvError",
    "check_master_reachable",
    "expand_nodelist",
    "export_for_torch",
    "parse_tasks_per_node",
    "resolve",
    "slurm_master_port",
    "startup_line",
]

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000

SOURCES = ("deepspeed", "torchrun", "slurm", "single")


class DistEnvError(ItuneError, ValueError):
    """The launcher environment is missing, malformed or inconsistent.

    The message names the variable, its value and how to fix the launch.
    """


@dataclass(frozen=True)
class DistEnv:
    """Distributed identity of this process.

    Attributes:
        rank: Global rank in ``[0, world_size)``.
        local_rank: Rank on this node in ``[0, local_world_size)``.
        node_rank: Index of this node among the job's nodes (from the launcher's node variable).
        world_size: Total number of processes.
        local_world_size: Number of processes on this node.
        master_addr: Host of the rank-0 rendezvous store.
        master_port: TCP port of the rank-0 rendezvous store.
        source: Which launcher the values came from: "deepspeed", "torchrun", "slurm" or "single".
    """

    rank: int
    local_rank: int
    node_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """True on local rank 0 of each node."""
        return self.local_rank == 0


# --------------------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------------------


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value if value != "" else None


def _int(environ: Mapping[str, str], name: str, *, fix: str) -> int:
    raw = _get(environ, name)
    if raw is None:
        raise DistEnvError(f"{name} is not set; {fix}")
    # Plain ASCII digits only: int() would also accept "1_000" and non-ASCII digits.
    if not re.fullmatch(r"-?[0-9]+", raw):
        raise DistEnvError(f"{name}={environ.get(name)!r} is not an integer; {fix}")
    return int(raw)


def _opt_int(environ: Mapping[str, str], name: str, *, fix: str) -> int | None:
    if _get(environ, name) is None:
        return None
    return _int(environ, name, fix=fix)


def parse_tasks_per_node(value: str) -> list[int]:
    """Expand Slurm's compressed tasks-per-node layout.

    Args:
        value: A value of ``SLURM_TASKS_PER_NODE`` / ``SLURM_STEP_TASKS_PER_NODE``, e.g. ``"2(x3),1"``.

    Returns:
        One task count per node, in node order, e.g. ``[2, 2, 2, 1]``.

    Raises:
        DistEnvError: The value is not of the form ``N`` or ``N(xK)`` separated by commas.
    """
    counts: list[int] = []
    for part in value.strip().split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise DistEnvError(
                f"tasks-per-node value {value!r} is malformed (expected forms like '2(x3),1'); "
                "launch with srun inside a Slurm allocation or set SLURM_NTASKS_PER_NODE"
            )
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError("unbalanced '['")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_one(pattern: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if m is None:
        if "[" in pattern or "]" in pattern:
            raise ValueError(f"bad brackets in {pattern!r}")
        return [pattern]
    prefix, body, rest = pattern[: m.start()], m.group(1), pattern[m.end() :]
    values: list[str] = []
    for item in body.split(","):
        item = item.strip()
        rm = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if rm is None:
            raise ValueError(f"bad range {item!r} in {pattern!r}")
        lo_s, hi_s = rm.group(1), rm.group(2)
        if hi_s is None:
            values.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"descending range {item!r} in {pattern!r}")
        width = len(lo_s) if lo_s.startswith("0") and len(lo_s) > 1 else 0
        values.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    tails = _expand_one(rest)
    return [prefix + v + t for v in values for t in tails]


def _expand_python(nodelist: str) -> list[str]:
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist):
        hosts.extend(_expand_one(pattern))
    return hosts


def _slurm_conf(environ: Mapping[str, str] | None) -> str | None:
    """The Slurm configuration scontrol would read, if it exists (scontrol retries for 60 s without one)."""
    env = os.environ if environ is None else environ
    for path in (_get(env, "SLURM_CONF"), _get(os.environ, "SLURM_CONF"), "/etc/slurm/slurm.conf"):
        if path and os.path.isfile(path):
            return path
    return None


def expand_nodelist(
    nodelist: str,
    *,
    use_scontrol: bool = True,
    timeout_s: float = 5.0,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Expand a Slurm host list such as ``vnode[1-2]`` or ``a[01-03,7],b`` into host names.

    Uses ``scontrol show hostnames`` when it is on PATH, a Slurm configuration exists (``SLURM_CONF`` of
    ``environ``/the process, or /etc/slurm/slurm.conf; without one scontrol retries for a minute) and it
    succeeds; otherwise (or with ``use_scontrol=False``) a pure-Python expander that handles comma lists,
    numeric ranges, zero padding and several bracket groups per name (``r[1-2]n[08-10]``).

    Args:
        nodelist: The compressed host list (e.g. the value of ``SLURM_JOB_NODELIST``).
        use_scontrol: Try ``scontrol`` first.
        timeout_s: Limit for the ``scontrol`` call.
        environ: Environment whose ``SLURM_CONF`` scontrol should use (default ``os.environ``).

    Returns:
        The host names in Slurm's order.

    Raises:
        DistEnvError: The list is empty or cannot be parsed.
    """
    text = (nodelist or "").strip()
    if not text:
        raise DistEnvError("the Slurm node list is empty; run inside an allocation (sbatch/salloc/srun)")
    if use_scontrol and shutil.which("scontrol") and _slurm_conf(environ) is not None:
        run_env = dict(os.environ)
        if environ is not None and _get(environ, "SLURM_CONF"):
            run_env["SLURM_CONF"] = environ["SLURM_CONF"]
        try:
            proc = subprocess.run(
                ["scontrol", "show", "hostnames", text],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                env=run_env,
            )
            hosts = proc.stdout.split()
            if proc.returncode == 0 and hosts:
                return hosts
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        hosts = _expand_python(text)
    except ValueError as exc:
        raise DistEnvError(
            f"cannot expand Slurm node list {text!r}: {exc}; pass a list like 'node[1-4],gpu07' or set MASTER_ADDR"
        ) from None
    if not hosts:
        raise DistEnvError(f"Slurm node list {text!r} expands to no hosts; set MASTER_ADDR explicitly")
    return hosts


def slurm_master_port(job_id: int) -> int:
    """Rendezvous port derived from a Slurm job id: ``10000 + job_id % 20000``.

    All tasks of a job derive the same port without talking to each other; different jobs sharing a
    node usually get different ports.
    """
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _port(environ: Mapping[str, str], name: str, *, fix: str) -> int:
    port = _int(environ, name, fix=fix)
    if not 1 <= port <= 65535:
        raise DistEnvError(f"{name}={environ.get(name)!r} is not a TCP port in [1, 65535]; {fix}")
    return port


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------

_LAUNCHER_FIX = "launch with torchrun, deepspeed or srun, which set it for every process"


def _resolve_torchrun(environ: Mapping[str, str]) -> DistEnv:
    fix = "launch with torchrun, which sets it for every worker"
    return DistEnv(
        rank=_int(environ, "RANK", fix=fix),
        local_rank=_int(environ, "LOCAL_RANK", fix=fix),
        node_rank=_int(environ, "GROUP_RANK", fix=fix),
        world_size=_int(environ, "WORLD_SIZE", fix=fix),
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", fix=fix),
        master_addr=_master_addr_required(environ, fix),
        master_port=_port(environ, "MASTER_PORT", fix=fix),
        source="torchrun",
    )


def _resolve_deepspeed(environ: Mapping[str, str]) -> DistEnv:
    fix = "launch with the deepspeed launcher, which sets it for every process"
    return DistEnv(
        rank=_int(environ, "RANK", fix=fix),
        local_rank=_int(environ, "LOCAL_RANK", fix=fix),
        node_rank=_int(environ, "CROSS_RANK", fix=fix),
        world_size=_int(environ, "WORLD_SIZE", fix=fix),
        local_world_size=_int(environ, "LOCAL_SIZE", fix=fix),
        master_addr=_master_addr_required(environ, fix),
        master_port=_port(environ, "MASTER_PORT", fix=fix),
        source="deepspeed",
    )


def _master_addr_required(environ: Mapping[str, str], fix: str) -> str:
    addr = _get(environ, "MASTER_ADDR")
    if addr is None:
        raise DistEnvError(f"MASTER_ADDR is not set; {fix}")
    return addr


def _slurm_local_world_size(environ: Mapping[str, str], node_rank: int) -> int:
    fix = "launch with srun inside a Slurm allocation (e.g. srun --ntasks-per-node=N)"
    # Per-node layouts are exact even when nodes run different task counts; the step's layout wins
    # over the job's, which describes the allocation rather than this srun.
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        raw = _get(environ, name)
        if raw is None:
            continue
        try:
            counts = parse_tasks_per_node(raw)
        except DistEnvError:
            raise DistEnvError(
                f"{name}={environ.get(name)!r} is malformed (expected forms like '2(x3),1'); {fix}"
            ) from None
        if node_rank >= len(counts):
            raise DistEnvError(
                f"SLURM_NODEID={node_rank} but {name}={raw!r} lists only {len(counts)} node(s); {fix}"
            )
        return counts[node_rank]
    value = _opt_int(environ, "SLURM_NTASKS_PER_NODE", fix=fix)
    if value is not None:
        return value
    raise DistEnvError(f"neither SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE is set; {fix}")


def _resolve_slurm(environ: Mapping[str, str]) -> DistEnv:
    fix = "launch each process with srun inside a Slurm allocation"
    rank = _int(environ, "SLURM_PROCID", fix=fix)
    local_rank = _int(environ, "SLURM_LOCALID", fix=fix)
    node_rank = _int(environ, "SLURM_NODEID", fix=fix)
    world_size = _int(environ, "SLURM_NTASKS", fix=fix)
    in_step = _get(environ, "SLURM_STEP_ID") is not None or _get(environ, "SLURM_STEPID") is not None
    if not in_step and world_size > 1:
        # The batch script itself also sees SLURM_PROCID=0 and the job's SLURM_NTASKS: started from
        # there, one process would wait forever for the other world_size - 1.
        raise DistEnvError(
            f"SLURM_PROCID={environ.get('SLURM_PROCID')!r} with SLURM_NTASKS={world_size} but no SLURM_STEP_ID: "
            "this is the batch script, not an srun task, so only one of the "
            f"{world_size} processes would start; launch with 'srun python ...' "
            "(or request --ntasks=1 for a single process)"
        )
    local_world_size = _slurm_local_world_size(environ, node_rank)

    master_addr = _get(environ, "MASTER_ADDR")
    if master_addr is None:
        # Rank 0 runs on the first node of the step (srun) or, outside a step, of the job.
        name = "SLURM_STEP_NODELIST" if _get(environ, "SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
        if _get(environ, name) is None and _get(environ, "SLURM_NODELIST"):
            name = "SLURM_NODELIST"
        nodelist = _get(environ, name)
        if nodelist is None:
            raise DistEnvError(
                "SLURM_JOB_NODELIST is not set and MASTER_ADDR is not set; "
                "run inside a Slurm allocation or export MASTER_ADDR=<first node>"
            )
        master_addr = expand_nodelist(nodelist, environ=environ)[0]

    if _get(environ, "MASTER_PORT") is not None:
        master_port = _port(environ, "MASTER_PORT", fix="export MASTER_PORT=<free port> or unset it")
    else:
        job_id = _int(
            environ, "SLURM_JOB_ID", fix="run inside a Slurm allocation or export MASTER_PORT=<free port>"
        )
        master_port = slurm_master_port(job_id)

    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        node_rank=node_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        master_addr=master_addr,
        master_port=master_port,
        source="slurm",
    )


def _check_exported_matches_slurm(environ: Mapping[str, str], env: DistEnv) -> None:
    """RANK & co. set by hand (or by export_for_torch) in an srun task must agree with Slurm's values."""
    pairs = (
        ("RANK", "SLURM_PROCID", env.rank),
        ("LOCAL_RANK", "SLURM_LOCALID", env.local_rank),
        ("WORLD_SIZE", "SLURM_NTASKS", env.world_size),
        ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE/SLURM_TASKS_PER_NODE", env.local_world_size),
    )
    for name, slurm_name, expected in pairs:
        if _get(environ, name) is None:
            continue
        value = _int(environ, name, fix=f"unset {name} and let srun provide {slurm_name}")
        if value != expected:
            raise DistEnvError(
                f"{name}={environ.get(name)!r} disagrees with {slurm_name} (={expected}) of this srun task; "
                f"{name} was probably expanded once (e.g. in the batch script) instead of per task: "
                f"unset {name} and let itune read {slurm_name}"
            )


def _validate(env: DistEnv, environ: Mapping[str, str]) -> None:
    names = {
        "torchrun": ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"),
        "deepspeed": ("RANK", "LOCAL_RANK", "CROSS_RANK", "WORLD_SIZE", "LOCAL_SIZE"),
        "slurm": ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS", "SLURM_TASKS_PER_NODE"),
        "single": ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"),
    }[env.source]
    rank_n, local_n, node_n, world_n, lws_n = names
    fix = {
        "torchrun": "check --nnodes/--nproc-per-node/--node-rank of torchrun",
        "deepspeed": "check --num_nodes/--num_gpus and the hostfile of the deepspeed launcher",
        "slurm": "launch one process per task with srun (not from the batch script) and check --ntasks/--ntasks-per-node",
        "single": "unset the distributed variables or launch with torchrun/deepspeed/srun",
    }[env.source]

    if env.world_size < 1:
        raise DistEnvError(f"{world_n}={env.world_size} must be >= 1; {fix}")
    if env.local_world_size < 1:
        raise DistEnvError(f"{lws_n}={env.local_world_size} must be >= 1; {fix}")
    if not 0 <= env.rank < env.world_size:
        raise DistEnvError(f"{rank_n}={env.rank} is outside [0, {world_n}={env.world_size}); {fix}")
    if env.local_rank < 0 or env.local_rank >= env.local_world_size:
        raise DistEnvError(
            f"{local_n}={env.local_rank} is outside [0, {lws_n}={env.local_world_size}); {fix}"
        )
    if env.local_world_size > env.world_size:
        raise DistEnvError(
            f"{lws_n}={env.local_world_size} exceeds {world_n}={env.world_size}; {fix}"
        )
    if env.node_rank < 0:
        raise DistEnvError(f"{node_n}={env.node_rank} must be >= 0; {fix}")

    # The allocation must match: a launcher inside a Slurm step runs either one process per task
    # (WORLD_SIZE == SLURM_NTASKS) or one launcher per task spawning LOCAL_WORLD_SIZE processes
    # (WORLD_SIZE == SLURM_NTASKS * local world size). Anything else is a mismatched launch.
    if env.source in ("torchrun", "deepspeed"):
        ntasks = _opt_int(environ, "SLURM_NTASKS", fix="launch inside a consistent Slurm allocation")
        if ntasks is not None and env.world_size not in (ntasks, ntasks * env.local_world_size):
            raise DistEnvError(
                f"WORLD_SIZE={env.world_size} from the {env.source} launcher does not match the Slurm allocation "
                f"SLURM_NTASKS={ntasks} (expected {ntasks} for one process per task or "
                f"{ntasks * env.local_world_size} for one launcher per task with {env.local_world_size} "
                f"processes each); fix --ntasks/--ntasks-per-node of srun or the launcher's node/process counts"
            )


def resolve(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Resolve this process's distributed identity from the launcher environment.

    Variables read:
        * torchrun: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``,
          ``MASTER_ADDR``, ``MASTER_PORT`` (recognised by ``TORCHELASTIC_RUN_ID`` or ``GROUP_RANK``).
        * deepspeed launcher: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_SIZE``, ``CROSS_RANK``,
          ``MASTER_ADDR``, ``MASTER_PORT`` (recognised by ``CROSS_RANK`` or ``LOCAL_SIZE``).
        * srun (used when no launcher above is recognised and ``SLURM_PROCID`` is set):
          ``SLURM_PROCID`` -> rank, ``SLURM_LOCALID`` -> local rank, ``SLURM_NODEID`` -> node rank,
          ``SLURM_NTASKS`` -> world size, ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` (entry
          ``SLURM_NODEID``) or ``SLURM_NTASKS_PER_NODE`` -> local world size, ``MASTER_ADDR`` or the first
          host of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` -> master address, ``MASTER_PORT`` or
          ``10000 + SLURM_JOB_ID % 20000`` -> master port. ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/
          ``LOCAL_WORLD_SIZE``, if also set, must agree with the Slurm values. Without ``SLURM_STEP_ID``
          (the batch script itself, not an srun task) only ``SLURM_NTASKS=1`` is accepted.
        * otherwise a single process (rank 0 of 1 on 127.0.0.1:29500); ``RANK=0`` with ``WORLD_SIZE=1``
          is accepted as single, any other ``RANK`` without a recognised launcher is an error.
        * ``SLURM_NTASKS`` is compared with a launcher's ``WORLD_SIZE`` when both are set.

    Args:
        environ: The environment to read; ``os.environ`` when None.

    Returns:
        The validated :class:`DistEnv`.

    Raises:
        DistEnvError: A required variable is missing or not an integer; rank outside ``[0, world)``;
            local rank outside ``[0, local world)``; a port outside ``[1, 65535]``; a node list that
            cannot be expanded; ``WORLD_SIZE`` inconsistent with ``SLURM_NTASKS``; ``RANK`` & co. that
            disagree with the srun task's ``SLURM_*`` values; a multi-task job resolved from its batch
            script instead of an srun task.
    """
    if environ is None:
        environ = os.environ

    has_rank = _get(environ, "RANK") is not None
    if has_rank and (_get(environ, "TORCHELASTIC_RUN_ID") or _get(environ, "GROUP_RANK")):
        env = _resolve_torchrun(environ)
    elif has_rank and (_get(environ, "CROSS_RANK") or _get(environ, "LOCAL_SIZE")):
        env = _resolve_deepspeed(environ)
    elif _get(environ, "SLURM_PROCID") is not None:
        env = _resolve_slurm(environ)
        _check_exported_matches_slurm(environ, env)
    elif has_rank:
        rank = _int(environ, "RANK", fix=_LAUNCHER_FIX)
        world = _opt_int(environ, "WORLD_SIZE", fix=_LAUNCHER_FIX)
        if rank != 0 or world not in (None, 1):
            raise DistEnvError(
                f"RANK={environ.get('RANK')!r} (WORLD_SIZE={environ.get('WORLD_SIZE')!r}) is set but no launcher "
                "is recognised (no TORCHELASTIC_RUN_ID/GROUP_RANK of torchrun, CROSS_RANK/LOCAL_SIZE of deepspeed, "
                f"SLURM_PROCID of srun); {_LAUNCHER_FIX}"
            )
        env = _single(environ)
    else:
        env = _single(environ)
    _validate(env, environ)
    return env


def _single(environ: Mapping[str, str]) -> DistEnv:
    addr = _get(environ, "MASTER_ADDR") or DEFAULT_MASTER_ADDR
    port = DEFAULT_MASTER_PORT
    if _get(environ, "MASTER_PORT") is not None:
        port = _port(environ, "MASTER_PORT", fix="export MASTER_PORT=<free port> or unset it")
    local_rank = _opt_int(environ, "LOCAL_RANK", fix=_LAUNCHER_FIX) or 0
    if local_rank != 0:
        raise DistEnvError(f"LOCAL_RANK={environ.get('LOCAL_RANK')!r} in a single-process run; {_LAUNCHER_FIX}")
    return DistEnv(
        rank=0,
        local_rank=0,
        node_rank=0,
        world_size=1,
        local_world_size=1,
        master_addr=addr,
        master_port=port,
        source="single",
    )


# --------------------------------------------------------------------------------------------------
# Consumers
# --------------------------------------------------------------------------------------------------


def export_for_torch(env: DistEnv) -> None:
    """Write the identity into ``os.environ`` for torch's ``env://`` init and ``deepspeed.init_distributed``.

    Sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. Under srun, :func:`resolve` afterwards still returns the same identity (the exported
    values agree with the ``SLURM_*`` ones).

    Args:
        env: The identity from :func:`resolve`.
    """
    os.environ.update(
        {
            "RANK": str(env.rank),
            "LOCAL_RANK": str(env.local_rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )


def check_master_reachable(env: DistEnv, timeout_s: float = 10.0) -> str:
    """Check, before ``init_process_group``, that the master host can be resolved.

    What it checks: that ``env.master_addr`` resolves to an address (``socket.getaddrinfo``), retrying
    transient resolver failures until ``timeout_s``. It does *not* connect to ``master_port``: the
    rendezvous store on rank 0 only starts listening inside ``init_process_group``, which every rank
    enters together, so a connect beforehand would race rank 0 and prove nothing. A name that does not
    resolve (e.g. a node list entry unknown to DNS and /etc/hosts) is otherwise only reported after the
    collective timeout (minutes); here it fails within seconds. An unreachable but resolvable host is left
    to the init's own timeout.

    Args:
        env: The identity from :func:`resolve`.
        timeout_s: Deadline for the whole check.

    Returns:
        The first address the master host resolves to.

    Raises:
        DistEnvError: The host does not resolve, or resolution did not finish within ``timeout_s``.
    """
    import time

    host = env.master_addr
    deadline = time.monotonic() + timeout_s
    hint = (
        f"make {host!r} resolvable on every node (DNS or /etc/hosts) or export MASTER_ADDR=<IP of the rank-0 node>"
    )
    last_error: str = "timed out"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        result: dict[str, object] = {}

        def _lookup() -> None:
            try:
                result["infos"] = socket.getaddrinfo(host, env.master_port, type=socket.SOCK_STREAM)
            except OSError as exc:  # socket.gaierror is a subclass
                result["error"] = exc

        worker = threading.Thread(target=_lookup, daemon=True)
        worker.start()
        worker.join(remaining)
        if worker.is_alive():
            last_error = f"no answer within {timeout_s:g} s"
            break
        if "infos" in result:
            infos = result["infos"]
            return infos[0][4][0]  # type: ignore[index]
        exc = result["error"]
        last_error = str(exc)
        if not (isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN):
            break  # definitive: the name does not exist
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise DistEnvError(
        f"MASTER_ADDR={host!r} (from {env.source}) does not resolve ({last_error}); {hint}"
    )


def startup_line(env: DistEnv) -> str:
    """One log line naming this process's identity.

    Example: ``rank 3/16 local 3 node 0 via slurm, master host:port``.
    """
    return (
        f"rank {env.rank}/{env.world_size} local {env.local_rank} node {env.node_rank} "
        f"via {env.source}, master {env.master_addr}:{env.master_port}"
    )
