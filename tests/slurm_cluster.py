"""A throwaway two-node Slurm cluster on this machine, for tests that need real sbatch/srun.

The cluster is two virtual nodes (``vnode1``/``vnode2``, 2 CPUs each) served by one ``slurmctld`` and two
``slurmd`` on 127.0.0.1, authenticated by a private ``munged``; everything (config, key, state, spool,
logs, pid files) lives in one temporary directory, and the ports are picked free at start, so two
clusters (or another engineer's) can run side by side. Teardown stops only the daemons this object
started, by their pid files.

Requirements: root (the daemons run as root / the ``munge`` user) and, when ``slurmctld`` is missing,
``apt-get`` access to install ``slurmctld slurmd slurm-client munge``. Otherwise the pytest fixture
skips.

Use from a test module::

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (pytest fixture)

    def test_x(slurm_cluster):
        job_id, rc = slurm_cluster.submit("#!/bin/bash\\n#SBATCH --nodes=2\\nsrun hostname\\n")
        assert rc == 0 and slurm_cluster.job_state(job_id) == "COMPLETED"
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import pytest

NODES = ("vnode1", "vnode2")
CPUS_PER_NODE = 2
REAL_MEMORY_MB = 1024
INSTALL_CMD = (
    "apt-get update && apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
)
LAUNCHER_VARIABLES = {
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE",
}
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


class SlurmClusterError(RuntimeError):
    """The local cluster could not be installed, started or queried."""


class SlurmUnavailable(SlurmClusterError):
    """Slurm cannot be provided here (not root, no apt-get, install failed): tests should skip."""


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def ensure_installed(timeout_s: float = 900.0) -> None:
    """Install Slurm and munge with apt-get when ``slurmctld`` is not on PATH.

    Raises:
        SlurmUnavailable: Not root, no apt-get, or the installation failed.
    """
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmctld is missing and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurmctld is missing and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(
        ["bash", "-c", INSTALL_CMD], capture_output=True, text=True, env=env, timeout=timeout_s, check=False
    )
    if proc.returncode != 0 or not shutil.which("slurmctld"):
        raise SlurmUnavailable(f"'{INSTALL_CMD}' failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def ensure_hosts(names: Sequence[str] = NODES, hosts_file: str = "/etc/hosts") -> None:
    """Append the virtual node names to /etc/hosts as 127.0.0.1 when the file does not list them yet."""
    text = Path(hosts_file).read_text()
    known = {tok for line in text.splitlines() if not line.lstrip().startswith("#") for tok in line.split()[1:]}
    missing = [n for n in names if n not in known]
    if missing:
        with open(hosts_file, "a") as fh:
            if text and not text.endswith("\n"):
                fh.write("\n")
            fh.write("127.0.0.1 " + " ".join(missing) + "  # local Slurm test cluster\n")


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting for its parent to reap it counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class SlurmCluster:
    """A private Slurm cluster (one controller, two virtual nodes) in a temporary directory.

    Attributes:
        root: The temporary directory holding everything.
        conf: Path of slurm.conf.
        env: Environment for Slurm clients (``SLURM_CONF``; inherited ``SLURM_*`` job variables removed).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, start_timeout_s: float = 60.0):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="slurm-cluster-"))
        self.start_timeout_s = start_timeout_s
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.pids = self.root / "pid"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.jobs_dir = self.root / "jobs"
        self.env: dict[str, str] = {}
        self._pid_files: list[Path] = []
        self._started = False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "SlurmCluster":
        """Write the configuration, start munged, slurmctld and both slurmd, and wait for idle nodes.

        Raises:
            SlurmUnavailable: Slurm cannot be installed here.
            SlurmClusterError: A daemon did not start or the nodes did not become idle in time
                (the message includes the daemon logs).
        """
        ensure_installed()
        ensure_hosts()
        try:
            self._write_files()
            self._start_munge()
            self._start_slurm()
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def _write_files(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # the munge user must traverse to its socket
        for d in (self.logs, self.pids, self.jobs_dir, self.root / "state", self.root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={CPUS_PER_NODE} RealMemory={REAL_MEMORY_MB} State=UNKNOWN"
            for name, port in zip(NODES, node_ports)
        )
        r = self.root
        self.conf.write_text(
            f"""ClusterName=itunetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={self.pids}/slurmctld.pid
SlurmdPidFile={self.pids}/slurmd-%n.pid
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
SchedulerType=sched/backfill
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        # Jobs inherit the submitter's environment: drop job and launcher identity variables so a
        # test run from inside a job or a launcher does not leak RANK & co. into the tasks.
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "TORCHELASTIC_"))
            and k not in LAUNCHER_VARIABLES
        }
        self.env["SLURM_CONF"] = str(self.conf)

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(exist_ok=True)
        os.chmod(self.munge_dir, 0o755)  # munged: the socket dir must be executable by all
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o400)
        for p in (self.munge_dir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        pid_file = self.munge_dir / "munged.pid"
        self._pid_files.append(pid_file)
        self._run_daemon(
            [
                "runuser", "-u", "munge", "--",
                "munged",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={pid_file}",
                f"--log-file={self.munge_dir / 'munged.log'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
            ],
            "munged",
        )
        self._wait_for(lambda: self.munge_socket.exists() and pid_file.exists(), "munged socket", 15)

    def _start_slurm(self) -> None:
        ctld_pid = self.pids / "slurmctld.pid"
        self._pid_files.append(ctld_pid)
        self._run_daemon(["slurmctld", "-c", "-f", str(self.conf)], "slurmctld")
        self._wait_for(ctld_pid.exists, "slurmctld pid file", 20)
        for name in NODES:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
            pid_file = self.pids / f"slurmd-{name}.pid"
            self._pid_files.append(pid_file)
            self._run_daemon(["slurmd", "-f", str(self.conf), "-N", name], f"slurmd {name}")
        for name in NODES:
            self._wait_for((self.pids / f"slurmd-{name}.pid").exists, f"slurmd {name} pid file", 20)

    def _run_daemon(self, argv: list[str], what: str) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=60, check=False)
        if proc.returncode != 0:
            raise SlurmClusterError(
                f"{what} failed to start (rc={proc.returncode}): {proc.stdout}{proc.stderr}\n{self.daemon_logs()}"
            )

    def _wait_for(self, predicate, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out after {timeout_s:g} s waiting for {what}\n{self.daemon_logs()}")
            time.sleep(0.1)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env, timeout=20, check=False
            )
            last = proc.stdout + proc.stderr
            states = dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.3)
        raise SlurmClusterError(
            f"nodes {NODES} not idle after {self.start_timeout_s:g} s; last sinfo:\n{last}\n{self.daemon_logs()}"
        )

    def stop(self) -> None:
        """Stop the daemons this cluster started (by pid file): the Slurm daemons together, munged last."""
        slurm = [p for p in self._pid_files if p.name != "munged.pid"]
        munge = [p for p in self._pid_files if p.name == "munged.pid"]
        for group in (slurm, munge):
            pids = [pid for pid in (_read_pid(p) for p in group) if pid is not None]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in pids:
                if _alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self._pid_files.clear()
        self._started = False

    def cleanup(self) -> None:
        """Stop the daemons and remove the temporary directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # ---------------------------------------------------------------- queries

    def daemon_logs(self, tail_chars: int = 3000) -> str:
        """The tails of all daemon logs, for error messages."""
        parts = []
        for log in sorted(list(self.logs.glob("*.log")) + list(self.munge_dir.glob("*.log"))):
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            parts.append(f"--- {log.name} ---\n{text[-tail_chars:]}")
        return "\n".join(parts) or "(no daemon logs)"

    def run(self, argv: Sequence[str], timeout_s: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sinfo, scontrol, ...) against this cluster."""
        proc = subprocess.run(list(argv), capture_output=True, text=True, env=self.env, timeout=timeout_s, check=False)
        if check and proc.returncode != 0:
            raise SlurmClusterError(f"{' '.join(argv)} failed (rc={proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def submit(
        self,
        script: str | os.PathLike[str],
        *args: str,
        wait: bool = True,
        timeout_s: float = 180.0,
        cwd: str | os.PathLike[str] | None = None,
        sbatch_wait: bool = False,
        script_args: Sequence[str] = (),
    ) -> tuple[int, int]:
        """Submit a batch script with ``sbatch``.

        Args:
            script: A path (``Path`` or an existing file name) or the script text (a string that is not an
                existing file, e.g. starting with ``#!``).
            *args: Extra sbatch options, e.g. ``"--nodes=2"``.
            wait: Block until the job ends (like ``sbatch --wait``).
            timeout_s: Limit for the job to end when waiting.
            cwd: Working directory of the job (default: the repository root).
            sbatch_wait: Wait with ``sbatch --wait`` itself (returns its exit status) instead of polling
                ``scontrol``; slower, since sbatch polls at 2 s, then ~10 s intervals.
            script_args: Arguments for the batch script itself (after its path on the sbatch command line).

        Returns:
            ``(job_id, returncode)``: with ``wait`` the job's exit code, else sbatch's.
        """
        if isinstance(script, Path) or (isinstance(script, str) and "\n" not in script and os.path.isfile(script)):
            path = Path(script)
        else:
            fd, name = tempfile.mkstemp(suffix=".sh", dir=self.jobs_dir)
            with os.fdopen(fd, "w") as fh:
                fh.write(str(script))
            path = Path(name)
        # Not `sbatch --wait`: it polls the controller at growing intervals (2 s, then ~10 s), which
        # dominates short test jobs; polling `scontrol show job` ends within a fraction of a second.
        use_sbatch_wait = wait and sbatch_wait
        argv = ["sbatch", "--parsable", *(["--wait"] if use_sbatch_wait else []), *args, str(path), *script_args]
        workdir = str(cwd) if cwd else str(Path(__file__).resolve().parents[1])
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, cwd=workdir,
            timeout=timeout_s if use_sbatch_wait else 60, check=False,
        )
        m = re.search(r"^(\d+)", proc.stdout.strip())
        if use_sbatch_wait and m is not None:
            return int(m.group(1)), proc.returncode
        if proc.returncode != 0 or m is None:
            raise SlurmClusterError(
                f"sbatch did not submit (rc={proc.returncode}): {proc.stdout}{proc.stderr}\n{self.daemon_logs()}"
            )
        job_id = int(m.group(1))
        if not wait:
            return job_id, proc.returncode
        self.wait_job(job_id, timeout_s=timeout_s)
        return job_id, self.exit_code(job_id)

    def exit_code(self, job_id: int) -> int:
        """The batch script's exit status like ``sbatch --wait`` reports it (128 + signal if killed)."""
        code, _, sig = self.job_info(job_id).get("ExitCode", "0:0").partition(":")
        return 128 + int(sig) if int(code) == 0 and sig and int(sig) else int(code)

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict of Key=Value."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def job_state(self, job_id: int) -> str:
        """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``, ``FAILED``, ...) from ``scontrol show job``."""
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_job(self, job_id: int, timeout_s: float = 120.0) -> str:
        """Poll until the job reaches a terminal state; return it."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.job_state(job_id)
            if state in TERMINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} still {state} after {timeout_s:g} s\n{self.daemon_logs()}")
            time.sleep(0.25)


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    """A running two-node Slurm cluster for the whole test session (skips where Slurm cannot run).

    One cluster per pytest session even when the fixture is registered in several places (a conftest
    and a test module): the instance is shared through ``request.config`` and stopped by the last user.
    """
    holder = request.config.__dict__.setdefault(
        "_itune_slurm_cluster", {"cluster": None, "users": 0, "skip": None}
    )
    if holder["skip"]:
        pytest.skip(holder["skip"])
    if holder["cluster"] is None:
        cluster = SlurmCluster()
        try:
            cluster.start()
        except SlurmUnavailable as exc:
            cluster.cleanup()
            holder["skip"] = f"no local Slurm: {exc}"
            pytest.skip(holder["skip"])
        holder["cluster"] = cluster
    holder["users"] += 1
    try:
        yield holder["cluster"]
    finally:
        holder["users"] -= 1
        if holder["users"] == 0:
            holder["cluster"].cleanup()
            holder["cluster"] = None
