"""Launch mistakes in the files and paths a run names are one line naming the file or setting and the way out,
found before any process group starts.

* ``ds_config`` that is not JSON (file, line, column); a truncated or missing safetensors file of
  ``model.pretrained`` or ``itune-eval --model``; an ``output_dir`` that cannot be created or written.
* Relative paths in a run config are resolved from the current directory, and every "not found" says so.
* ``itune-eval --run-dir R --data D``: an explicit ``--data`` prepared with the run's tokenizer stands in for the
  run's training data when that is not here; without it the run's ``data.path`` is named.
"""

from __future__ import annotations

import json
import shutil

import pytest

from itune.config import BatchPlan, OptimConfig, load_config, to_dict
from itune.errors import ConfigError, ManifestError
from itune.eval.cli import main as eval_main
from itune.eval.run import engine_from_run, run_data
from itune.model import build_ds_config
from itune.train import preflight
from tests.conftest import MISTRAL, ROOT

RELATIVE = "relative paths are resolved from the current directory {}; run from the repository root or give an " \
           "absolute path"
DAMAGED = "the file is damaged or incomplete (re-download or re-save the checkpoint)"


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def _cfg(*overrides):
    return load_config(ROOT / "configs" / "superni_tiny.yaml", list(overrides))


def _tiny_checkpoint(d, **save):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, **save)
    shutil.copy(MISTRAL / "tokenizer.json", d / "tokenizer.json")  # a checkpoint directory carries its tokenizer
    return d


def _truncate(f):
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    return len(raw) // 2, len(raw)


BAD_JSON = '{\n  "zero_optimization": {"stage": 3,}\n}\n'


def test_ds_config_that_is_not_json_names_file_line_and_column(tmp_path, superni_data):
    bad = tmp_path / "zero3.json"
    bad.write_text(BAD_JSON)
    want = (f"ds_config: {bad}: not valid JSON at line 2 column 36 (Expecting property name enclosed in double "
            "quotes); fix the JSON or point ds_config at a file in ds_configs/")
    with pytest.raises(ConfigError) as e:
        build_ds_config(bad, BatchPlan(1, 1, 1, 1, 1, 1, None), OptimConfig(), 64, False)
    assert str(e.value) == want
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(f"data.path={superni_data(512)}", f"output_dir={tmp_path / 'run'}", f"ds_config={bad}"))
    assert str(e.value) == want
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError) as e:
        build_ds_config(bad, BatchPlan(1, 1, 1, 1, 1, 1, None), OptimConfig(), 64, False)
    assert str(e.value) == (f"ds_config: {bad}: a JSON object ({{...}}) expected, got list; fix the JSON or point "
                            "ds_config at a file in ds_configs/")


def test_truncated_safetensors_of_model_pretrained_is_refused_by_preflight(tmp_path):
    d = _tiny_checkpoint(tmp_path / "model")
    f = d / "model.safetensors"
    preflight_args = ("model.architecture=null", f"model.pretrained={d}", f"data.path={tmp_path}",
                      f"output_dir={tmp_path / 'run'}")
    have, want = _truncate(f)
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(*preflight_args))
    assert str(e.value) == (f"invalid run config:\n  - model.pretrained: {f}: {have} bytes, but its header describes "
                            f"{want}; {DAMAGED}")
    f.write_bytes(b"\x01\x00")
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(*preflight_args))
    assert str(e.value) == (f"invalid run config:\n  - model.pretrained: {f}: 2 bytes, shorter than a safetensors "
                            f"header; {DAMAGED}")


