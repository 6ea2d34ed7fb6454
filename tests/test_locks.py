"""One process per output directory: a second run, prepare or evaluation on a directory in use is refused with
the holder's host, pid, start time and command line; a killed holder leaves no stale lock."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from itune.errors import ConfigError
from itune.lock import LOCK_NAME, hold_dir_lock
from tests.conftest import MISTRAL, ROOT, deepspeed_cmd, run_cmd

HOLD = "import sys; from itune.lock import hold_dir_lock; h = hold_dir_lock(sys.argv[1], 'holder'); " \
       "print('locked', flush=True); sys.stdin.read()"


@contextmanager
def held(directory: Path):
    """A child Python process holding the lock of ``directory`` until the block ends (then SIGKILL).

    Yields ``(process, the refusal's holder text)``."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "locked\n"
        started = json.loads((directory / LOCK_NAME).read_text())["started"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", started)
        yield p, (f"holder on host {socket.gethostname()}, pid {p.pid}, started {started}: "
                  + shlex.join([sys.executable, "-c", HOLD, str(directory)]))
    finally:
        p.kill()
        p.wait()


def test_second_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    d = tmp_path / "runs" / "x"  # created by the holder
    with held(d) as (child, holder):
        with pytest.raises(ConfigError) as e:
            hold_dir_lock(d, "training")
        assert str(e.value) == (f"{d}: in use by another run ({holder}); wait for it to finish or choose another "
                                "output_dir")
        assert json.loads((d / LOCK_NAME).read_text())["pid"] == child.pid  # the refused process wrote nothing
        child.send_signal(signal.SIGKILL)  # no clean-up: the kernel releases the lock
        child.wait()
        lock = hold_dir_lock(d, "training")
        record = json.loads((d / LOCK_NAME).read_text())
        assert (record["host"], record["pid"], record["what"]) == (socket.gethostname(), os.getpid(), "training")
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}, "):  # held by this process now
            hold_dir_lock(d, "training")
        lock.release()
    assert list(d.iterdir()) == []  # release removes the file
    hold_dir_lock(d, "training").release()


def test_trainer_lock_at_world_1_names_the_holder(tmp_path):
    from itune.train import lock_output_dir

    with held(tmp_path) as (_, holder):
        with pytest.raises(ConfigError) as e:
            lock_output_dir(tmp_path, 0, 1)
    assert str(e.value) == (f"{tmp_path}: in use by another run ({holder}); wait for it to finish or choose "
                            "another output_dir")
    lock = lock_output_dir(tmp_path, 0, 1)
    assert lock.holder["what"] == "training"
    lock.release()


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """A tiny Alpaca file with two tasks (b is held out when asked)."""
    f = tmp_path_factory.mktemp("src") / "tiny.jsonl"
    f.write_text("".join(json.dumps({"instruction": f"Say {w} {i} times.", "input": "", "output": f"{w} " * i,
                                     "category": c}) + "\n"
                         for i in range(1, 7) for w, c in (("yes", "a"), ("no", "b"))))
    return f


PREPARE = ["prepare", "--tokenizer", str(MISTRAL), "--seq-len", "64"]


def test_prepare_and_merge_refused_while_the_directory_is_in_use(tmp_path, jsonl, capsys):
    from data_tools.cli import main

    out = tmp_path / "data"
    with held(out) as (_, holder):
        assert main(PREPARE + ["--input", str(jsonl), "--out", str(out)]) == 2
        assert capsys.readouterr().err == (f"error: {out}: in use by another run ({holder}); wait for it to finish "
                                           "or choose another --out\n")
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing written
    assert main(PREPARE + ["--input", str(jsonl), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rejects.jsonl", "train-00000-of-00001.arrow"]

    sliced = tmp_path / "sliced"
    for i in (0, 1):  # job array tasks write their own slices and take no lock
        assert main(PREPARE + ["--input", str(jsonl), "--num-shards", "2", "--shard-index", str(i),
                               "--out", str(sliced)]) == 0
    capsys.readouterr()
    with held(sliced) as (_, holder):
        assert main(["merge", str(sliced)]) == 2
        assert capsys.readouterr().err == f"error: {sliced}: in use by another run ({holder}); wait for it to finish\n"
        assert not (sliced / "manifest.json").exists()
    assert main(["merge", str(sliced)]) == 0
    assert sorted(p.name for p in sliced.iterdir()) == ["manifest.json", "rejects.jsonl", "train-00000-of-00001.arrow"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, jsonl):
    """Prepared rows with a held-out split ``test`` (task b)."""
    from data_tools.cli import main

    out = tmp_path_factory.mktemp("prepared") / "data"
    assert main(PREPARE + ["--input", str(jsonl), "--task-field", "category", "--heldout-tasks", "b",
                           "--out", str(out)]) == 0
    return out


def test_eval_refused_before_loading_the_model_while_out_is_in_use(tmp_path, data, capsys):
    from itune.eval.cli import main

    out = tmp_path / "eval"
    with held(out) as (_, holder):
        assert main(["--data", str(data), "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {out}: in use by another run ({holder}); wait for it to finish or "
                                       "choose another --out\n")
    # unlocked: the lock comes and goes, and a failed evaluation leaves no directory it created behind
    assert main(["--data", str(data), "--model", str(tmp_path / "no-model")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'no-model'}: not a Hugging Face model directory (no " \
                                      "config.json)\n"
    assert [f.name for f in tmp_path.iterdir()] == ["eval"]  # eval/ keeps the killed holder's (free) lock file


TRAIN = ["--config", "configs/superni_tiny.yaml", "train.max_steps=1", "checkpoint.export=false",
         "train.progress_bar=false"]


@pytest.mark.distributed
def test_two_ranks_both_stop_with_the_same_line(tmp_path, data):
    run = tmp_path / "run"
    with held(run) as (_, holder):
        p = run_cmd(deepspeed_cmd(2, "launcher/train.py", *TRAIN, f"data.path={data}", f"output_dir={run}"),
                    check=False, timeout=600)
        assert [f.name for f in run.iterdir()] == [LOCK_NAME]  # refused before anything is written
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-4000:]
    line = f"error: {run}: in use by another run ({holder}); wait for it to finish or choose another output_dir"
    # rank 0 and rank 1 (their lines may interleave in the launcher's stderr)
    assert p.stderr.count(line) == 2 and "error:" not in p.stderr.replace(line, "")
