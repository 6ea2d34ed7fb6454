"""A rank ends without interpreter shutdown once its process group ran (itune.comm.exit_process): gloo worker
threads still running there could abort it ("terminate called without an active exception")."""

import subprocess
import sys

from tests.conftest import ROOT, free_port

CHILD = """
import atexit, os, sys
sys.path.insert(0, {root!r})
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  LOCAL_WORLD_SIZE="1")
from itune.comm import close_distributed, exit_process, init_distributed
init_distributed()
import torch, torch.distributed as tdist
held = tdist.new_group([0])  # a reference that outlives the group's destruction, as a DeepSpeed engine's
t = torch.ones(1)
tdist.all_reduce(t, group=held)
atexit.register(lambda: print("interpreter shutdown ran", flush=True))
f = open(sys.argv[1], "w"); f.write("complete"); f.close()
close_distributed()
names = [open(f"/proc/self/task/{{x}}/comm").read().strip() for x in os.listdir("/proc/self/task")]
print("gloo threads after close:", sum(n.startswith("pt_gloo") for n in names))
print("buffered tail", end="")
exit_process(3)
"""


def test_exit_skips_interpreter_shutdown_with_gloo_threads_alive(tmp_path):
    out = tmp_path / "out.txt"
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), port=free_port()), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    alive = int(next(x for x in lines if x.startswith("gloo threads after close:")).split(":")[1])
    assert alive >= 1  # the situation of a DeepSpeed run: worker threads outlive destroy_process_group
    assert r.stdout.endswith("buffered tail")  # flushed before the exit
    assert "interpreter shutdown ran" not in r.stdout and "terminate called" not in r.stderr
    assert out.read_text() == "complete"


def test_exit_without_a_process_group_is_a_plain_exit():
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import atexit; " \
           "atexit.register(lambda: print('shutdown ran')); from itune.comm import exit_process; exit_process(4)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 4 and r.stdout == "shutdown ran\n"
