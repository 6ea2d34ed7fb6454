"""What a training run refuses at start, before any engine exists.

* Resume (itune.train._resume_state): a ``latest`` that names a missing, incomplete or damaged checkpoint, and a
  config that changes what the run trains (model, optimizer, seed, split). Each refusal is one ConfigError that
  names the checkpoint, the settings and the way out.
* Data (itune.train.verify_checksums): a shard changed or missing after preparation, named on every rank.
* Launch (itune.train.preflight): an output_dir that is a file, a training split the data does not have.
"""

from __future__ import annotations

import json
import shutil

import pytest

from itune.config import BatchPlan, load_config, to_dict
from itune.errors import ConfigError
from itune.errors import ManifestError
from itune.train import _resume_state, preflight, resume_config_changes, verify_checksums
from tests.conftest import free_port

PLAN = BatchPlan(rows=100, seq_len=512, micro_batch_size=2, gradient_accumulation_steps=2, world_size=2, epochs=1,
                 max_steps=4)


def _checkpoint(tmp_path, overrides=(), steps=(2,)):
    """A checkpoint directory as the trainer leaves it: global_stepN/itune_state.json and ``latest``."""
    cfg = load_config("configs/superni_tiny.yaml", ["data.path=x", *overrides])
    ckpt = tmp_path / "checkpoints"
    for step in steps:
        (ckpt / f"global_step{step}").mkdir(parents=True)
        state = {"global_step": step, "world_size": 2, "total_steps": PLAN.total_steps, "config": to_dict(cfg)}
        (ckpt / f"global_step{step}" / "itune_state.json").write_text(json.dumps(state))
    (ckpt / "latest").write_text(f"global_step{steps[-1]}")
    return ckpt


def _cfg(*overrides):
    return load_config("configs/superni_tiny.yaml", ["data.path=x", *overrides])


def test_same_config_resumes_and_run_settings_may_change(tmp_path):
    ckpt = _checkpoint(tmp_path)
    assert _resume_state(_cfg(), ckpt, PLAN)["tag"] == "global_step2"
    free = _cfg("model.gradient_checkpointing=false", "model.attn_implementation=eager", "train.log_every=5",
                "train.collective_timeout_s=60", "checkpoint.every_steps=1", "train.skip_nonfinite_steps=2")
    assert _resume_state(free, ckpt, PLAN)["global_step"] == 2


def test_changed_model_optimizer_seed_and_split_are_refused_together(tmp_path):
    ckpt = _checkpoint(tmp_path)
    cfg = _cfg("model.architecture.num_hidden_layers=3", "optim.lr=0.1", "optim.schedule=constant",
               "train.seed=5", "data.train_split=other")
    with pytest.raises(ConfigError) as e:
        _resume_state(cfg, ckpt, PLAN)
    msg = str(e.value)
    assert msg.startswith(f"{ckpt / 'global_step2'}: this config changes what the run trains")
    old = to_dict(_cfg())
    for line in (f"model.architecture.num_hidden_layers: checkpoint {old['model']['architecture']['num_hidden_layers']}"
                 ", this config 3",
                 f"optim.lr: checkpoint {old['optim']['lr']!r}, this config 0.1",
                 f"optim.schedule: checkpoint {old['optim']['schedule']!r}, this config 'constant'",
                 f"train.seed: checkpoint {old['train']['seed']}, this config 5",
                 "data.train_split: checkpoint 'train', this config 'other'"):
        assert f"  - {line}\n" in msg
    assert msg.endswith("or use another output_dir to start a new run")


def test_settings_unknown_to_an_older_checkpoint_are_not_compared():
    old, new = to_dict(_cfg()), to_dict(_cfg("model.pad_vocab_size_to_multiple_of=64"))
    del old["model"]["pad_vocab_size_to_multiple_of"]
    assert resume_config_changes(old, new) == []


def test_latest_naming_a_missing_checkpoint_names_the_complete_ones(tmp_path):
    ckpt = _checkpoint(tmp_path, steps=(2, 4))
    (ckpt / "latest").write_text("global_step9")
    with pytest.raises(ConfigError) as e:
        _resume_state(_cfg(), ckpt, PLAN)
    assert str(e.value) == (
        f"{ckpt / 'latest'} names 'global_step9', but {ckpt / 'global_step9' / 'itune_state.json'} does not exist "
        f"(a missing or incomplete checkpoint); point {ckpt / 'latest'} at a complete checkpoint (global_step2, "
        "global_step4: write its name into the file) or use another output_dir")


def test_damaged_trainer_state_is_named(tmp_path):
    ckpt = _checkpoint(tmp_path, steps=(2, 4))
    (ckpt / "global_step4" / "itune_state.json").write_text('{"global_step": 4, "conf')
    with pytest.raises(ConfigError, match=r"global_step4/itune_state.json: damaged \(JSONDecodeError: "):
        _resume_state(_cfg(), ckpt, PLAN)


@pytest.fixture(scope="module")
def data_copy(superni_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("start_checks") / "data"
    shutil.copytree(superni_data(512), d)
    return d


def test_a_changed_or_missing_shard_stops_the_run_with_its_name(data_copy):
    import torch.distributed as tdist

    from itune.data.shards import read_manifest

    m = read_manifest(data_copy)
    cfg = _cfg(f"data.path={data_copy}")
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        verify_checksums(cfg, m, 0, 1)  # intact: nothing raised
        train0 = data_copy / m["splits"]["train"]["shards"][0]["file"]
        raw = bytearray(train0.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # one flipped byte, same size
        train0.write_bytes(bytes(raw))
        test0 = data_copy / m["splits"]["test"]["shards"][0]["file"]
        test0.unlink()
        with pytest.raises(ManifestError) as e:
            verify_checksums(cfg, m, 0, 1)
        assert str(e.value) == (f"{data_copy}: damaged data:\n  - {train0}: checksum differs from the manifest (the "
                                f"file changed after preparation)\n  - {test0}: missing\nPrepare the data again "
                                "(`itune-data verify DIR` re-checks it)")
    finally:
        tdist.destroy_process_group()


def test_preflight_refuses_an_output_dir_that_is_a_file_and_an_unknown_split(superni_data, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    data = superni_data(512)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=f"output_dir: {tmp_path / 'afile'} exists and is not a directory"):
        preflight(_cfg(f"data.path={data}", f"output_dir={tmp_path / 'afile' / 'run'}"))
    with pytest.raises(ManifestError, match=r"no split 'nope' for data.train_split \(have \['test', 'train'\]\)"):
        preflight(_cfg(f"data.path={data}", f"output_dir={tmp_path / 'run'}", "data.train_split=nope"))
    assert not (tmp_path / "run").exists()
