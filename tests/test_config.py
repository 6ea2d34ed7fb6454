"""Run config: every problem reported at once; DeepSpeed JSON refuses keys the trainer injects."""

import json

import pytest

from itune.config import BatchPlan, load_config
from itune.errors import ConfigError
from itune.model import build_ds_config, lr_lambda
from itune.config import OptimConfig


def test_all_errors_collected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {path: x}\ntrain: {micro_batch_size: 0, epochz: 2}\noptim: {schedule: cosin, lr: fast}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    for part in ("train.epochz: unknown key", "train.micro_batch_size: must be >= 1",
                 "optim.schedule: 'cosin'", "optim.lr: expected float"):
        assert part in msg


def test_overrides_and_architecture_merge(tmp_path):
    cfg = load_config("configs/superni_tiny.yaml", ["train.max_steps=3", "model.architecture.hidden_size=32",
                                                    "output_dir=runs/x"])
    assert cfg.train.max_steps == 3 and cfg.output_dir == "runs/x"
    assert cfg.model.architecture["hidden_size"] == 32 and cfg.model.architecture["num_hidden_layers"] == 2


def test_batch_plan_arithmetic():
    plan = BatchPlan(rows=134, seq_len=512, micro_batch_size=2, gradient_accumulation_steps=2, world_size=2,
                     epochs=2, max_steps=None)
    assert plan.global_rows_per_step == 8 and plan.tokens_per_step == 4096
    assert plan.steps_per_epoch == 17 and plan.total_steps == 34  # ceil(134 / 8): the tail is not dropped
    assert BatchPlan(134, 512, 2, 2, 2, 2, 5).total_steps == 5


def test_ds_config_refuses_injected_keys(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 16, "gradient_clipping": 1}))
    plan = BatchPlan(10, 64, 1, 1, 2, 1, None)
    with pytest.raises(ConfigError, match="'train_batch_size' \\(set train.micro_batch_size"):
        build_ds_config(p, plan, OptimConfig(), 64, False)


def test_ds_config_injection_and_auto_buckets():
    plan = BatchPlan(10, 64, 2, 3, 2, 1, None)
    ds = build_ds_config("ds_configs/zero3.json", plan, OptimConfig(grad_clip=0.5), 64, False)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 3, 12)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    z = ds["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (
        4096, 3686, 640)


def test_lr_schedule_warmup_then_cosine_to_min():
    f = lr_lambda(OptimConfig(warmup_steps=2, min_lr_ratio=0.1, schedule="cosine"), total_steps=12)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and abs(f(11) - 0.1) < 1e-12
    assert abs(f(2 + 9 / 2) - 0.55) < 1e-12  # halfway through the decay: (1 + 0.1) / 2


def test_model_section_checked_before_any_work():
    from itune.model import check_model_config

    cfg = load_config("configs/superni_tiny.yaml", ["model.architecture.num_hiden_layers=8",
                                                    "model.architecture.hidden_size=66"])
    assert check_model_config(cfg) == [
        "model.architecture.num_hiden_layers: not a LlamaConfig field",
        "model.architecture: hidden_size 66 is not a multiple of num_attention_heads 4",
    ]
    assert check_model_config(load_config("configs/superni_tiny.yaml")) == []


def test_yaml_exponent_without_dot_is_a_float():
    assert load_config("configs/superni_tiny.yaml", ["optim.lr=1e-9"]).optim.lr == 1e-9


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_shipped_ds_configs_are_engine_settings_only(name):
    ds = build_ds_config(f"ds_configs/{name}", BatchPlan(10, 64, 1, 2, 2, 1, None), OptimConfig(), 128, True)
    assert ds["train_batch_size"] == 4 and ds["bf16"] == {"enabled": True}
    assert all(v != "auto" for v in ds["zero_optimization"].values())


