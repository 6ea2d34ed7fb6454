"""Stopping every rank cleanly when the job is asked to stop, or when its launcher is gone.

Signals: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C; a second SIGINT interrupts at once) set a flag; the ranks agree on
it with one all-reduce (MAX) at each optimizer-step boundary, save a checkpoint and exit with
:data:`EXIT_PREEMPTED`.

Launchers do not all pass a signal on. ``deepspeed`` (its runner) and ``torchrun`` (for SIGUSR1) die of a signal
sent to them and leave their ranks running; a launcher killed with SIGKILL cannot pass anything on. So each rank
also watches the processes that launched it (:func:`launcher_chain`): its parent and, under the ``deepspeed``
command, the runner above ``deepspeed.launcher.launch``. When one of them is gone (its pid no longer exists, or
belongs to a newer process), the rank acts as on SIGTERM: checkpoint at the next step boundary, exit 75. A rank
still alive ``orphan_timeout_s`` seconds later (a step or a checkpoint that cannot finish, e.g. a peer lost) exits
with :data:`EXIT_PREEMPTED` at once: ranks never outlive their launcher by more than that.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved after a stop request; relaunch to resume


def _stat(pid: int) -> tuple[int, int] | None:
    """``(ppid, start time in clock ticks)`` of a process from ``/proc/PID/stat``; None when it does not exist or
    has exited (a zombie not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ... starttime (field 22)
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def launcher_chain(source: str, pid: int | None = None) -> list[tuple[int, int, str]]:
    """The launcher processes a rank watches: ``[(pid, start time, command line)]``.

    The parent for every launcher but a single process (``source == "single"``: a plain ``python`` keeps the
    shell's semantics, e.g. ``nohup``); under ``deepspeed`` also the parent's parent when the parent is
    ``deepspeed.launcher.launch`` and that process's parent is the ``deepspeed`` command. Empty where ``/proc``
    is missing.

    Args:
        source: :attr:`itune.dist.DistEnv.source` (``deepspeed``, ``torchrun``, ``slurm`` or ``single``).
        pid: the rank's pid (this process by default).
    """
    if source == "single":
        return []
    me = _stat(pid or os.getpid())
    if me is None:
        return []
    if me[0] <= 1:  # launched, but its launcher is already gone (the rank was re-parented to init)
        return [(0, 0, "the launcher (gone before this rank looked)")]
    parent = me[0]
    p = _stat(parent)
    if p is None:
        return []
    chain = [(parent, p[1], _cmdline(parent))]
    if source == "deepspeed" and "deepspeed.launcher.launch" in chain[0][2]:
        if p[0] <= 1:  # deepspeed.launcher.launch already re-parented: the command above it is gone
            chain.append((0, 0, "the deepspeed command (gone before this rank looked)"))
            return chain
        gp = _stat(p[0])
        cmd = _cmdline(p[0])
        if gp is not None and "deepspeed" in cmd and "deepspeed.launcher.launch" not in cmd:
            chain.append((p[0], gp[1], cmd))
    return chain


def gone(chain: list[tuple[int, int, str]]) -> tuple[int, str] | None:
    """The first process of ``chain`` that no longer runs (pid missing or reused), as ``(pid, command)``."""
    for pid, start, cmd in chain:
        st = _stat(pid) if pid > 0 else None
        if st is None or st[1] != start:
            return pid, cmd
    return None


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT or by the launcher watchdog; ranks agree on it at each step boundary.

    Args:
        poll_s: seconds between two looks at the launcher processes.
        orphan_timeout_s: after the launcher is gone, exit with :data:`EXIT_PREEMPTED` this many seconds later
            if the run has not stopped by itself (0: never).
    """

    def __init__(self, poll_s: float = 1.0, orphan_timeout_s: float = 300.0):
        self.raised = False
        self.reason = ""
        self.poll_s = poll_s
        self.orphan_timeout_s = orphan_timeout_s
        self._interrupts = 0
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # a second Ctrl-C: stop now, without a checkpoint
                raise KeyboardInterrupt
        self.raise_(signal.Signals(signum).name)

    def raise_(self, reason: str) -> None:
        if not self.raised:
            self.raised, self.reason = True, reason

    def watch(self, chain: list[tuple[int, int, str]]) -> threading.Thread | None:
        """Starts a daemon thread that raises the flag when a process of ``chain`` is gone, then ends this process
        ``orphan_timeout_s`` seconds later if it still runs."""
        if not chain:
            return None

        def loop():
            while True:
                g = gone(chain)
                if g is not None:
                    self.raise_(f"launcher gone (pid {g[0]}: {g[1][:120]})")
                    print(f"itune: rank pid {os.getpid()}: the launcher process {g[0]} ({g[1][:120]}) is gone; "
                          "saving a checkpoint at the next step boundary", file=sys.stderr, flush=True)
                    if self.orphan_timeout_s:
                        time.sleep(self.orphan_timeout_s)
                        print(f"itune: rank pid {os.getpid()}: still running {self.orphan_timeout_s:.0f} s after "
                              f"the launcher was gone; exiting with {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
                        os._exit(EXIT_PREEMPTED)
                    return
                time.sleep(self.poll_s)

        t = threading.Thread(target=loop, name="itune-launcher-watch", daemon=True)
        t.start()
        return t

    def agreed(self) -> bool:
        """Whether any rank has the flag raised (one all-reduce; every rank must call it)."""
        import torch
        import torch.distributed as tdist

        t = torch.tensor([1 if self.raised else 0])
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())
