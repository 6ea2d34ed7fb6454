"""Shared fixtures: paths to the real data beside the checkout, and the local Slurm cluster."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ITUNE_SHARED", ROOT.parent / "shared"))
SUPERNI = SHARED / "data" / "superni"
MISTRAL = SHARED / "tokenizers" / "mistral-7b-v0.3"

try:
    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: local 2-node Slurm)
except ModuleNotFoundError:  # plain `pytest`: tests/ is on sys.path, the repository root is not
    from slurm_cluster import slurm_cluster  # noqa: F401


@pytest.fixture(scope="session")
def mistral_tokenizer():
    from itune.data.tokenizer import TextTokenizer

    assert MISTRAL.is_dir(), f"{MISTRAL} missing: the shared folder must sit beside the checkout"
    return TextTokenizer.load(MISTRAL)


@pytest.fixture(scope="session")
def superni_data(tmp_path_factory):
    """``superni_data(seq_len)``: the real SuperNI subset prepared once per seq_len with the mistral tokenizer
    (through the ``itune-data`` command line), shared by every test module that only reads it."""
    cache = {}

    def get(seq_len: int) -> Path:
        if seq_len not in cache:
            out = tmp_path_factory.mktemp(f"superni_{seq_len}") / "data"
            run_cmd(["itune-data", "prepare", "--superni", str(SUPERNI), "--tokenizer", str(MISTRAL), "--seq-len",
                     str(seq_len), "--out", str(out)])
            cache[seq_len] = out
        return cache[seq_len]

    return get


def deepspeed_cmd(nproc: int, script: str, *args: str) -> list[str]:
    """The real `deepspeed` launcher of this environment, `nproc` local ranks."""
    exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [exe, "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]


def free_port() -> int:
    """A TCP port free right now (bound to port 0, then released): a fresh one per launch, so runs of this and
    other test sessions on the machine do not collide."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def run_cmd(cmd, cwd=ROOT, timeout=900, env=None, check=True):
    """Runs a command in its own session, returning CompletedProcess; on failure the assertion shows the output tail.

    On timeout (or an interrupted test session) the whole process group is killed, a launcher's ranks too, so no
    hung rank outlives the test; a timeout fails the test with the output so far."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, err = proc.communicate()
            pytest.fail(f"{cmd} did not finish in {timeout} s (process group killed)\n{out[-4000:]}\n{err[-6000:]}")
        except BaseException:  # Ctrl-C of the test session: take the command's processes down with it
            _kill_group(proc.pid)
            raise
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        assert p.returncode == 0, f"{cmd} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p