def test_flash_attention_needs_cuda_and_the_package():
    from itune.model import check_model_config

    cfg = load_config("configs/superni_tiny.yaml", ["model.attn_implementation=flash_attention_2"])
    assert check_model_config(cfg) == ["model.attn_implementation: flash_attention_2 cannot be used "
                                       "(flash_attention_2 needs CUDA); use auto or one of sdpa, eager"]
    assert load_config("configs/superni_tiny.yaml").model.attn_implementation == "auto"
    assert check_model_config(load_config("configs/superni_tiny.yaml")) == []


def test_architecture_with_pretrained_is_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config("configs/superni_tiny.yaml", [f"model.pretrained={tmp_path}"])
    assert ("model.architecture and model.pretrained are both set: the checkpoint's config.json defines the model "
            f"({tmp_path}), so model.architecture would be ignored; remove model.architecture (or override "
            "model.architecture=null)") in str(e.value)
    assert "configs/superni_tiny.yaml" in str(e.value)
    cfg = load_config("configs/superni_tiny.yaml", [f"model.pretrained={tmp_path}", "model.architecture=null"])
    assert cfg.model.architecture == {} and cfg.model.pretrained == str(tmp_path)
    # without pretrained, null means the default architecture
    assert load_config(None, ["data.path=x", "model.architecture=null"]).model.architecture["hidden_size"] == 64


