"""Generation gives the same predictions whatever the batching and the number of ranks.

A model that is still at its random initialisation emits varied tokens, so equal predictions here are a strong
check: ZeRO-3 on 2 ranks (instances split and gathered, ``synced_gpus``) == exported model in one process, and
batched (left padding) == unbatched greedy decoding.
"""

import json

import pytest

from tests.conftest import ROOT, deepspeed_cmd, run_cmd

pytestmark = pytest.mark.distributed


def _preds(d):
    return {r["id"]: r["prediction"] for r in map(json.loads, (d / "predictions.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, superni_data):
    tmp = tmp_path_factory.mktemp("parity")
    data, run = superni_data(512), tmp / "run"
    # one step at lr 1e-9: a DeepSpeed checkpoint whose weights are the random initialisation
    run_cmd(deepspeed_cmd(2, "launcher/train.py", "--config", "configs/superni_tiny.yaml", f"output_dir={run}",
                          f"data.path={data}", "train.max_steps=1", "optim.lr=1e-9", "optim.warmup_steps=0"))
    return data, run, tmp


def test_zero3_two_ranks_equals_export_one_process(random_run):
    data, run, tmp = random_run
    common = ["--data", str(data), "--max-new-tokens", "6", "--max-instances", "2"]
    run_cmd(deepspeed_cmd(2, "launcher/eval.py", *common, "--run-dir", str(run), "--out", str(tmp / "z3")))
    run_cmd(["itune-eval", *common, "--model", str(run / "export"), "--out", str(tmp / "w1")])
    z3, w1 = _preds(tmp / "z3"), _preds(tmp / "w1")
    assert len(z3) == 20 and z3 == w1
    assert sum(1 for v in w1.values() if v) >= 15  # varied, non-empty text from the random model


def test_run_dir_from_another_directory_with_the_data_elsewhere(random_run):
    """A run trained on another machine: its data.path (relative) and the absolute paths it recorded are not here,
    and evaluation starts from another directory; ``--data`` prepared with the run's tokenizer stands in, and
    ``ds_config`` is read where the run recorded it."""
    import shutil

    data, run, tmp = random_run
    moved, cwd = tmp / "moved_run", tmp / "elsewhere"
    shutil.copytree(run / "checkpoints", moved / "checkpoints")
    cwd.mkdir()
    state_file = moved / "checkpoints" / (moved / "checkpoints" / "latest").read_text().strip() / "itune_state.json"
    state = json.loads(state_file.read_text())
    assert state["paths"]["ds_config"] == str(ROOT / "ds_configs" / "zero3.json")
    state["config"]["data"]["path"] = "runs/data/superni_512_gone"
    state["paths"]["data.path"] = state["training"]["data_path"] = "/nowhere/superni_512"
    state_file.write_text(json.dumps(state))
    common = ["--data", str(data), "--max-new-tokens", "6", "--max-instances", "2"]
    run_cmd(deepspeed_cmd(2, str(ROOT / "launcher" / "eval.py"), *common, "--run-dir", str(moved), "--out",
                          str(tmp / "moved")), cwd=cwd)
    if not (tmp / "w1" / "predictions.jsonl").is_file():
        run_cmd(["itune-eval", *common, "--model", str(run / "export"), "--out", str(tmp / "w1")])
    assert _preds(tmp / "moved") == _preds(tmp / "w1")


def test_batched_equals_unbatched(random_run):
    data, run, tmp = random_run
    common = ["--data", str(data), "--max-new-tokens", "6", "--max-instances", "2", "--model", str(run / "export")]
    run_cmd(["itune-eval", *common, "--batch-size", "1", "--out", str(tmp / "b1")])
    run_cmd(["itune-eval", *common, "--batch-size", "7", "--out", str(tmp / "b7")])
    b1, b7 = _preds(tmp / "b1"), _preds(tmp / "b7")
    assert b1 == b7 and len(set(b1.values())) > 5
