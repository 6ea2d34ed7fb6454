"""One process per output directory: an exclusive ``flock`` on ``DIR/.itune.lock``.

The training run (rank 0), ``itune-eval`` and ``itune-data prepare`` / ``merge`` take the lock of the directory they
write before writing anything, and keep it until they finish. A second process on the same directory is refused at
once with a one-line :class:`~itune.errors.ConfigError` naming the holder (host, pid, start time, command line),
read from the lock file. The kernel releases the lock when the holder exits, however it exits (a crash, SIGKILL, the
out-of-memory killer), so a lock is never stale: the file left behind by a killed process is simply taken over.

Forked children (worker processes) do not hold the lock: their inherited copy of the descriptor is closed at fork,
so only the process that took it keeps the directory busy.

No torch here: the data tools use it too. :func:`hold_dir_lock_rank0` imports ``torch.distributed`` only when the
world has more than one rank.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import weakref
from pathlib import Path

from itune.errors import ConfigError

#: The lock file's name inside a locked directory.
LOCK_NAME = ".itune.lock"

#: Longest command line recorded in a lock file (a longer one is cut, ending with "...").
MAX_COMMAND_CHARS = 400

_held: "weakref.WeakSet[DirLock]" = weakref.WeakSet()  # locks held by this process (closed in forked children)


class DirLock:
    """The lock of one directory, held while this object (its open file) lives, or until :meth:`release`.

    Attributes:
        path: the lock file (``DIR/.itune.lock``).
        holder: what was written into it (host, pid, started, command, what).
        locked: False where the file system does not support ``flock`` (a warning was printed; nothing is held).
    """

    def __init__(self, path: Path, file, holder: dict, locked: bool = True):
        self.path, self.holder, self.locked = path, holder, locked
        self._file = file

    def release(self) -> None:
        """Removes the lock file (while still holding it) and releases the lock; a second call does nothing."""
        f, self._file = self._file, None
        if f is None:
            return
        _held.discard(self)
        try:
            if self.locked and _same_file(self.path, f.fileno()):
                self.path.unlink()
        except OSError:
            pass
        try:
            if self.locked:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)  # also when a forked child still has the descriptor
        finally:
            f.close()

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _close_in_child() -> None:
    """After a fork: the child drops its copies of the held locks' descriptors (the parent keeps the locks)."""
    for lock in list(_held):
        f, lock._file = lock._file, None
        if f is not None:
            try:
                f.close()  # closing one descriptor of the shared open file releases nothing
            except OSError:
                pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a holder removes the file when it releases)."""
    try:
        st, own = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def command_line() -> str:
    """This process's command line on one line (shell-quoted, cut at :data:`MAX_COMMAND_CHARS`)."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    text = shlex.join(argv).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= MAX_COMMAND_CHARS else text[:MAX_COMMAND_CHARS - 3] + "..."


def describe_holder(holder: dict | None, path: Path) -> str:
    """``what on host h, pid p, started T: command`` from a lock file's record."""
    if not holder:
        return f"holder not recorded in {path}"
    return (f"{holder.get('what', '?')} on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
            f"{holder.get('started', '?')}: {holder.get('command', '?')}")


def _read_holder(f) -> dict | None:
    """The record in an open lock file; the holder writes it right after locking, so an empty file is re-read for
    up to a second."""
    for _ in range(20):
        try:
            text = os.pread(f.fileno(), 1 << 16, 0).decode("utf-8", "replace")
        except OSError:
            return None
        if text.strip():
            try:
                holder = json.loads(text)
            except ValueError:
                return None
            return holder if isinstance(holder, dict) else None
        time.sleep(0.05)
    return None


def hold_dir_lock(directory: str | os.PathLike, what: str, choose: str | None = "output_dir") -> DirLock:
    """Takes the exclusive, non-blocking lock of ``directory`` (created if missing) for this process.

    Writes the holder into ``DIR/.itune.lock`` as one JSON line: ``host``, ``pid``, ``started`` (ISO 8601, UTC),
    ``command`` (this process's command line) and ``what``. Keep the returned handle referenced as long as the
    directory is in use; the lock ends with :meth:`DirLock.release` or with the process.

    Args:
        directory: the output directory.
        what: what holds it, e.g. ``"training"``, ``"itune-data prepare"`` (shown to a refused process).
        choose: the option that names the directory, for the refusal's fix ("choose another ..."); None: the
            fix is only to wait.

    Raises:
        ConfigError: another process holds the lock (one line: the directory, the holder, the fix), or the
            directory or its lock file cannot be created.
    """
    directory = Path(directory)
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{directory}: cannot create the directory ({e.strerror or e})") from None
    while True:
        try:
            f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)
        except OSError as e:
            raise ConfigError(f"{path}: cannot create the lock file ({e.strerror or e})") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.close()  # a file system without flock: run unprotected rather than not at all
                print(f"warning: {directory}: cannot lock {path} ({e.strerror or e}); a second process on this "
                      "directory would not be detected", file=sys.stderr)
                return DirLock(path, None, {}, locked=False)
            holder = _read_holder(f)
            f.close()
            fix = "wait for it to finish" + (f" or choose another {choose}" if choose else "")
            raise ConfigError(f"{directory}: in use by another run ({describe_holder(holder, path)}); {fix}") from None
        if _same_file(path, f.fileno()):
            break
        f.close()  # the holder released and removed the file between our open and flock: lock the new one
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command_line(), "what": what}
    data = (json.dumps(holder) + "\n").encode()
    os.ftruncate(f.fileno(), 0)
    os.pwrite(f.fileno(), data, 0)
    try:
        os.fsync(f.fileno())  # readers on other hosts (a shared file system) see the holder
    except OSError:
        pass
    lock = DirLock(path, f, holder)
    _held.add(lock)
    return lock


def hold_dir_lock_rank0(directory: str | os.PathLike, what: str, rank: int, world: int,
                        choose: str | None = "output_dir") -> DirLock | None:
    """:func:`hold_dir_lock` on rank 0; the outcome is broadcast, so a refusal stops every rank with the same
    one-line error. Every rank must call it (a collective when ``world`` > 1: the process group must be up, and
    with NCCL each rank's CUDA device set).

    Returns:
        The handle on rank 0, None on the other ranks.

    Raises:
        ConfigError: on every rank, when rank 0 could not take the lock.
    """
    handle, refusal = None, None
    if rank == 0:
        try:
            handle = hold_dir_lock(directory, what, choose)
        except ConfigError as e:
            refusal = str(e)
    if world > 1:
        from itune.comm import broadcast_from_rank0  # (torch only where there is a process group)

        refusal = broadcast_from_rank0(refusal, world)
    if refusal is not None:
        raise ConfigError(refusal)
    return handle