def test_sharded_checkpoint_missing_a_shard_or_with_a_truncated_one(tmp_path):
    d = _tiny_checkpoint(tmp_path / "model", max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) == 2 and (d / "model.safetensors.index.json").is_file()
    shards[1].unlink()
    have, want = _truncate(shards[0])
    with pytest.raises(ConfigError) as e:
        preflight(_cfg("model.architecture=null", f"model.pretrained={d}", f"data.path={tmp_path}",
                       f"output_dir={tmp_path / 'run'}"))
    assert str(e.value) == (
        f"invalid run config:\n  - model.pretrained: {shards[0]}: {have} bytes, but its header describes {want}; "
        f"{DAMAGED}\n  - model.pretrained: {shards[1]}: missing, but model.safetensors.index.json names it; the "
        "checkpoint is incomplete (re-download or re-save the checkpoint)")


def test_itune_eval_model_with_a_truncated_safetensors_names_the_file(tmp_path, superni_data, capsys):
    d = _tiny_checkpoint(tmp_path / "export")
    f = d / "model.safetensors"
    have, want = _truncate(f)
    capsys.readouterr()  # save_pretrained's progress bar
    assert eval_main(["--data", str(superni_data(512)), "--model", str(d), "--out", str(tmp_path / "eval")]) == 2
    assert capsys.readouterr().err == f"error: {f}: {have} bytes, but its header describes {want}; {DAMAGED}\n"


def test_output_dir_that_cannot_be_created_or_written(tmp_path):
    # /proc takes no new entries, even from root (permission bits would not stop root)
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(f"data.path={tmp_path}", "output_dir=/proc/itune-run/a"))
    assert str(e.value) == ("invalid run config:\n  - output_dir: /proc/itune-run/a cannot be created (No such file "
                            "or directory when creating a directory in /proc); choose a directory you can write to")
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(f"data.path={tmp_path}", "output_dir=/proc"))
    assert str(e.value) == ("invalid run config:\n  - output_dir: /proc is not writable (No such file or directory "
                            "when creating a file in it); choose a directory you can write to")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(f"data.path={tmp_path}", f"output_dir={tmp_path / 'afile' / 'run'}"))
    assert str(e.value) == f"invalid run config:\n  - output_dir: {tmp_path / 'afile'} exists and is not a directory"


