"""The same training run through different launchers, and a mis-launch that must fail fast.

* ``torchrun --nproc-per-node 2 launcher/train.py ...`` gives exactly the per-step losses of
  ``deepspeed --num_gpus 2 launcher/train.py ...`` (the identity comes from itune.dist either way).
* One plain ``python launcher/train.py`` with ``RANK=5 WORLD_SIZE=2`` (no launcher) stops within seconds with the
  DistEnvError message instead of waiting in the first collective for peers that will never come.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MISTRAL, ROOT, SUPERNI, deepspeed_cmd, free_port, run_cmd

pytestmark = pytest.mark.distributed

PY = sys.executable
CONFIG = "configs/superni_tiny.yaml"
OVERRIDES = ("train.max_steps=3", "checkpoint.export=false")


def _bin(name: str) -> str:
    return shutil.which(name, path=str(Path(PY).parent)) or name


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())]


def torchrun_cmd(nproc: int, script: str, *args: str) -> list[str]:
    """The real `torchrun` of this environment, `nproc` local workers, on a free port."""
    port = free_port()
    return [_bin("torchrun"), "--nproc-per-node", str(nproc), "--master-port", str(port), script, *args]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("launchers_data") / "superni_512"
    run_cmd([_bin("itune-data"), "prepare", "--superni", str(SUPERNI), "--tokenizer", str(MISTRAL), "--seq-len",
             "512", "--out", str(out)])
    return out


def test_torchrun_equals_deepspeed_launcher(data, tmp_path):
    runs = {}
    for name, cmd in (("deepspeed", deepspeed_cmd), ("torchrun", torchrun_cmd)):
        run = tmp_path / name
        # torchrun sets OMP_NUM_THREADS=1 and the deepspeed launcher leaves it unset (2 threads here): another
        # thread count sums in another order (step 2 differs by 1e-8), so both run with one thread per rank
        proc = run_cmd(cmd(2, "launcher/train.py", "--config", CONFIG, f"output_dir={run}", f"data.path={data}",
                           *OVERRIDES), env={"OMP_NUM_THREADS": "1"})
        log = proc.stdout + proc.stderr
        assert f"rank 0/2 local 0 node 0 via {name}" in log, log[-4000:]
        runs[name] = _losses(run)
    assert [s for s, _ in runs["deepspeed"]] == [1, 2, 3]
    assert runs["torchrun"] == runs["deepspeed"]  # exact equality, step by step


def _mislaunch(tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    """One process that claims to be rank 5 of 2 without any launcher."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_"))
           and k not in {"LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE",
                         "MASTER_ADDR", "MASTER_PORT"}}
    env.update(RANK="5", WORLD_SIZE="2", PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.run([PY, "launcher/train.py", "--config", CONFIG, f"output_dir={tmp_path / 'run'}",
                           f"data.path={tmp_path / 'no-data'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def test_mislaunch_fails_fast_with_dist_env_error(tmp_path):
    proc, elapsed = _mislaunch(tmp_path)
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.1f} s"  # seconds (imports on 2 busy cores), not a collective timeout
    assert "RANK='5' (WORLD_SIZE='2') is set but no launcher is recognised" in proc.stderr, proc.stderr[-3000:]
    assert "launch with torchrun, deepspeed or srun" in proc.stderr
    assert not (tmp_path / "run").exists()  # stopped before any output


def test_mislaunch_exits_2_with_one_line_error(tmp_path):
    proc, _ = _mislaunch(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: RANK='5' (WORLD_SIZE='2') is set")
    assert "Traceback" not in proc.stderr


def test_cpu_launch_builds_no_shm_op_leaves_no_shared_memory_and_ignores_a_stale_extension_lock(data, tmp_path):
    """On CPU DeepSpeed's shared-memory all-reduce op is not used: no JIT build, no lock file under
    TORCH_EXTENSIONS_DIR (a stale one, left by a rank killed while loading the op, made every later launch wait
    forever), and no /dev/shm segments left behind (66 MB per rank per launch, never unlinked)."""
    ext = tmp_path / "torch_extensions"  # with TORCH_EXTENSIONS_DIR set, torch builds op NAME in ext/NAME
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")  # what a killed build leaves: torch's FileBaton waits until this file disappears
    cmd = deepspeed_cmd(2, "launcher/train.py", "--config", CONFIG, f"output_dir={tmp_path / 'run'}",
                        f"data.path={data}", "train.max_steps=1", "checkpoint.export=false")
    port = cmd[cmd.index("--master_port") + 1]
    proc = run_cmd(cmd, env={"TORCH_EXTENSIONS_DIR": str(ext)}, timeout=600)
    log = proc.stdout + proc.stderr
    assert "rank 0/2" in log and len(_losses(tmp_path / "run")) == 1
    assert "deepspeed_shm_comm" not in log  # neither built nor loaded
    assert lock.exists() and [p.name for p in lock.parent.iterdir()] == ["lock"]
    assert sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) == []
