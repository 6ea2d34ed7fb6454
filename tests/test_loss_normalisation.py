"""The loss and the gradients of an optimizer step do not depend on how its rows are split into ranks and
micro-batches (sum of token CE / global count of trained tokens; transformers #24725, torchtune PR #1875), nor on
whether the cross-entropy is tiled (4 tiles of 64 positions per 256-token row, ZeRO-3 on 2 ranks, tied embeddings
too) or computed from the full logits, nor on whether the MLPs are tiled (model.tiled_mlp)."""

import pytest
import torch

from tests.conftest import deepspeed_cmd, run_cmd

pytestmark = pytest.mark.distributed

SPLITS = [(2, 4, 1), (2, 2, 2), (2, 1, 4), (1, 4, 2)]  # (world, micro_batch_size, accumulation): 8 rows per step
#: (tied embeddings, tiled loss) runs of the first split: tiled (the default) against the full logits
LOSS_MODES = [(False, False), (True, True), (True, False)]


@pytest.fixture(scope="module")
def results(tmp_path_factory, superni_data):
    tmp = tmp_path_factory.mktemp("split")
    data = superni_data(256)
    out = {}
    runs = [(split, False, True) for split in SPLITS] + [(SPLITS[0], tied, tiled) for tied, tiled in LOSS_MODES]
    runs.append((SPLITS[0], False, "mlp"))  # + model.tiled_mlp
    for (world, micro, acc), tied, tiled in runs:
        f = tmp / f"w{world}m{micro}a{acc}-{tied}-{tiled}.pt"
        run_cmd(deepspeed_cmd(world, "tests/scripts/grad_split.py", str(f), "--config", "configs/superni_tiny.yaml",
                              f"output_dir={tmp / 'run'}", f"data.path={data}", f"train.micro_batch_size={micro}",
                              f"train.gradient_accumulation_steps={acc}", "train.progress_bar=false",
                              "train.loss_tile_tokens=64", f"train.tiled_loss={str(tiled is not False).lower()}",
                              f"model.architecture.tie_word_embeddings={str(tied).lower()}",
                              f"model.tiled_mlp={str(tiled == 'mlp').lower()}"))
        out[(world, micro, acc, tied, tiled)] = torch.load(f, weights_only=True)
    return out


def test_tiled_mlp_equals_the_plain_mlp_under_zero3(results):
    _same(results[(*SPLITS[0], False, True)], results[(*SPLITS[0], False, "mlp")])


def _same(ref, got, rtol=1e-4):
    assert got["target_tokens"] == ref["target_tokens"] > 0
    assert abs(got["loss"] - ref["loss"]) < 1e-5
    assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) > 10
    for name, g in ref["grads"].items():
        assert g.abs().sum() > 0, name
        assert torch.allclose(got["grads"][name], g, rtol=rtol, atol=1e-7), name


@pytest.mark.parametrize("tied", [False, True])
def test_tiled_loss_equals_the_full_logits_under_zero3(results, tied):
    tiled, full = results[(*SPLITS[0], tied, True)], results[(*SPLITS[0], tied, False)]
    assert (tiled["loss_tile_tokens"], full["loss_tile_tokens"]) == (64, None)
    assert ("lm_head.weight" in full["grads"]) == (not tied)  # a tied model has one shared embedding parameter
    _same(full, tiled)


@pytest.mark.parametrize("split", SPLITS[1:])
def test_same_loss_and_gradients(results, split):
    _same(results[(*SPLITS[0], False, True)], results[(*split, False, True)])
