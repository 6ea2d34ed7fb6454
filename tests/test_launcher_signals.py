"""A signal to the command the user typed reaches every rank, and ranks never outlive their launcher.

``deepspeed`` (its runner) dies of SIGTERM / SIGUSR1 without passing them on, and ``torchrun`` of SIGUSR1; a
launcher killed with SIGKILL passes nothing on. Each rank watches its launcher processes
(:mod:`itune.preemption`): when they are gone it checkpoints at the next step boundary and exits 75, and a
relaunch resumes with the uninterrupted losses."""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from itune.preemption import EXIT_PREEMPTED, gone, launcher_chain
from tests.conftest import ROOT, _kill_group, deepspeed_cmd, run_cmd
from tests.test_launchers import torchrun_cmd

from tests.test_resume import COMMON, STEPS, _losses

pytestmark = pytest.mark.distributed


def _start(cmd, run, after_steps=2, timeout=600):
    """Starts a launcher in its own session; returns it with its rank processes once `after_steps` are logged."""
    # output to a file, not a pipe: once the launcher is gone nobody would read a pipe, and ranks writing into a
    # full one would block
    log = open(run.parent / f"{run.name}.log", "w")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"), start_new_session=True)
    p.output = lambda: (run.parent / f"{run.name}.log").read_text()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "losses.jsonl").exists() and len(_losses(run)) >= after_steps:
            break
        assert p.poll() is None, p.output()[-4000:]
        time.sleep(0.2)
    ranks = [c for c in psutil.Process(p.pid).children(recursive=True)
             if "launcher/train.py" in " ".join(c.cmdline()) and c.pid != p.pid
             and not any("deepspeed.launcher.launch" in a for a in c.cmdline())]
    assert len(ranks) == 2, [c.cmdline() for c in psutil.Process(p.pid).children(recursive=True)]
    return p, ranks


def _all_gone(procs, within):
    """Seconds until every process of `procs` is gone (fails after `within` seconds)."""
    t0 = time.time()
    _, alive = psutil.wait_procs(procs, timeout=within)
    assert not alive, [a.cmdline() for a in alive]
    return time.time() - t0


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, superni_data):
    tmp = tmp_path_factory.mktemp("signals")
    data = superni_data(512)
    run_cmd(deepspeed_cmd(2, "launcher/train.py", *COMMON, f"output_dir={tmp / 'full'}", f"data.path={data}"),
            env={"OMP_NUM_THREADS": "1"})
    return tmp, data, _losses(tmp / "full")


def _checkpointed_early(run):
    """The run stopped before its last step with a complete checkpoint (``latest`` names it)."""
    ckpt = json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "itune_state.json")
                      .read_text())
    assert 1 <= ckpt["global_step"] < STEPS


def _resumes_exactly(cmd_fn, tmp, data, run, full):
    _checkpointed_early(run)
    run_cmd(cmd_fn(2, "launcher/train.py", *COMMON, f"output_dir={run}", f"data.path={data}"),
            env={"OMP_NUM_THREADS": "1"})
    assert _losses(run) == full


@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])  # SIGUSR1 kills the command the same way
def test_signal_to_the_deepspeed_command_stops_every_rank_with_a_checkpoint(baseline, sig):
    tmp, data, full = baseline
    run = tmp / f"ds_{sig.name}"
    p, ranks = _start(deepspeed_cmd(2, "launcher/train.py", *COMMON, f"output_dir={run}", f"data.path={data}"), run)
    launch = psutil.Process(ranks[0].ppid())
    os.kill(p.pid, sig)  # only the command the user typed
    assert p.wait(timeout=30) == -sig  # it dies of the signal at once (the shell shows 128 + signal)
    try:
        _all_gone([*ranks, launch], within=60)
    finally:
        _kill_group(p.pid)
    assert launch.pid not in psutil.pids()
    out = p.output()
    assert "is gone; saving a checkpoint at the next step boundary" in out, out[-3000:]
    assert "checkpoint saved at optimizer step" in out and f"exiting with {EXIT_PREEMPTED}" in out
    _resumes_exactly(deepspeed_cmd, tmp, data, run, full)


