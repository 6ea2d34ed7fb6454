"""Unit tests for itune.dist (launcher environment -> distributed identity) and launcher.slurm_hostfile."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from itune import dist
from itune.dist import DistEnv, DistEnvError, expand_nodelist, parse_tasks_per_node, resolve
from launcher import slurm_hostfile

REPO = Path(__file__).resolve().parents[1]

# What `deepspeed.launcher.launch` exports for local process 1 on node 1 of 2 (4 processes per node).
DEEPSPEED = {
    "RANK": "5",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "8",
    "MASTER_ADDR": "node1",
    "MASTER_PORT": "29500",
    "CROSS_RANK": "1",
    "CROSS_SIZE": "2",
    "LOCAL_SIZE": "4",
}

# What torchrun (static rendezvous) exports for worker 3 of node 0 of 2 (8 workers per node).
TORCHRUN = {
    "RANK": "3",
    "LOCAL_RANK": "3",
    "WORLD_SIZE": "16",
    "LOCAL_WORLD_SIZE": "8",
    "GROUP_RANK": "0",
    "GROUP_WORLD_SIZE": "2",
    "ROLE_RANK": "3",
    "ROLE_WORLD_SIZE": "16",
    "MASTER_ADDR": "gpu-a01",
    "MASTER_PORT": "29400",
    "TORCHELASTIC_RUN_ID": "none",
    "TORCHELASTIC_RESTART_COUNT": "0",
}

# What an srun task sees: `srun` step of 4 tasks on 2 nodes (block), this is task 2 (first on node 2).
SRUN = {
    "SLURM_JOB_ID": "1234",
    "SLURM_JOBID": "1234",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_NPROCS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "vnode[1-2]",
    "SLURM_NODELIST": "vnode[1-2]",
    "SLURM_STEP_NODELIST": "vnode[1-2]",
    "SLURM_NNODES": "2",
}


def _with(base: dict[str, str], **changes: str | None) -> dict[str, str]:
    env = dict(base)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


RESOLVE_CASES = [
    ("deepspeed", DEEPSPEED, DistEnv(5, 1, 1, 8, 4, "node1", 29500, "deepspeed")),
    ("torchrun", TORCHRUN, DistEnv(3, 3, 0, 16, 8, "gpu-a01", 29400, "torchrun")),
    (
        "torchrun-rank0-node1",
        _with(TORCHRUN, RANK="8", LOCAL_RANK="0", GROUP_RANK="1"),
        DistEnv(8, 0, 1, 16, 8, "gpu-a01", 29400, "torchrun"),
    ),
    (
        # One torchrun per node started by srun: WORLD_SIZE = SLURM_NTASKS * LOCAL_WORLD_SIZE is consistent.
        "torchrun-under-srun",
        {**SRUN, **TORCHRUN, "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "1(x2)"},
        DistEnv(3, 3, 0, 16, 8, "gpu-a01", 29400, "torchrun"),
    ),
    (
        # deepspeed per process under srun: WORLD_SIZE == SLURM_NTASKS.
        "deepspeed-under-srun-one-per-task",
        {**SRUN, **DEEPSPEED, "SLURM_NTASKS": "8"},
        DistEnv(5, 1, 1, 8, 4, "node1", 29500, "deepspeed"),
    ),
    ("srun-block", SRUN, DistEnv(2, 0, 1, 4, 2, "vnode1", 11234, "slurm")),
    (
        # Cyclic distribution: PROCID 1 sits on node 1 although 1 // 2 == 0. Node rank must be SLURM_NODEID.
        "srun-cyclic-nodeid-not-from-procid",
        _with(SRUN, SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NODEID="1"),
        DistEnv(1, 0, 1, 4, 2, "vnode1", 11234, "slurm"),
    ),
    (
        "srun-cyclic-procid-2-on-node-0",
        _with(SRUN, SLURM_PROCID="2", SLURM_LOCALID="1", SLURM_NODEID="0"),
        DistEnv(2, 1, 0, 4, 2, "vnode1", 11234, "slurm"),
    ),
    (
        # `srun -n 3` in a 2x2 allocation: the job-level SLURM_NTASKS_PER_NODE=2 is stale; the step layout wins.
        "srun-uneven-step-layout",
        _with(
            SRUN,
            SLURM_PROCID="2",
            SLURM_NTASKS="3",
            SLURM_STEP_TASKS_PER_NODE="2,1",
            SLURM_TASKS_PER_NODE="2,1",
        ),
        DistEnv(2, 0, 1, 3, 1, "vnode1", 11234, "slurm"),
    ),
    (
        "srun-compressed-layout",
        _with(
            SRUN,
            SLURM_PROCID="6",
            SLURM_LOCALID="0",
            SLURM_NODEID="3",
            SLURM_NTASKS="7",
            SLURM_NTASKS_PER_NODE=None,
            SLURM_STEP_TASKS_PER_NODE="2(x3),1",
            SLURM_TASKS_PER_NODE="2(x3),1",
            SLURM_JOB_NODELIST="gpu[07-09],cpu1",
            SLURM_STEP_NODELIST="gpu[07-09],cpu1",
        ),
        DistEnv(6, 0, 3, 7, 1, "gpu07", 11234, "slurm"),
    ),
    (
        "srun-only-ntasks-per-node",
        _with(SRUN, SLURM_TASKS_PER_NODE=None, SLURM_STEP_TASKS_PER_NODE=None),
        DistEnv(2, 0, 1, 4, 2, "vnode1", 11234, "slurm"),
    ),
    (
        # A step on a subset of the job's nodes: rank 0 runs on the step's first node, not the job's.
        "srun-step-on-subset",
        _with(
            SRUN,
            SLURM_PROCID="0",
            SLURM_NODEID="0",
            SLURM_NTASKS="1",
            SLURM_STEP_TASKS_PER_NODE="1",
            SLURM_TASKS_PER_NODE="1",
            SLURM_STEP_NODELIST="vnode2",
        ),
        DistEnv(0, 0, 0, 1, 1, "vnode2", 11234, "slurm"),
    ),
    (
        "srun-explicit-master",
        _with(SRUN, MASTER_ADDR="10.0.0.5", MASTER_PORT="29555"),
        DistEnv(2, 0, 1, 4, 2, "10.0.0.5", 29555, "slurm"),
    ),
    (
        "srun-port-from-large-job-id",
        _with(SRUN, SLURM_JOB_ID="123456"),
        DistEnv(2, 0, 1, 4, 2, "vnode1", 13456, "slurm"),
    ),
    (
        # RANK & co. exported per task (e.g. by export_for_torch) agree with Slurm: still resolved via slurm.
        "srun-after-export",
        _with(
            SRUN,
            RANK="2",
            LOCAL_RANK="0",
            WORLD_SIZE="4",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="vnode1",
            MASTER_PORT="11234",
        ),
        DistEnv(2, 0, 1, 4, 2, "vnode1", 11234, "slurm"),
    ),
    (
        # The batch script of a one-task job may run the program directly.
        "slurm-batch-single-task",
        _with(
            SRUN,
            SLURM_STEP_ID=None,
            SLURM_STEPID=None,
            SLURM_PROCID="0",
            SLURM_NODEID="0",
            SLURM_NTASKS="1",
            SLURM_NTASKS_PER_NODE="1",
            SLURM_TASKS_PER_NODE="1",
            SLURM_STEP_TASKS_PER_NODE=None,
            SLURM_JOB_NODELIST="vnode1",
            SLURM_STEP_NODELIST=None,
        ),
        DistEnv(0, 0, 0, 1, 1, "vnode1", 11234, "slurm"),
    ),
    ("single-empty", {}, DistEnv(0, 0, 0, 1, 1, "127.0.0.1", 29500, "single")),
    (
        "single-explicit",
        {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "29777"},
        DistEnv(0, 0, 0, 1, 1, "127.0.0.1", 29777, "single"),
    ),
    (
        "single-ignores-unrelated-slurm-vars",
        {"SLURM_JOB_ID": "7", "SLURM_CONF": "/nonexistent/slurm.conf"},
        DistEnv(0, 0, 0, 1, 1, "127.0.0.1", 29500, "single"),
    ),
]


@pytest.mark.parametrize("environ,expected", [c[1:] for c in RESOLVE_CASES], ids=[c[0] for c in RESOLVE_CASES])
def test_resolve(environ, expected):
    assert resolve(environ) == expected


# (id, environ, substrings the message must contain)
ERROR_CASES = [
    ("rank-not-int", _with(TORCHRUN, RANK="three"), ["RANK='three'", "not an integer", "torchrun"]),
    ("rank-empty-is-missing", _with(DEEPSPEED, WORLD_SIZE=" "), ["WORLD_SIZE is not set", "deepspeed"]),
    ("slurm-procid-not-int", _with(SRUN, SLURM_PROCID="2.0"), ["SLURM_PROCID='2.0'", "not an integer", "srun"]),
    ("slurm-nodeid-not-int", _with(SRUN, SLURM_NODEID="n1"), ["SLURM_NODEID='n1'", "not an integer"]),
    ("slurm-job-id-not-int", _with(SRUN, SLURM_JOB_ID="12_3"), ["SLURM_JOB_ID='12_3'", "MASTER_PORT"]),
    ("rank-equals-world", _with(TORCHRUN, RANK="16"), ["RANK=16", "outside [0, WORLD_SIZE=16)", "--nproc-per-node"]),
    ("rank-negative", _with(DEEPSPEED, RANK="-1"), ["RANK=-1", "outside [0, WORLD_SIZE=8)", "--num_gpus"]),
    ("slurm-rank-outside", _with(SRUN, SLURM_PROCID="4"), ["SLURM_PROCID=4", "outside [0, SLURM_NTASKS=4)", "srun"]),
    (
        "local-rank-too-big",
        _with(TORCHRUN, LOCAL_RANK="8"),
        ["LOCAL_RANK=8", "outside [0, LOCAL_WORLD_SIZE=8)"],
    ),
    ("local-rank-too-big-deepspeed", _with(DEEPSPEED, LOCAL_RANK="4"), ["LOCAL_RANK=4", "LOCAL_SIZE=4"]),
    ("slurm-localid-too-big", _with(SRUN, SLURM_LOCALID="2"), ["SLURM_LOCALID=2", "SLURM_TASKS_PER_NODE=2"]),
    ("world-zero", _with(TORCHRUN, WORLD_SIZE="0", RANK="0", LOCAL_RANK="0"), ["WORLD_SIZE=0", ">= 1"]),
    ("local-world-exceeds-world", _with(TORCHRUN, LOCAL_WORLD_SIZE="32"), ["LOCAL_WORLD_SIZE=32", "exceeds WORLD_SIZE=16"]),
    (
        "world-vs-slurm-ntasks",
        {**SRUN, **DEEPSPEED, "SLURM_NTASKS": "4", "LOCAL_SIZE": "4"},
        ["WORLD_SIZE=8", "SLURM_NTASKS=4", "--ntasks"],
    ),
    (
        "torchrun-world-vs-slurm-ntasks",
        {**SRUN, **TORCHRUN, "SLURM_NTASKS": "3"},
        ["WORLD_SIZE=16", "SLURM_NTASKS=3", "expected 3", "24"],
    ),
    (
        # RANK expanded once in the batch script (`export RANK=$SLURM_PROCID`) -> every task says 0.
        "exported-rank-disagrees-with-procid",
        _with(SRUN, RANK="0", WORLD_SIZE="4"),
        ["RANK='0'", "SLURM_PROCID (=2)", "unset RANK"],
    ),
    (
        "exported-world-disagrees-with-ntasks",
        _with(SRUN, WORLD_SIZE="8"),
        ["WORLD_SIZE='8'", "SLURM_NTASKS (=4)"],
    ),
    (
        "slurm-batch-script-multi-task",
        _with(SRUN, SLURM_STEP_ID=None, SLURM_STEPID=None, SLURM_PROCID="0", SLURM_NODEID="0"),
        ["SLURM_PROCID='0'", "SLURM_NTASKS=4", "no SLURM_STEP_ID", "srun python"],
    ),
    ("slurm-missing-ntasks", _with(SRUN, SLURM_NTASKS=None), ["SLURM_NTASKS is not set", "srun"]),
    (
        "slurm-missing-layout",
        _with(SRUN, SLURM_NTASKS_PER_NODE=None, SLURM_TASKS_PER_NODE=None, SLURM_STEP_TASKS_PER_NODE=None),
        ["SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "--ntasks-per-node"],
    ),
    ("slurm-bad-layout", _with(SRUN, SLURM_STEP_TASKS_PER_NODE="2(x)"), ["SLURM_STEP_TASKS_PER_NODE='2(x)'", "2(x3),1"]),
    ("slurm-nodeid-beyond-layout", _with(SRUN, SLURM_NODEID="2"), ["SLURM_NODEID=2", "lists only 2 node(s)"]),
    (
        "slurm-no-nodelist-no-master",
        _with(SRUN, SLURM_JOB_NODELIST=None, SLURM_STEP_NODELIST=None, SLURM_NODELIST=None),
        ["SLURM_JOB_NODELIST is not set", "MASTER_ADDR"],
    ),
    (
        "slurm-bad-nodelist",
        _with(SRUN, SLURM_STEP_NODELIST="vnode[1-", SLURM_JOB_NODELIST="vnode[1-"),
        ["'vnode[1-'", "MASTER_ADDR"],
    ),
    ("torchrun-missing-master-addr", _with(TORCHRUN, MASTER_ADDR=None), ["MASTER_ADDR is not set", "torchrun"]),
    ("deepspeed-missing-node-rank", _with(DEEPSPEED, CROSS_RANK=None), ["CROSS_RANK is not set", "deepspeed"]),
    ("port-out-of-range", _with(TORCHRUN, MASTER_PORT="70000"), ["MASTER_PORT='70000'", "[1, 65535]"]),
    ("port-not-int", _with(SRUN, MASTER_PORT="auto"), ["MASTER_PORT='auto'", "not an integer"]),
    (
        "rank-without-launcher",
        {"RANK": "1", "WORLD_SIZE": "2"},
        ["RANK='1'", "WORLD_SIZE='2'", "no launcher", "torchrun"],
    ),
    ("single-with-local-rank", {"LOCAL_RANK": "1"}, ["LOCAL_RANK='1'", "single-process"]),
]


@pytest.mark.parametrize("environ,fragments", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_resolve_errors(environ, fragments):
    with pytest.raises(DistEnvError) as info:
        resolve(environ)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_resolve_reads_os_environ_by_default(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in DEEPSPEED or key in TORCHRUN or key in ("LOCAL_WORLD_SIZE",):
            monkeypatch.delenv(key, raising=False)
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    assert resolve() == DistEnv(3, 3, 0, 16, 8, "gpu-a01", 29400, "torchrun")


def test_distenv_is_frozen():
    env = resolve({})
    with pytest.raises(Exception):
        env.rank = 1  # type: ignore[misc]
    assert env.is_main and env.is_local_main


NODELIST_CASES = [
    ("vnode[1-2]", ["vnode1", "vnode2"]),
    ("a[01-03,7],b", ["a01", "a02", "a03", "a7", "b"]),
    ("node1", ["node1"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("x[1-2]-ib,y", ["x1-ib", "x2-ib", "y"]),
    ("c[5],d[1,3]", ["c5", "d1", "d3"]),
]


@pytest.mark.parametrize("nodelist,expected", NODELIST_CASES)
def test_expand_nodelist_python(nodelist, expected):
    assert expand_nodelist(nodelist, use_scontrol=False) == expected


@pytest.mark.parametrize("bad", ["", "  ", "vnode[1-", "vnode]1[", "n[2-1]", "n[a-b]"])
def test_expand_nodelist_errors(bad):
    with pytest.raises(DistEnvError):
        expand_nodelist(bad, use_scontrol=False)


def test_expand_nodelist_without_slurm_config_does_not_wait(monkeypatch):
    # scontrol retries for 60 s when it finds no configuration; it must not be called then.
    monkeypatch.delenv("SLURM_CONF", raising=False)
    start = time.monotonic()
    assert expand_nodelist("vnode[1-2]", environ={"SLURM_CONF": "/nonexistent/slurm.conf"}) in (
        ["vnode1", "vnode2"],
    )
    assert time.monotonic() - start < 3


@pytest.mark.parametrize(
    "value,expected",
    [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1(x2)", [1, 1]), ("2,1", [2, 1]), (" 3 ( x2 ) ".replace(" ", ""), [3, 3])],
)
def test_parse_tasks_per_node(value, expected):
    assert parse_tasks_per_node(value) == expected


def test_slurm_master_port():
    assert dist.slurm_master_port(1) == 10001
    assert dist.slurm_master_port(20000) == 10000
    assert dist.slurm_master_port(123456) == 13456


def test_startup_line():
    env = DistEnv(3, 3, 0, 16, 8, "host", 29500, "slurm")
    assert dist.startup_line(env) == "rank 3/16 local 3 node 0 via slurm, master host:29500"


def test_export_for_torch(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "placeholder")  # setenv (not delenv) so the undo removes what export writes
    env = resolve(SRUN)
    dist.export_for_torch(env)
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "2",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "vnode1",
        "MASTER_PORT": "11234",
    }
    # Resolving again inside the same srun task gives the same identity.
    exported = {**SRUN, **{k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}}
    assert resolve(exported) == env


def test_check_master_reachable_resolves_localhost():
    env = DistEnv(1, 0, 0, 2, 2, "localhost", 29500, "torchrun")
    assert dist.check_master_reachable(env, timeout_s=5) in ("127.0.0.1", "::1")


def test_check_master_reachable_fails_fast_for_unknown_host():
    env = DistEnv(1, 0, 1, 2, 1, "no-such-host.invalid", 12345, "slurm")
    start = time.monotonic()
    with pytest.raises(DistEnvError) as info:
        dist.check_master_reachable(env, timeout_s=5)
    assert time.monotonic() - start < 6
    assert "MASTER_ADDR='no-such-host.invalid'" in str(info.value)
    assert "/etc/hosts" in str(info.value)


def test_module_does_not_import_torch():
    code = "import sys, itune.dist; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


# ------------------------------------------------------------------------------------------ hostfile

HOSTFILE_CASES = [
    (
        "gpus-on-node",
        {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"},
        None,
        ["gpu01 slots=8", "gpu02 slots=8"],
    ),
    ("ntasks-per-node", {"SLURM_JOB_NODELIST": "vnode[1-2]", "SLURM_NTASKS_PER_NODE": "2"}, None, ["vnode1 slots=2", "vnode2 slots=2"]),
    (
        "tasks-per-node-uneven",
        {"SLURM_JOB_NODELIST": "a[1-3],b", "SLURM_TASKS_PER_NODE": "2(x3),1"},
        None,
        ["a1 slots=2", "a2 slots=2", "a3 slots=2", "b slots=1"],
    ),
    ("explicit-slots-win", {"SLURM_JOB_NODELIST": "vnode[1-2]", "SLURM_GPUS_ON_NODE": "8"}, 4, ["vnode1 slots=4", "vnode2 slots=4"]),
]


@pytest.mark.parametrize("environ,slots,expected", [c[1:] for c in HOSTFILE_CASES], ids=[c[0] for c in HOSTFILE_CASES])
def test_hostfile_lines(environ, slots, expected):
    assert slurm_hostfile.hostfile_lines(environ, slots=slots) == expected


@pytest.mark.parametrize(
    "environ,slots,fragment",
    [
        ({}, None, "not inside a Slurm allocation"),
        ({"SLURM_JOB_NODELIST": "vnode[1-2]"}, None, "--slots N"),
        ({"SLURM_JOB_NODELIST": "vnode[1-2]", "SLURM_GPUS_ON_NODE": "0"}, None, "SLURM_GPUS_ON_NODE='0'"),
        ({"SLURM_JOB_NODELIST": "vnode[1-2]", "SLURM_TASKS_PER_NODE": "2"}, None, "lists 1 nodes"),
        ({"SLURM_JOB_NODELIST": "vnode[1-2]"}, 0, "--slots 0"),
    ],
)
def test_hostfile_errors(environ, slots, fragment):
    with pytest.raises(slurm_hostfile.HostfileError) as info:
        slurm_hostfile.hostfile_lines(environ, slots=slots)
    assert fragment in str(info.value)


def test_hostfile_main_writes_file(tmp_path):
    out = tmp_path / "hostfile"
    env = {"SLURM_JOB_NODELIST": "vnode[1-2]", "SLURM_NTASKS_PER_NODE": "1"}
    assert slurm_hostfile.main(["--out", str(out)], environ=env) == 0
    assert out.read_text() == "vnode1 slots=1\nvnode2 slots=1\n"
    assert slurm_hostfile.main(["--out", str(out), "--slots", "3"], environ=env) == 0
    assert out.read_text() == "vnode1 slots=3\nvnode2 slots=3\n"
    assert [p.name for p in tmp_path.iterdir()] == ["hostfile"]  # no temporary files left


def test_hostfile_main_stdout(capsys):
    assert slurm_hostfile.main([], environ={"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "4"}) == 0
    assert capsys.readouterr().out == "n1 slots=4\nn2 slots=4\n"


def test_hostfile_cli_outside_allocation(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.slurm_hostfile", "--out", str(tmp_path / "hf")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "not inside a Slurm allocation" in proc.stderr
    assert not (tmp_path / "hf").exists()
