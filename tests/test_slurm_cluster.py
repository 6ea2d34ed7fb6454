"""itune.dist and launcher.slurm_hostfile through a real (local, two-node) Slurm cluster."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from itune.dist import expand_nodelist

try:
    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)
except ModuleNotFoundError:  # plain `pytest`: tests/ is on sys.path, the repository root is not
    from slurm_cluster import slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# Runs in every srun task: resolve the identity, all_reduce over gloo, record what happened.
ALLREDUCE_WORKER = """
import json, os, sys
from datetime import timedelta
from itune import dist

out = sys.argv[1]
env = dist.resolve()
dist.check_master_reachable(env, timeout_s=10)
dist.export_for_torch(env)
import torch
import torch.distributed as td
td.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
value = torch.tensor([float(env.rank + 1)])
td.all_reduce(value)
record = {**env.__dict__, "sum": value.item(), "torch_rank": td.get_rank(), "torch_world": td.get_world_size(),
          "nodename": os.environ["SLURMD_NODENAME"]}
td.destroy_process_group()
with open(os.path.join(out, f"rank{env.rank}.line"), "w") as fh:
    fh.write(dist.startup_line(env) + "\\n")
with open(os.path.join(out, f"rank{env.rank}.json"), "w") as fh:
    json.dump(record, fh)
"""

# Identity only (no torch): cheap enough for 4 tasks on this machine.
RESOLVE_WORKER = """
import json, os, sys
from itune import dist
env = dist.resolve()
with open(os.path.join(sys.argv[1], f"task{os.environ['SLURM_PROCID']}.json"), "w") as fh:
    json.dump({**env.__dict__, "nodename": os.environ["SLURMD_NODENAME"]}, fh)
"""


def _script(body: str, out: Path, *sbatch: str) -> str:
    header = "\n".join(f"#SBATCH {opt}" for opt in (f"--output={out}/slurm-%j.out", "--time=5", *sbatch))
    return f"#!/bin/bash\n{header}\nset -euo pipefail\ncd {REPO}\nexport PYTHONPATH={REPO}\n{textwrap.dedent(body)}"


def _job_output(out: Path, job_id: int) -> str:
    path = out / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else "(no job output)"


def test_srun_two_nodes_gloo_all_reduce(slurm_cluster, tmp_path):
    (tmp_path / "worker.py").write_text(ALLREDUCE_WORKER)
    script = _script(f"srun {PY} {tmp_path}/worker.py {tmp_path}\n", tmp_path, "--nodes=2", "--ntasks-per-node=1")
    job_id, rc = slurm_cluster.submit(script)
    assert rc == 0, _job_output(tmp_path, job_id)
    assert slurm_cluster.job_state(job_id) == "COMPLETED"

    port = 10000 + job_id % 20000
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, record in enumerate(records):
        assert record == {
            "rank": rank,
            "local_rank": 0,
            "node_rank": rank,
            "world_size": 2,
            "local_world_size": 1,
            "master_addr": "vnode1",
            "master_port": port,
            "source": "slurm",
            "sum": 3.0,
            "torch_rank": rank,
            "torch_world": 2,
            "nodename": f"vnode{rank + 1}",
        }
        assert (tmp_path / f"rank{rank}.line").read_text() == (
            f"rank {rank}/2 local 0 node {rank} via slurm, master vnode1:{port}\n"
        )


def test_srun_cyclic_node_rank_from_nodeid(slurm_cluster, tmp_path):
    (tmp_path / "worker.py").write_text(RESOLVE_WORKER)
    script = _script(
        f"srun --distribution=cyclic {PY} {tmp_path}/worker.py {tmp_path}\n",
        tmp_path,
        "--nodes=2",
        "--ntasks-per-node=2",
    )
    job_id, rc = slurm_cluster.submit(script)
    assert rc == 0, _job_output(tmp_path, job_id)
    tasks = {r: json.loads((tmp_path / f"task{r}.json").read_text()) for r in range(4)}
    # Cyclic: ranks 0,2 on vnode1 and 1,3 on vnode2, so rank // local_world_size would be wrong for ranks 1 and 2.
    got = {r: (t["rank"], t["local_rank"], t["node_rank"], t["world_size"], t["local_world_size"], t["nodename"]) for r, t in tasks.items()}
    assert got == {
        0: (0, 0, 0, 4, 2, "vnode1"),
        1: (1, 0, 1, 4, 2, "vnode2"),
        2: (2, 1, 0, 4, 2, "vnode1"),
        3: (3, 1, 1, 4, 2, "vnode2"),
    }
    assert {t["master_addr"] for t in tasks.values()} == {"vnode1"}


def test_sub_step_on_second_node_uses_its_own_master(slurm_cluster, tmp_path):
    (tmp_path / "worker.py").write_text(RESOLVE_WORKER)
    script = _script(
        f"srun --nodes=1 --ntasks=1 -w vnode2 {PY} {tmp_path}/worker.py {tmp_path}\n",
        tmp_path,
        "--nodes=2",
        "--ntasks-per-node=1",
    )
    job_id, rc = slurm_cluster.submit(script)
    assert rc == 0, _job_output(tmp_path, job_id)
    task = json.loads((tmp_path / "task0.json").read_text())
    assert (task["rank"], task["node_rank"], task["world_size"], task["master_addr"], task["nodename"]) == (
        0, 0, 1, "vnode2", "vnode2",
    )


def test_resolve_in_batch_script_of_multi_task_job_fails(slurm_cluster, tmp_path):
    body = f"{PY} -c 'from itune import dist; dist.resolve()'\n"
    job_id, rc = slurm_cluster.submit(_script(body, tmp_path, "--nodes=2", "--ntasks-per-node=1"))
    assert rc == 1
    assert slurm_cluster.job_state(job_id) == "FAILED"
    output = _job_output(tmp_path, job_id)
    assert "DistEnvError" in output and "no SLURM_STEP_ID" in output and "srun python" in output


def test_hostfile_inside_allocation(slurm_cluster, tmp_path):
    body = f"""
    {PY} -m launcher.slurm_hostfile --out {tmp_path}/hostfile
    {PY} -m launcher.slurm_hostfile --out {tmp_path}/hostfile4 --slots 4
    """
    job_id, rc = slurm_cluster.submit(_script(body, tmp_path, "--nodes=2", "--ntasks-per-node=2"), sbatch_wait=True)
    assert rc == 0, _job_output(tmp_path, job_id)
    assert slurm_cluster.job_state(job_id) == "COMPLETED"
    assert (tmp_path / "hostfile").read_text() == "vnode1 slots=2\nvnode2 slots=2\n"
    assert (tmp_path / "hostfile4").read_text() == "vnode1 slots=4\nvnode2 slots=4\n"


def test_scontrol_and_python_expanders_agree(slurm_cluster):
    for nodelist in ("vnode[1-2]", "a[01-03,7],b", "r[1-2]n[08-10]", "gpu[098-101],x-ib"):
        via_scontrol = slurm_cluster.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()
        assert expand_nodelist(nodelist, use_scontrol=False) == via_scontrol
        assert expand_nodelist(nodelist, environ=slurm_cluster.env) == via_scontrol
