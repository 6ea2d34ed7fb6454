"""slurm/train.sbatch and slurm/eval.sbatch on a real (local, two-node) Slurm cluster, 1 task per node.

* A 2-node sbatch run gives exactly the per-step losses of the same run under ``deepspeed --num_gpus 2``.
* Preemption: the warning signal (``scancel --signal=USR1 --batch``) makes the job checkpoint, exit 75 and
  requeue itself; the requeued run resumes from ``checkpoints/latest`` and the losses of steps 1..12 equal those
  of the uninterrupted deepspeed run.
* ZeRO-3 evaluation of the run directory through slurm/eval.sbatch.

The uninterrupted reference is computed once (module fixture) with the same config as both Slurm runs
(the LR schedule depends on the total number of steps, so every run here has ``train.max_steps=12``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MISTRAL, ROOT, SUPERNI, deepspeed_cmd, run_cmd

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

PY = sys.executable
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"
EVAL_SBATCH = ROOT / "slurm" / "eval.sbatch"
CONFIG = "configs/superni_tiny.yaml"
STEPS = 12
OVERRIDES = (f"train.max_steps={STEPS}", "checkpoint.every_steps=0", "checkpoint.export=false")
EXIT_PREEMPTED = 75  # itune.train.EXIT_PREEMPTED (not imported: that would import torch into the test process)
JOB_TIMEOUT_S = 1500  # 2 CPU cores shared with other work: one 12-step job takes ~2-3 min when the machine is idle
SBATCH_OPTS = ("--nodes=2", "--ntasks-per-node=1", "--time=60")


def _itune_data() -> str:
    return shutil.which("itune-data", path=str(Path(PY).parent)) or "itune-data"


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "losses.jsonl"
    if not path.exists():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def _output(out_dir: Path, job_id: int) -> str:
    path = out_dir / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job output)"


def _submit_train(cluster, out_dir: Path, run_dir: Path, data: Path, *, wait: bool) -> tuple[int, int]:
    """``sbatch --nodes=2 --ntasks-per-node=1 slurm/train.sbatch configs/superni_tiny.yaml output_dir=... ...``"""
    return cluster.submit(
        TRAIN_SBATCH,
        *SBATCH_OPTS,
        f"--output={out_dir}/slurm-%j.out",
        f"--export=ALL,ITUNE_PYTHON={PY},PYTHONUNBUFFERED=1",
        script_args=(CONFIG, f"output_dir={run_dir}", f"data.path={data}", *OVERRIDES),
        wait=wait,
        timeout_s=JOB_TIMEOUT_S,
    )


def _wait_until(predicate, what: str, timeout_s: float, on_timeout=lambda: "", poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}\n{on_timeout()}")
        time.sleep(poll_s)


def _nodes_idle(cluster) -> bool:
    proc = cluster.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
    states = [line.split()[1] for line in proc.stdout.splitlines() if len(line.split()) >= 2]
    return proc.returncode == 0 and bool(states) and all(s == "idle" for s in states)


def _release_requeued(cluster, job_id: int) -> None:
    """Start a requeued job now instead of after Slurm's hold (the credential lifetime, 120 s by default).

    A relaunch within the same second as the previous run's credential revocation is refused by slurmd ("Job
    credential revoked") and fails the job, so release only once the nodes are idle and a second has passed.
    """
    _wait_until(lambda: _nodes_idle(cluster), "idle nodes after the requeue", 120)
    time.sleep(2.0)
    cluster.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"])


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm_data") / "superni_512"
    run_cmd([_itune_data(), "prepare", "--superni", str(SUPERNI), "--tokenizer", str(MISTRAL), "--seq-len", "512",
             "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> list[tuple[int, float]]:
    """The uninterrupted run: ``deepspeed --num_gpus 2 launcher/train.py`` with the same config and overrides."""
    run = tmp_path_factory.mktemp("slurm_reference") / "run"
    run_cmd(deepspeed_cmd(2, "launcher/train.py", "--config", CONFIG, f"output_dir={run}", f"data.path={data}",
                          *OVERRIDES), timeout=JOB_TIMEOUT_S)
    losses = _losses(run)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    return losses


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, data, tmp_path_factory) -> dict:
    """An uninterrupted 2-node run of slurm/train.sbatch."""
    tmp = tmp_path_factory.mktemp("slurm_train")
    run = tmp / "run"
    job_id, rc = _submit_train(slurm_cluster, tmp, run, data, wait=True)
    return {"job": job_id, "rc": rc, "run": run, "tmp": tmp, "info": slurm_cluster.job_info(job_id),
            "output": _output(tmp, job_id)}


@pytest.fixture(scope="module")
def preempted_run(slurm_cluster, data, tmp_path_factory) -> dict:
    """A 2-node run that gets the warning signal after its second step, requeues itself and finishes."""
    tmp = tmp_path_factory.mktemp("slurm_preempt")
    run = tmp / "run"
    job_id, _ = _submit_train(slurm_cluster, tmp, run, data, wait=False)
    info = lambda: slurm_cluster.job_info(job_id)  # noqa: E731
    output = lambda: _output(tmp, job_id)[-6000:]  # noqa: E731

    def two_steps_logged():
        state = info().get("JobState")
        if state not in ("PENDING", "CONFIGURING", "RUNNING"):
            pytest.fail(f"job {job_id} ended ({state}) before its second step\n{output()}")
        return len(_losses(run)) >= 2

    _wait_until(two_steps_logged, "2 lines in losses.jsonl", JOB_TIMEOUT_S, output, poll_s=0.25)
    signalled_at_step = len(_losses(run))
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job_id)])

    def requeued():
        i = info()
        if i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            pytest.fail(f"job {job_id} ended ({i.get('JobState')}) instead of requeueing\n{output()}")
        return i if i.get("JobState") == "PENDING" and int(i.get("Restarts", "0")) >= 1 else None

    pending = _wait_until(requeued, "the job to be requeued (PENDING, Restarts=1)", 600, output)
    after_first_run = _output(tmp, job_id)
    _release_requeued(slurm_cluster, job_id)
    state = slurm_cluster.wait_job(job_id, timeout_s=JOB_TIMEOUT_S)
    return {"job": job_id, "run": run, "tmp": tmp, "pending": pending, "state": state,
            "rc": slurm_cluster.exit_code(job_id), "info": slurm_cluster.job_info(job_id),
            "signalled_at_step": signalled_at_step, "first_output": after_first_run, "output": _output(tmp, job_id)}


# ------------------------------------------------------------------------------------------- tests


def test_sbatch_scripts_parse_and_state_their_submit_command():
    for script, usage in ((TRAIN_SBATCH, "sbatch --nodes=2"), (EVAL_SBATCH, "sbatch --nodes=2")):
        subprocess.run(["bash", "-n", str(script)], check=True)
        lines = script.read_text().splitlines()
        assert lines[0] == "#!/bin/bash" and lines[1].startswith(f"# {usage} ") and f"slurm/{script.name}" in lines[1]
    text = TRAIN_SBATCH.read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --open-mode=append"):
        assert directive in text
    assert 'srun "$PYTHON" launcher/train.py --config "$CONFIG" "$@"' in text


def test_sbatch_two_nodes_equals_deepspeed_launcher(slurm_run, reference):
    out = slurm_run["output"]
    assert slurm_run["rc"] == 0, out[-6000:]
    assert slurm_run["info"]["JobState"] == "COMPLETED"
    port = 10000 + slurm_run["job"] % 20000
    assert f"rank 0/2 local 0 node 0 via slurm, master vnode1:{port}" in out
    assert "training step exited with 0" in out
    assert _losses(slurm_run["run"]) == reference  # exact equality, step by step


def test_preempted_job_requeues_resumes_and_matches_uninterrupted_run(preempted_run, reference):
    r = preempted_run
    out, first = r["output"], r["first_output"]
    assert r["state"] == "COMPLETED" and r["rc"] == 0, out[-6000:]
    assert r["pending"]["Restarts"] == "1" and r["info"]["Restarts"] == "1"

    # First run: signal forwarded, checkpoint at the next step boundary, exit 75, requeue.
    m = re.search(r"preempted \(.*\): checkpoint saved at optimizer step (\d+); exiting with 75", first)
    assert m, first[-6000:]
    saved = int(m.group(1))
    assert r["signalled_at_step"] <= saved < STEPS
    assert "batch script got SIGUSR1" in first
    assert f"training step exited with {EXIT_PREEMPTED}" in first and "requeueing job" in first
    assert "resumed from" not in first

    # Second run (SLURM_RESTART_COUNT=1): resumes from the checkpoint the first run saved.
    header = f"itune: job {r['job']} restart 1 "
    assert header in out, out[-6000:]
    second = out[out.index(header):]
    assert f"resumed from {r['run'] / 'checkpoints' / f'global_step{saved}'} at optimizer step {saved}" in second
    assert "training step exited with 0" in second
    assert (r["run"] / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}"

    losses = _losses(r["run"])
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))  # each step logged once
    assert losses == reference  # bit-identical to the uninterrupted run


def test_eval_sbatch_zero3_from_run_dir(slurm_cluster, slurm_run, data):
    """``sbatch --nodes=2 --ntasks-per-node=1 slurm/eval.sbatch --data DATA --run-dir RUN --out OUT ...``"""
    assert slurm_run["rc"] == 0
    tmp = slurm_run["tmp"]
    out = tmp / "eval"
    job_id, rc = slurm_cluster.submit(
        EVAL_SBATCH,
        *SBATCH_OPTS,
        f"--output={tmp}/slurm-%j.out",
        f"--export=ALL,ITUNE_PYTHON={PY},PYTHONUNBUFFERED=1",
        script_args=("--data", str(data), "--run-dir", str(slurm_run["run"]), "--out", str(out),
                     "--max-instances", "1", "--max-new-tokens", "4"),
        timeout_s=JOB_TIMEOUT_S,
    )
    assert rc == 0, _output(tmp, job_id)[-6000:]
    assert slurm_cluster.job_state(job_id) == "COMPLETED"
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 10  # first instance of each of the 10 test tasks, split over 2 ranks and gathered
    results = json.loads((out / "results.json").read_text())
    assert results["num_instances"] == 10 and results["step"] == STEPS
    assert json.loads((out / "official_results.json").read_text()) == results["results"]
