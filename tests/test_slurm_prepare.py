"""slurm/prepare.sbatch on a real (local) Slurm: a job array of 2 slices and the dependent merge job give the same
shards, rows and counts as one single-process ``itune-data prepare``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.cli import main
from itune.data.shards import read_manifest, verify
from tests.conftest import MISTRAL, ROOT
from tests.test_sources import ALPACA_LIBRE, SHAREGPT_DUMMY

pytestmark = [pytest.mark.slurm]

PREPARE_SBATCH = ROOT / "slurm" / "prepare.sbatch"


def _args(out: Path) -> list[str]:
    # alpaca_libre (1,205 records) is 2 chunks of 1,024, sharegpt (500) 1: slices 0 and 1 get chunks {0, 2} and {1}
    return ["--input", str(ALPACA_LIBRE), "--input", str(SHAREGPT_DUMMY), "--on-error", "skip",
            "--tokenizer", str(MISTRAL), "--seq-len", "512", "--out", str(out)]


def test_prepare_sbatch_parses_and_states_its_submit_command():
    subprocess.run(["bash", "-n", str(PREPARE_SBATCH)], check=True)
    lines = PREPARE_SBATCH.read_text().splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1].startswith("# sbatch --array=0-1 slurm/prepare.sbatch --input ")


def test_job_array_and_merge_equal_single_process(slurm_cluster, tmp_path):
    single = tmp_path / "single"
    assert main(["prepare", *_args(single)]) == 0
    out = tmp_path / "array"
    job, rc = slurm_cluster.submit(
        PREPARE_SBATCH, "--array=0-1", f"--output={tmp_path}/prepare-%A_%a.out",
        f"--export=ALL,ITUNE_PYTHON={sys.executable}", script_args=_args(out), wait=False)
    assert rc == 0
    logs = lambda: "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))  # noqa: E731
    for task in (0, 1):
        state = slurm_cluster.wait_job(f"{job}_{task}", timeout_s=600)
        assert state == "COMPLETED", logs()
    first = (tmp_path / f"prepare-{job}_0.out").read_text()
    m = re.search(r"itune: submitted merge job (\d+) \(after array job (\d+)\)", first)
    assert m and int(m.group(2)) == job, logs()
    merge_job = int(m.group(1))
    assert slurm_cluster.wait_job(merge_job, timeout_s=600) == "COMPLETED", logs()
    assert slurm_cluster.exit_code(merge_job) == 0
    merged_log = (out / f"slurm-merge-{merge_job}.out").read_text()
    assert "read 1705 = written 1699 + rejected 6" in merged_log
    assert "slice 1 of 2" in (tmp_path / f"prepare-{job}_1.out").read_text()
    a, b = read_manifest(single), read_manifest(out)
    assert b["preparation"]["slices"] == 2 and a["preparation"]["slices"] == 1
    for split in ("train",):
        sa, sb = a["splits"][split], b["splits"][split]
        assert sb["counts"] == sa["counts"] == {"read": 1705, "written": 1699, "rejected": {"empty_assistant": 6}}
        assert (sb["rows"], sb["tokens"], sb["trainable_tokens"]) == (sa["rows"], sa["tokens"], sa["trainable_tokens"])
        assert [s["sha256"] for s in sb["shards"]] == [s["sha256"] for s in sa["shards"]]  # the same rows, in order
    assert [s["counts"] for s in b["sources"]] == [s["counts"] for s in a["sources"]]
    assert (out / "rejects.jsonl").read_bytes() == (single / "rejects.jsonl").read_bytes()
    assert verify(out) == [] and not (out / "slices").exists()
    assert json.loads((out / "manifest.json").read_text())["source_files"] == a["source_files"]
