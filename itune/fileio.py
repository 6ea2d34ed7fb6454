"""Atomic file writes (standard library only): a reader never sees a partial file; and the command lines' exit
when their reader closes standard output."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kw):
    """Opens a temporary file beside ``path`` (``mode`` "w" or "wb"); on a clean exit it is flushed to disk and
    renamed to ``path`` (``os.replace``), on an exception removed. Creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def stdout_closed_by_reader() -> int:
    """For a command line whose output was piped into a reader that stopped early (``itune-eval ... | head -4``),
    after ``BrokenPipeError``: points standard output at ``/dev/null`` so that the interpreter's final flush does
    not fail again (a traceback, exit status 120), and returns 0: the reader has all the output it asked for.
    The idiom of the Python documentation (``signal`` module, "Note on SIGPIPE")."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
