"""Non-finite steps: with ``train.skip_nonfinite_steps`` a step whose loss or gradient norm is not finite on one
rank is skipped on every rank (weights, AdamW state and lr schedule unchanged) and counted; beyond the allowance,
and by default, the run stops with FloatingPointError naming the step, the rank and the last good checkpoint.

The distributed tests run the trainer through the real ``deepspeed`` launcher (2 CPU ranks) under
``tests/scripts/nonfinite_run.py``, which injects the non-finite values on one rank and records each rank's state
around the chosen steps."""

import json
import math

import pytest
import torch

from itune.config import load_config
from itune.errors import ConfigError
from itune.train import StepResult, check_nonfinite
from tests.conftest import deepspeed_cmd, run_cmd

STEPS = 5
COMMON = ["--config", "configs/superni_tiny.yaml", f"train.max_steps={STEPS}", "train.epochs=1",
          "checkpoint.export=false", "train.progress_bar=false"]


def _result(loss=1.0, nonfinite=(), skipped=()):
    return StepResult(loss, 100, 200, list(nonfinite), list(skipped))


def test_check_nonfinite_counts_skips_up_to_the_allowance(tmp_path):
    skipped_at = []
    assert check_nonfinite(_result(), 1, 2, skipped_at, 1, tmp_path) is None and skipped_at == []
    what = check_nonfinite(_result(math.nan, [1], [0, 1]), 2, 2, skipped_at, 1, tmp_path)
    assert what == "non-finite loss nan at optimizer step 2 (rank 1)" and skipped_at == [2]
    with pytest.raises(FloatingPointError) as e:  # the second one is more than 1 allows
        check_nonfinite(_result(2.5, [], [0, 1]), 5, 2, skipped_at, 1, tmp_path)
    assert str(e.value) == (f"non-finite gradient norm at optimizer step 5 (loss 2.5000); 2 non-finite step(s) [2, 5], "
                            f"more than train.skip_nonfinite_steps=1 allows; last good checkpoint: None in {tmp_path}")


def test_a_step_deepspeed_applied_cannot_be_skipped(tmp_path):
    (tmp_path / "latest").write_text("global_step4")
    with pytest.raises(FloatingPointError, match=r"^non-finite loss inf at optimizer step 6 \(rank 0, 1\); DeepSpeed "
                                                 r"applied the update .* last good checkpoint: global_step4 in "):
        check_nonfinite(_result(math.inf, [0, 1], []), 6, 2, [], 10, tmp_path)


def test_config_default_and_range():
    assert load_config(None, ["data.path=x"]).train.skip_nonfinite_steps == 0
    with pytest.raises(ConfigError, match=r"train.skip_nonfinite_steps: must be >= 0, got -1"):
        load_config(None, ["data.path=x", "train.skip_nonfinite_steps=-1"])


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.fixture(scope="module")
def skipped_run(tmp_path_factory, superni_data):
    """Step 2: nan loss on rank 1; step 4: finite loss with nan gradients on rank 0; two skips allowed."""
    tmp = tmp_path_factory.mktemp("nonfinite")
    run, snap = tmp / "run", tmp / "snap"
    out = run_cmd(deepspeed_cmd(2, "tests/scripts/nonfinite_run.py", str(snap), "--inject", "2:1:loss",
                                "--inject", "4:0:grad", "--snapshot", "2", "--snapshot", "3", "--snapshot", "4",
                                *COMMON, f"output_dir={run}", f"data.path={superni_data(256)}",
                                "train.skip_nonfinite_steps=2"))
    snaps = {(r, k, when): torch.load(snap / f"rank{r}_step{k}_{when}.pt", weights_only=True)
             for r in (0, 1) for k in (2, 3, 4) for when in ("before", "after")}
    return run, out.stdout, snaps


@pytest.mark.distributed
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("step", [2, 4])
def test_skipped_step_changes_nothing_on_either_rank(skipped_run, rank, step):
    _, _, snaps = skipped_run
    before, after = snaps[(rank, step, "before")], snaps[(rank, step, "after")]
    assert len(before["weights"]) > 10 and before["adam"] and all(before["adam"])  # AdamW state exists (step 1 ran)
    for key in ("weights", "fp32", "adam", "lr", "scheduler_step"):
        assert _equal(before[key], after[key]), key
    assert after["skipped_steps"] == before["skipped_steps"] + 1


@pytest.mark.distributed
@pytest.mark.parametrize("rank", [0, 1])
def test_the_step_after_a_skip_updates_normally(skipped_run, rank):
    _, _, snaps = skipped_run
    before, after = snaps[(rank, 3, "before")], snaps[(rank, 3, "after")]
    assert not torch.equal(before["fp32"][0], after["fp32"][0])
    assert all(torch.isfinite(t).all() for t in after["weights"].values())
    assert after["scheduler_step"] == before["scheduler_step"] + 1
    assert all(int(a["step"]) == int(b["step"]) + 1 for a, b in zip(after["adam"], before["adam"]))
    assert after["skipped_steps"] == before["skipped_steps"] == 1


@pytest.mark.distributed
def test_skips_are_logged_counted_and_the_run_completes(skipped_run):
    run, stdout, _ = skipped_run
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["skipped_steps"] == 2 and summary["skipped_at"] == [2, 4]
    assert (run / "checkpoints" / "latest").read_text() == f"global_step{STEPS}"
    assert json.loads((run / "checkpoints" / f"global_step{STEPS}" / "itune_state.json").read_text())[
        "skipped_at"] == [2, 4]
    losses = [json.loads(x) for x in (run / "losses.jsonl").read_text().splitlines()]
    assert [x["step"] for x in losses] == [1, 2, 3, 4, 5]
    assert losses[1] == {"step": 2, "loss": None, "skipped": True}
    assert losses[3]["skipped"] is True and math.isfinite(losses[3]["loss"])
    assert all("skipped" not in x and math.isfinite(x["loss"]) for x in (losses[0], losses[2], losses[4]))
    metrics = {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if m["kind"] == "train"}
    assert [metrics[k]["skipped_steps"] for k in range(1, STEPS + 1)] == [0, 1, 1, 2, 2]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert ("step 2/5 skipped: non-finite loss nan at optimizer step 2 (rank 1); weights, optimizer state and lr "
            "schedule unchanged (skipped steps [2], at most 2 allowed)") in stdout
    assert "step 4/5 skipped: non-finite gradient norm at optimizer step 4 (loss " in stdout


@pytest.mark.distributed
def test_by_default_a_nonfinite_loss_stops_the_run(tmp_path, superni_data):
    run = tmp_path / "run"
    p = run_cmd(deepspeed_cmd(2, "tests/scripts/nonfinite_run.py", str(tmp_path / "snap"), "--inject", "2:1:loss",
                              *COMMON, f"output_dir={run}", f"data.path={superni_data(256)}",
                              "checkpoint.every_steps=1"), check=False)
    assert p.returncode != 0
    err = p.stdout + p.stderr
    assert (f"FloatingPointError: non-finite loss nan at optimizer step 2 (rank 1); 1 non-finite step(s) [2], more "
            f"than train.skip_nonfinite_steps=0 allows; last good checkpoint: global_step1 in {run / 'checkpoints'}"
            ) in err
    assert [json.loads(x)["step"] for x in (run / "losses.jsonl").read_text().splitlines()] == [1]
