"""The loss and the gradients of an optimizer step do not depend on how its rows are split into ranks and
micro-batches (sum of token CE / global count of trained tokens; transformers #24725, torchtune PR #1875)."""

import pytest
import torch

from tests.conftest import deepspeed_cmd, run_cmd

pytestmark = pytest.mark.distributed

SPLITS = [(2, 4, 1), (2, 2, 2), (2, 1, 4), (1, 4, 2)]  # (world, micro_batch_size, accumulation): 8 rows per step


@pytest.fixture(scope="module")
def results(tmp_path_factory, superni_data):
    tmp = tmp_path_factory.mktemp("split")
    data = superni_data(256)
    out = {}
    for world, micro, acc in SPLITS:
        f = tmp / f"w{world}m{micro}a{acc}.pt"
        run_cmd(deepspeed_cmd(world, "tests/scripts/grad_split.py", str(f), "--config", "configs/superni_tiny.yaml",
                              f"output_dir={tmp / 'run'}", f"data.path={data}", f"train.micro_batch_size={micro}",
                              f"train.gradient_accumulation_steps={acc}", "train.progress_bar=false"))
        out[(world, micro, acc)] = torch.load(f, weights_only=True)
    return out


@pytest.mark.parametrize("split", SPLITS[1:])
def test_same_loss_and_gradients(results, split):
    ref, got = results[SPLITS[0]], results[split]
    assert got["target_tokens"] == ref["target_tokens"] > 0
    assert abs(got["loss"] - ref["loss"]) < 1e-5
    assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) > 10
    for name, g in ref["grads"].items():
        assert g.abs().sum() > 0, name
        assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-7), name
