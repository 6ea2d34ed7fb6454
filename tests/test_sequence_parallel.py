"""Ulysses sequence parallelism on packed rows (train.sequence_parallel_size): 2 ranks sharing each row equal one
process computing whole rows, loss and gathered gradients, with examples that straddle the shard boundary."""

import shutil

import pytest
import torch

from itune.config import BatchPlan
from itune.sequence_parallel import SequenceParallel, packed_mask
from tests.conftest import deepspeed_cmd, run_cmd

def test_packed_mask_and_shards():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = packed_mask(pos)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                 [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    t = torch.arange(12).reshape(2, 6)
    assert SequenceParallel(2, 1).shard(t).tolist() == [[3, 4, 5], [9, 10, 11]]
    plan = BatchPlan(rows=100, seq_len=256, micro_batch_size=2, gradient_accumulation_steps=1, world_size=1,
                     epochs=1, max_steps=None, sequence_parallel_size=2)
    assert "2 rows/micro-batch/SP group x 1 accumulation x 1 sequence-parallel groups of 2 ranks = 2 rows" \
        in plan.describe() and "512 tokens per SP group and 256 per rank per forward" in plan.describe()


@pytest.mark.distributed
def test_sp2_equals_one_process(tmp_path, superni_data):
    data = superni_data(256)
    out = {}
    for world, sp in ((1, 1), (2, 2)):
        f = tmp_path / f"w{world}.pt"
        run_cmd(deepspeed_cmd(world, "tests/scripts/grad_split.py", str(f), "--config", "configs/superni_tiny.yaml",
                              f"output_dir={tmp_path / f'run{world}'}", f"data.path={data}",
                              "train.micro_batch_size=4", "train.gradient_accumulation_steps=1",
                              "train.progress_bar=false", f"train.sequence_parallel_size={sp}",
                              "train.loss_tile_tokens=48"))  # the tiled loss (default), tiles of 48 trained positions
        out[world] = torch.load(f, weights_only=True)
    ref, got = out[1], out[2]
    assert (got["position_ids"] == ref["position_ids"]).all()  # the same rows
    assert (ref["position_ids"][:, 128] != 0).any()  # an example runs across the shard boundary (128 of 256)
    assert got["target_tokens"] == ref["target_tokens"] > 0
    assert abs(got["loss"] - ref["loss"]) < 1e-5
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert (got["grads"][name] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-8, name


@pytest.mark.distributed
def test_preempted_sp_run_resumes_with_identical_losses(tmp_path, superni_data):
    from itune.train import EXIT_PREEMPTED
    from tests.test_resume import COMMON, STEPS, _losses, _preempt

    data = superni_data(256)
    sp = ["train.sequence_parallel_size=2", f"data.path={data}"]
    ref = tmp_path / "uninterrupted"
    out = run_cmd(deepspeed_cmd(2, "launcher/train.py", *COMMON, *sp, f"output_dir={ref}")).stdout
    assert "sequence parallelism: 2 ranks per row" in out and "1 sequence-parallel groups of 2 ranks" in out
    run = tmp_path / "preempted"
    cmd = deepspeed_cmd(2, "launcher/train.py", *COMMON, *sp, f"output_dir={run}")
    rc, out = _preempt(cmd, run)
    assert rc == EXIT_PREEMPTED, out[-3000:]
    saved = int((run / "checkpoints" / "latest").read_text().removeprefix("global_step"))
    assert 2 <= saved < STEPS
    shutil.copytree(run, tmp_path / "one_rank")
    out = run_cmd(cmd).stdout
    assert f"resumed from {run / 'checkpoints' / f'global_step{saved}'}" in out
    assert _losses(run) == _losses(ref)  # exactly equal, step by step
    # the SP=2 checkpoint resumed on 1 rank without SP (DeepSpeed's universal checkpoint; the same rows per step:
    # one data-parallel group either way)
    one = tmp_path / "one_rank"
    out = run_cmd(deepspeed_cmd(1, "launcher/train.py", *COMMON, f"data.path={data}", f"output_dir={one}")).stdout
    assert "saved with 2 ranks, now 1" in out
    got, want = _losses(one), _losses(ref)
    assert [x["step"] for x in got] == [x["step"] for x in want] and got[:saved] == want[:saved]
    assert abs(got[saved]["loss"] - want[saved]["loss"]) < 1e-5  # the restored weights, seen without SP
    assert all(abs(a["loss"] - b["loss"]) < 1e-2 for a, b in zip(got[saved:], want[saved:]))