def test_output_dir_check_leaves_nothing_behind(tmp_path, superni_data):
    with pytest.raises(ManifestError):  # fails after the path checks: the probe entries are gone
        preflight(_cfg(f"data.path={superni_data(512)}", f"output_dir={tmp_path / 'new' / 'run'}",
                       "data.train_split=nope"))
    (tmp_path / "old").mkdir()
    with pytest.raises(ManifestError):
        preflight(_cfg(f"data.path={superni_data(512)}", f"output_dir={tmp_path / 'old'}", "data.train_split=nope"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["old"]


def test_relative_paths_are_resolved_from_the_current_directory_and_say_so(tmp_path, monkeypatch):
    cfg = _cfg("model.architecture=null", "model.pretrained=models/base", "output_dir=runs/x/afile/run")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "afile").write_text("")
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    rel = RELATIVE.format(tmp_path)
    assert str(e.value) == (
        "invalid run config:\n"
        f"  - model.pretrained: models/base not found ({rel})\n"
        f"  - ds_config: ds_configs/zero3.json not found ({rel})\n"
        f"  - data.path: runs/data/superni_512 not found ({rel})\n"
        f"  - output_dir: runs/x/afile exists and is not a directory (relative paths are resolved from the current "
        f"directory {tmp_path})")
    # absolute paths are named alone
    with pytest.raises(ConfigError) as e:
        build_ds_config(tmp_path / "nope.json", BatchPlan(1, 1, 1, 1, 1, 1, None), OptimConfig(), 64, False)
    assert str(e.value) == f"ds_config: {tmp_path / 'nope.json'} not found"


# -- itune-eval --run-dir: the run's recorded data.path, or an explicit --data


def _run_dir(tmp_path, data, *, training=True):
    """A run directory as far as evaluation reads it before loading weights: ``latest`` and ``itune_state.json`` of a
    run trained on ``data`` from a directory that is not the current one (its data.path relative, gone)."""
    from itune.data.shards import manifest_hash, read_manifest

    m = read_manifest(data)
    run = tmp_path / "run"
    (run / "checkpoints" / "global_step3").mkdir(parents=True)
    state = {"global_step": 3, "world_size": 2, "manifest_hash": manifest_hash(data),
             "config": to_dict(_cfg("data.path=runs/data/gone", f"output_dir={run}")),
             "paths": {"ds_config": str(ROOT / "ds_configs" / "zero3.json"), "data.path": "/nowhere/runs/data/gone"}}
    if training:
        state["training"] = {"step": 3, "data_path": "/nowhere/runs/data/gone", "train_split": "train",
                             "manifest_hash": manifest_hash(data),
                             "tokenizer_fingerprint": m["tokenizer"]["fingerprint"],
                             "train_tasks": m["splits"]["train"]["tasks"]}
    (run / "checkpoints" / "global_step3" / "itune_state.json").write_text(json.dumps(state))
    (run / "checkpoints" / "latest").write_text("global_step3")
    return run, state


def test_eval_run_dir_whose_data_is_gone_names_it_and_says_to_pass_data(tmp_path, superni_data, monkeypatch):
    run, _ = _run_dir(tmp_path, superni_data(512))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        engine_from_run(run)
    assert str(e.value) == (f"{run}: the run's data.path runs/data/gone not found (relative paths are resolved from "
                            f"the current directory {tmp_path}), nor at /nowhere/runs/data/gone where the run recorded "
                            "it; pass --data DIR, data prepared with the run's tokenizer")


def test_eval_explicit_data_with_the_runs_tokenizer_wins(tmp_path, superni_data, monkeypatch):
    from itune.data.shards import read_manifest

    data = superni_data(512)
    run, state = _run_dir(tmp_path, data)
    monkeypatch.chdir(tmp_path)
    m, training = run_data(run, "global_step3", state, data)
    assert m == read_manifest(data)
    assert training == state["training"]


def test_eval_explicit_data_with_another_tokenizer_is_refused(tmp_path, superni_data, monkeypatch, capsys):
    data = superni_data(512)
    run, state = _run_dir(tmp_path, data)
    state["training"]["tokenizer_fingerprint"] = "0123456789abcdef"  # the run trained with another tokenizer
    (run / "checkpoints" / "global_step3" / "itune_state.json").write_text(json.dumps(state))
    m = json.loads((data / "manifest.json").read_text())
    monkeypatch.chdir(tmp_path)
    assert eval_main(["--data", str(data), "--run-dir", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"error: {data}: prepared with tokenizer {m['tokenizer']['path']} (fingerprint "
        f"{m['tokenizer']['fingerprint']}), but the run {run} trained with fingerprint 0123456789abcdef; prepare it "
        "with the run's tokenizer\n")


def test_eval_explicit_data_for_a_run_without_a_recorded_tokenizer(tmp_path, superni_data, monkeypatch, capsys):
    data = superni_data(512)
    run, _ = _run_dir(tmp_path, data, training=False)
    monkeypatch.chdir(tmp_path)
    assert eval_main(["--data", str(data), "--run-dir", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"error: {run}: the run's data.path runs/data/gone not found (relative paths are resolved from the current "
        f"directory {tmp_path}), nor at /nowhere/runs/data/gone where the run recorded it, and the run records no "
        f"tokenizer fingerprint to check --data {data} against; run from the directory the training was launched "
        "from\n")


def test_eval_run_dir_reads_the_recorded_ds_config_from_another_directory(tmp_path, superni_data, monkeypatch):
    run, state = _run_dir(tmp_path, superni_data(512))
    state["paths"]["ds_config"] = "/nowhere/ds_configs/zero3.json"
    (run / "checkpoints" / "global_step3" / "itune_state.json").write_text(json.dumps(state))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        engine_from_run(run, superni_data(512))
    assert str(e.value) == f"{run}: the run's ds_config: ds_configs/zero3.json not found ({RELATIVE.format(tmp_path)})"
