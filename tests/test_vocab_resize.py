"""Embedding resize for a tokenizer with added tokens: the size rule, the mean initialisation of the new rows, the
refusal when resizing is off, and a ZeRO-3 run on 2 CPU ranks (real ``deepspeed`` launcher) from a checkpoint
whose weights are known."""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from itune.config import ModelConfig, load_config
from itune.data.shards import open_split, read_manifest
from itune.errors import ConfigError
from itune.loader import PackedRows
from itune.model import embedding_rows, resize_embeddings
from itune.train import preflight, tokenizer_extends
from tests.conftest import MISTRAL, SHARED, deepspeed_cmd, run_cmd

ADDED = ["<|system|>", "<|user|>", "<|assistant|>"]  # the `chat` template's headers become single new tokens
BASE_ROWS, TOKENIZER_SIZE, MULTIPLE = 32768, 32771, 64
ROWS = 32832  # 32771 rounded up to a multiple of 64
RELOAD = """
import sys, deepspeed, torch
from safetensors.torch import load_file
from itune.eval.run import engine_from_run
module, step, _ = engine_from_run(sys.argv[1])
w = module.get_input_embeddings().weight
with deepspeed.zero.GatheredParameters([w]):
    same = torch.equal(w, load_file(sys.argv[2])["model.embed_tokens.weight"])
print("reloaded", step, module.config.vocab_size, same)
"""
ARCH = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096)


def test_embedding_rows_grow_to_the_tokenizer_rounded_up():
    m = ModelConfig()
    assert m.resize_token_embeddings is True and m.pad_vocab_size_to_multiple_of == 1
    assert embedding_rows(BASE_ROWS, TOKENIZER_SIZE, m) == TOKENIZER_SIZE
    assert embedding_rows(BASE_ROWS, TOKENIZER_SIZE, ModelConfig(pad_vocab_size_to_multiple_of=MULTIPLE)) == ROWS
    assert embedding_rows(BASE_ROWS, ROWS, ModelConfig(pad_vocab_size_to_multiple_of=MULTIPLE)) == ROWS
    # a tokenizer that fits (smaller or equal) keeps the model's embedding, whatever the multiple
    assert embedding_rows(BASE_ROWS, 32000, ModelConfig(pad_vocab_size_to_multiple_of=MULTIPLE)) == BASE_ROWS
    assert embedding_rows(BASE_ROWS, BASE_ROWS, ModelConfig(resize_token_embeddings=False)) == BASE_ROWS
    assert embedding_rows(BASE_ROWS, 32000, ModelConfig(resize_token_embeddings=False)) == BASE_ROWS


def test_a_larger_tokenizer_is_refused_when_resizing_is_off():
    with pytest.raises(ConfigError) as e:
        embedding_rows(BASE_ROWS, TOKENIZER_SIZE, ModelConfig(resize_token_embeddings=False))
    msg = str(e.value)
    assert "32771 tokens" in msg and "32768 rows" in msg and "model.resize_token_embeddings=true" in msg


def test_config_checks_the_multiple():
    with pytest.raises(ConfigError, match=r"model.pad_vocab_size_to_multiple_of: must be >= 1, got 0"):
        load_config(None, ["data.path=x", "model.pad_vocab_size_to_multiple_of=0"])


@pytest.mark.parametrize("tied", [False, True])
def test_resize_keeps_old_rows_and_sets_new_rows_to_the_mean(tied):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, tie_word_embeddings=tied, **{**ARCH, "hidden_size": 16,
                                                                                       "num_hidden_layers": 1}))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    emb, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    assert resize_embeddings(model, 100) is None  # already that size: nothing changes
    assert resize_embeddings(model, 104) == 100
    new_emb, new_head = model.model.embed_tokens.weight, model.lm_head.weight
    assert new_emb.shape == new_head.shape == (104, 16)
    assert (new_head is new_emb) == tied
    assert torch.equal(new_emb[:100], emb) and torch.equal(new_head[:100], head)
    assert torch.equal(new_emb[100:], emb.mean(0).expand(4, 16))
    assert torch.equal(new_head[100:], head.mean(0).expand(4, 16))
    assert model.config.vocab_size == 104 and model.model.embed_tokens.num_embeddings == 104
    assert model.lm_head.out_features == 104
    logits = model(input_ids=torch.tensor([[1, 103, 5]]), use_cache=False).logits
    assert logits.shape == (1, 3, 104) and torch.isfinite(logits).all()
    # a new token's output logit is the mean of the old rows' logits: it neither dominates nor vanishes
    assert torch.allclose(logits[0, :, 103], logits[0, :, :100].mean(-1), atol=1e-5)


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """Mistral's tokenizer with 3 special tokens added (transformers' add_special_tokens + save_pretrained), data
    prepared with it, and a base checkpoint with the original 32768-row embedding and the original tokenizer."""
    tmp = tmp_path_factory.mktemp("vocab")
    tok = AutoTokenizer.from_pretrained(MISTRAL)
    assert tok.add_special_tokens({"additional_special_tokens": ADDED}) == 3
    tok.save_pretrained(tmp / "tokenizer")
    data = tmp / "data"
    run_cmd(["itune-data", "prepare", "--input", str(SHARED / "data" / "fastchat_sharegpt_dummy" /
                                                     "dummy_conversation.json"),
             "--template", "chat", "--tokenizer", str(tmp / "tokenizer"), "--seq-len", "256", "--out", str(data)])
    base = tmp / "base"
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=BASE_ROWS, tie_word_embeddings=False, **ARCH)).save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        shutil.copy(MISTRAL / f, base / f)
    return tmp, data, base