def test_launcher_killed_during_start_up_leaves_no_rank(baseline):
    """The deepspeed command killed while the ranks still load: they stop at the first step boundary."""
    tmp, data, full = baseline
    run = tmp / "ds_startup"
    log = open(tmp / "ds_startup.log", "w")
    p = subprocess.Popen(deepspeed_cmd(2, "launcher/train.py", *COMMON, f"output_dir={run}", f"data.path={data}"),
                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # the ranks are up (the start-up line is printed), none trained yet
            try:
                ranks = [c for c in psutil.Process(p.pid).children(recursive=True)
                         if "--local_rank=" in " ".join(c.cmdline())]
            except psutil.Error:  # a short-lived child ended while listed
                continue
            if len(ranks) == 2 and "rank 0/2 local 0" in (tmp / "ds_startup.log").read_text():
                break
            time.sleep(0.1)
        assert len(ranks) == 2, (tmp / "ds_startup.log").read_text()[-3000:]
        os.kill(p.pid, signal.SIGTERM)
        _all_gone(ranks, within=120)
    finally:
        _kill_group(p.pid)
    out = (tmp / "ds_startup.log").read_text()
    assert "is gone; saving a checkpoint at the next step boundary" in out, out[-3000:]
    assert len(_losses(run)) < STEPS  # stopped early, at a step boundary with a checkpoint
    _resumes_exactly(deepspeed_cmd, tmp, data, run, full)


def test_launcher_killed_by_sigkill_leaves_no_rank(baseline):
    tmp, data, full = baseline
    run = tmp / "ds_sigkill"
    p, ranks = _start(deepspeed_cmd(2, "launcher/train.py", *COMMON, f"output_dir={run}", f"data.path={data}"), run)
    launch = psutil.Process(ranks[0].ppid())
    launch.kill()
    p.kill()
    try:
        _all_gone(ranks, within=60)
    finally:
        _kill_group(p.pid)
    _resumes_exactly(deepspeed_cmd, tmp, data, run, full)


def test_ctrl_c_stops_every_rank_with_a_checkpoint(baseline):
    tmp, data, _ = baseline
    run = tmp / "ds_ctrl_c"
    p, ranks = _start(deepspeed_cmd(2, "launcher/train.py", *COMMON, f"output_dir={run}", f"data.path={data}"), run)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal sends to the foreground process group
    try:
        _all_gone([p, *ranks], within=60)
    finally:
        _kill_group(p.pid)
    out = p.output()
    assert "preempted (SIGINT)" in out or "preempted (SIGTERM)" in out, out[-3000:]
    _checkpointed_early(run)


def test_sigusr1_to_torchrun_stops_every_rank_with_a_checkpoint(baseline):
    tmp, data, _ = baseline
    run = tmp / "torchrun_usr1"
    p, ranks = _start(torchrun_cmd(2, "launcher/train.py", *COMMON, f"output_dir={run}", f"data.path={data}"), run)
    os.kill(p.pid, signal.SIGUSR1)
    p.wait(timeout=30)
    try:
        _all_gone(ranks, within=60)
    finally:
        _kill_group(p.pid)
    _checkpointed_early(run)


def test_launcher_chain_and_gone(tmp_path):
    """The rank watches its parent (and the deepspeed runner above deepspeed.launcher.launch); a pid that
    disappears, or is reused by a newer process, is gone."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        me = psutil.Process()
        chain = launcher_chain("torchrun", pid=child.pid)
        assert [c[0] for c in chain] == [me.pid] and gone(chain) is None
        assert launcher_chain("single", pid=child.pid) == []
        assert gone([(child.pid, 0, "sleep")]) == (child.pid, "sleep")  # same pid, other start time: reused
    finally:
        child.kill()
        child.wait()
    assert gone([(child.pid, 0, "sleep 30")]) == (child.pid, "sleep 30")