@pytest.mark.parametrize("override,message", [
    ("train.max_steps=abc", "train.max_steps: expected int, got 'abc'"),
    ("checkpoint.keep_last=x", "checkpoint.keep_last: expected int, got 'x'"),
    ("checkpoint.keep_last=null", "checkpoint.keep_last: expected int, got None"),
    ("model.architecture.hidden_size=-64", "model.architecture.hidden_size: must be a whole number >= 1, got -64"),
    ("optim.betas=[2,-1]", "optim.betas: must be two numbers in [0, 1), e.g. [0.9, 0.95], got [2, -1]"),
    ("optim.betas=[0.9]", "optim.betas: must be two numbers in [0, 1)"),
    ("optim.weight_decay=-1", "optim.weight_decay: must be >= 0, got -1"),
    ("optim.warmup_steps=-3", "optim.warmup_steps: must be >= 0, got -3"),
    ("optim.min_lr_ratio=5", "optim.min_lr_ratio: must be >= 0 and <= 1, got 5"),
    ("optim.grad_clip=-1", "optim.grad_clip: must be >= 0, got -1"),
    ("optim.lr=.nan", "optim.lr: must be > 0 and finite, got nan"),
    ("optim.lr=.inf", "optim.lr: must be > 0 and finite, got inf"),
    ("optim.eps=0", "optim.eps: must be > 0, got 0"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps: must be >= 0, got -1"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s: must be >= 1 and <= 604800, got 0"),
    ("train.eval_every=-2", "train.eval_every: must be >= 0, got -2"),
    ("train.generate_every=-1", "train.generate_every: must be >= 0, got -1"),
    ("train.generate_max_instances=-1", "train.generate_max_instances: must be >= 1, got -1"),
])
def test_wrong_types_and_out_of_range_values_are_named(override, message):
    """A wrong type never reaches the range checks (no TypeError), and every value outside its range is refused
    before any process group starts, instead of failing inside DeepSpeed/torch or running with a wrong schedule."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.path=x", override])
    assert message in str(e.value)


def test_duplicate_top_level_key_is_refused_naming_file_key_and_lines(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("data: {path: x}\n"            # 1
                 "optim:\n"                     # 2
                 "  lr: 0.001\n"
                 "  warmup_steps: 10\n"
                 "  schedule: linear\n"
                 "train: {max_steps: 3}\n"      # 6
                 "optim:\n"                     # 7: would drop warmup_steps and schedule
                 "  lr: 0.002\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (f"{p}: duplicate key 'optim' at lines 2 and 7 (the second would silently replace the "
                            "first); keep one")


def test_duplicate_nested_key_is_refused_with_its_dotted_path(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model:\n"
                 "  architecture:\n"
                 "    hidden_size: 64\n"        # 3
                 "    num_hidden_layers: 2\n"
                 "    hidden_size: 128\n"       # 5
                 "data: {path: x, path: y}\n")  # a flow mapping: both on line 6 (found after the nested one)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (f"{p}: duplicate key 'model.architecture.hidden_size' at lines 3 and 5 (the second "
                            "would silently replace the first); keep one")
    p.write_text("data: {path: x, path: y}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (f"{p}: duplicate key 'data.path' at lines 1 and 1 (the second would silently replace "
                            "the first); keep one")


def test_override_of_a_key_in_the_file_is_not_a_duplicate(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("data: {path: x}\noptim:\n  lr: 0.001\n  warmup_steps: 10\n  schedule: linear\n")
    cfg = load_config(p, ["optim.lr=0.002", "optim.lr=0.003", "data.path=y"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.data.path) == (0.003, 10, "linear", "y")


def test_yaml_without_duplicates_loads_exactly_as_safe_load():
    import yaml
    from pathlib import Path

    from itune.yamlio import safe_load_unique

    text = ("base: &b {lr: 1.0e-3, betas: [0.9, 0.95]}\n"
            "optim:\n  <<: *b\n  lr: 2.0e-3\n"  # a merge key overridden in the mapping is not a duplicate
            "again: *b\n"
            "list: [{a: 1}, {a: 2}]\n"
            "n: ~\nflag: yes\nexp: 1e-9\n")
    expected = {"base": {"lr": 0.001, "betas": [0.9, 0.95]}, "optim": {"lr": 0.002, "betas": [0.9, 0.95]},
                "again": {"lr": 0.001, "betas": [0.9, 0.95]}, "list": [{"a": 1}, {"a": 2}], "n": None,
                "flag": True, "exp": "1e-9"}
    assert safe_load_unique(text, "t.yaml") == yaml.safe_load(text) == expected
    assert safe_load_unique("", "t.yaml") is None and safe_load_unique("# only a comment\n", "t.yaml") is None
    for p in sorted(Path("configs").glob("*.yaml")):
        assert safe_load_unique(p.read_text(), p) == yaml.safe_load(p.read_text()), p


@pytest.mark.parametrize("text,message", [
    ("data:\n  path: [/x\n", "bad.yaml: line 3 column 1: not valid YAML (while parsing a flow sequence expected ',' "
                            "or ']', but got '<stream end>'); fix the file"),
    (b"\xff\xfe bad", "bad.yaml: not UTF-8 text (byte 0: invalid start byte); save the run config as UTF-8"),
])
def test_unreadable_run_config_is_one_line(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{tmp_path}/{message}"


@pytest.mark.parametrize("override,message", [
    ("train.max_steps=", "override 'train.max_steps=': empty value; give one, or write train.max_steps=null to unset it"),
    ("train.seed=18446744073709551616", "train.seed: must be >= 0 and <= 9223372036854775807, got 18446744073709551616"),
    ("train.collective_timeout_s=100000000000000000000",
     "train.collective_timeout_s: must be >= 1 and <= 604800, got 100000000000000000000"),
    ("model.pretrained=''", "model.pretrained: empty; give a Hugging Face checkpoint directory, or null to build the "
                            "model from model.architecture"),
])
def test_values_a_run_would_crash_on_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.path=x", "model.architecture=null", override])
    assert message in str(e.value)


def test_a_checkpoint_without_tokenizer_files_is_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from itune.model import check_model_config

    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    cfg = load_config(None, ["data.path=x", f"model.pretrained={tmp_path}", "model.architecture=null"])
    assert check_model_config(cfg) == [
        f"model.pretrained: {tmp_path} has no tokenizer.json; copy the model's tokenizer files (tokenizer.json, "
        "tokenizer_config.json, special_tokens_map.json) into it, as save_pretrained of the tokenizer writes them"]