def test_data_uses_the_added_tokens(extended):
    tmp, data, base = extended
    m = read_manifest(data)
    assert m["tokenizer"]["vocab_size"] == TOKENIZER_SIZE
    rows = PackedRows(open_split(data, "train"), m["seq_len"], m["tokenizer"]["pad_id"])
    ids = rows.rows(list(range(len(rows)))).input_ids
    assert int(ids.max()) >= BASE_ROWS  # the run below reads new embedding rows
    assert tokenizer_extends(base, tmp / "tokenizer") and not tokenizer_extends(tmp / "tokenizer", base)


def test_preflight_refuses_a_larger_tokenizer_without_resizing(extended):
    tmp, data, base = extended
    common = [f"data.path={data}", "ds_config=ds_configs/zero3.json"]
    with pytest.raises(ConfigError) as e:
        preflight(load_config(None, [*common, f"model.pretrained={base}", "model.resize_token_embeddings=false"]))
    assert ("the data's tokenizer has 32771 tokens but the model's embedding has 32768 rows" in str(e.value)
            and "model.resize_token_embeddings=true" in str(e.value))
    with pytest.raises(ConfigError, match="32771 tokens but the model's embedding has 32000 rows"):
        preflight(load_config(None, [*common, "model.architecture.vocab_size=32000",
                                     "model.resize_token_embeddings=false"]))
    # a model embedding larger than the tokenizer is fine
    preflight(load_config(None, [*common, "model.architecture.vocab_size=33000",
                                 "model.resize_token_embeddings=false"]))


@pytest.mark.distributed
def test_zero3_run_resizes_from_a_known_checkpoint(extended):
    tmp, data, base = extended
    run = tmp / "run"
    out = run_cmd(deepspeed_cmd(2, "launcher/train.py", "--config", "configs/superni_tiny.yaml", f"output_dir={run}",
                                f"data.path={data}", f"model.pretrained={base}", "model.architecture=null",
                                f"model.pad_vocab_size_to_multiple_of={MULTIPLE}", "train.max_steps=2",
                                "train.epochs=1", "checkpoint.export_initial=true", "train.progress_bar=false"))
    assert "embeddings resized" in out.stdout and f"{BASE_ROWS} -> {ROWS} rows" in out.stdout
    summary = json.loads((run / "train_summary.json").read_text())
    half = ROWS * ARCH["hidden_size"] // 2  # each rank holds half of each resized weight (ZeRO-3 partition)
    assert summary["vocab_resize"] == {"tokenizer_vocab_size": TOKENIZER_SIZE, "old_rows": BASE_ROWS, "rows": ROWS,
                                       "multiple_of": MULTIPLE, "input_per_rank": [half, half],
                                       "output_per_rank": [half, half]}
    before = load_file(base / "model.safetensors")
    step0 = load_file(run / "export_step0" / "model.safetensors")  # written before the first optimizer step
    final = load_file(run / "export" / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old, new = before[name], step0[name]
        assert new.shape == final[name].shape == (ROWS, ARCH["hidden_size"])
        assert torch.equal(new[:BASE_ROWS], old)
        assert (new[BASE_ROWS:] - old.mean(0)).abs().max() <= 1e-6
        assert not torch.equal(final[name][:BASE_ROWS], old)  # and then it trained
    assert all(torch.equal(step0[k], v) for k, v in before.items() if k not in ("model.embed_tokens.weight",
                                                                               "lm_head.weight"))
    for d in ("export_step0", "export"):
        assert json.loads((run / d / "config.json").read_text())["vocab_size"] == ROWS
        assert json.loads((run / d / "export_check.json").read_text())["abs_diff"] <= 1e-4
    tok = AutoTokenizer.from_pretrained(run / "export")  # the data's tokenizer travels with the export
    assert len(tok) == TOKENIZER_SIZE and tok.convert_tokens_to_ids("<|user|>") == 32769
    # the run's DeepSpeed checkpoint reloads for ZeRO-3 evaluation (itune-eval --run-dir) with the grown embedding
    out = run_cmd([sys.executable, "-c", RELOAD, str(run), str(run / "export" / "model.safetensors")]).stdout
    assert f"reloaded 2 {ROWS} True" in out
