"""The family table and what it drives, at world 1 without DeepSpeed: attention choice, isolation arguments, the
probe that proves isolation on the loaded model, tied-weight export, the router auxiliary loss."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GptOssConfig, LlamaConfig, MixtralConfig, Qwen2Config

from itune import families
from itune.checkpoint import drop_tied_aliases
from itune.errors import ConfigError
from itune.families import (Isolation, choose_attn_implementation, forward_packed, mask_mapping, probe_isolation,
                            refusal_message, router_aux, seq_idx, varlen_kwargs)

SMALL = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


def _gpt_oss():
    torch.manual_seed(0)
    cfg = GptOssConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"])
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


NEVER = lambda impl: False  # noqa: E731  (no flash-attention package installed)
ALWAYS = lambda impl: True  # noqa: E731


@pytest.mark.parametrize("config,requested,cuda,installed,expected", [
    (LlamaConfig(), "auto", False, ALWAYS, ("sdpa", "auto (flash_attention_3 needs CUDA; flash_attention_2 needs CUDA)")),
    (LlamaConfig(), "auto", True, ALWAYS, ("flash_attention_3", "auto")),
    (LlamaConfig(), "auto", True, lambda i: i == "flash_attention_2",
     ("flash_attention_2", "auto (flash_attention_3 needs the flash-attn 3 package)")),
    (Gemma2Config(), "auto", False, NEVER,
     ("eager", "auto (flash_attention_3 needs CUDA; flash_attention_2 needs CUDA; Gemma2ForCausalLM does not "
               "support sdpa)")),
    (GptOssConfig(), "auto", True, ALWAYS,
     ("eager", "auto (gpt_oss: its attention sinks need the vllm-flash-attn3 kernel; GptOssForCausalLM does not "
               "support sdpa)")),
    (LlamaConfig(), "eager", False, NEVER, ("eager", "requested")),
])
def test_attention_choice_per_family(config, requested, cuda, installed, expected):
    assert choose_attn_implementation(requested, config, cuda, installed) == expected


@pytest.mark.parametrize("config,requested,message", [
    (Gemma2Config(), "sdpa", "model.attn_implementation: sdpa cannot be used (Gemma2ForCausalLM does not support "
                             "sdpa); use auto or one of eager"),
    (LlamaConfig(), "flash_attention_2", "model.attn_implementation: flash_attention_2 cannot be used "
                                         "(flash_attention_2 needs CUDA); use auto or one of sdpa, eager"),
])
def test_refused_attention_is_a_one_line_config_error(config, requested, message):
    with pytest.raises(ConfigError) as e:
        choose_attn_implementation(requested, config, False, NEVER)
    assert str(e.value) == message


def test_varlen_and_seq_idx_arguments():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    kw = varlen_kwargs(pos)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == 3 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert seq_idx(torch.tensor([[0, 1, 0, 1, 2], [0, 0, 1, 2, 3]])).tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert Isolation(("varlen",)).flatten and Isolation(("seq_idx",)).flatten
    assert not Isolation(("position_ids",)).flatten and not Isolation(("mask_mapping",)).flatten


def test_mask_mapping_is_block_diagonal_and_keeps_the_sliding_window():
    cfg = _gpt_oss().config
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]])
    m = mask_mapping(cfg, pos, torch.float32)
    full, sliding = m["full_attention"], m["sliding_attention"]
    # eager masks are additive: 0 where attended, a large negative number elsewhere
    seen = lambda mask: (mask[0, 0] == 0).int()  # noqa: E731
    assert seen(full)[10].tolist() == [0] * 10 + [1] + [0] * 2  # first token of example 2 sees only itself
    assert seen(full)[9].tolist() == [1] * 10 + [0] * 3
    assert seen(sliding)[9].tolist() == [0] * 2 + [1] * 8 + [0] * 3  # window of 8 within example 1


def test_probe_finds_the_leak_and_the_method_that_isolates(monkeypatch):
    model = _gpt_oss().eval()
    monkeypatch.setitem(families.FAMILIES, "gpt_oss", families.Family(isolation=(("position_ids",),)))
    leaky = probe_isolation(model, 101)
    assert leaky["isolation"] is None and not leaky["isolated"]
    (t,) = leaky["tried"]
    assert t["method"] == "position_ids" and t["leak"] > 0.05 and not t["isolated"]
    msg = refusal_message(leaky, "DATA")
    assert msg.startswith("DATA: packed rows would let examples attend to each other in this gpt_oss model "
                          "(attention eager, float32); probed: position_ids: logits of a later example change by ")
    assert msg.endswith("Ways out: prepare the data without packing (`itune-data prepare --no-pack`), or set another "
                        "model.attn_implementation")
    monkeypatch.undo()
    ok = probe_isolation(model, 101)
    assert ok["method"] == "mask_mapping" and ok["isolated"]
    assert ok["tried"][0]["leak"] == 0.0 and ok["tried"][0]["diff_later"] < 1e-5
    # unpacked data: nothing is enforced, the plain call is used
    assert probe_isolation(model, 101, packed=False)["method"] == "mask_mapping"


def test_forward_packed_equals_examples_alone_for_every_method_that_isolates():
    model = _gpt_oss().eval()
    a, b = torch.randint(3, 101, (12,)), torch.randint(3, 101, (9,))
    row = torch.cat([a, b, torch.zeros(3, dtype=torch.long)])[None]
    pos = torch.cat([torch.arange(12), torch.arange(9), torch.arange(3)])[None]
    iso = Isolation(("mask_mapping",), model.config)
    with torch.no_grad():
        packed = forward_packed(model, row, pos, iso).logits[0]
        alone_b = model(input_ids=b[None], use_cache=False).logits[0]
        leaky = model(input_ids=row, position_ids=pos, use_cache=False).logits[0]
    assert torch.allclose(packed[12:21], alone_b, atol=1e-5)
    assert (leaky[12:21] - alone_b).abs().max() > 1e-2  # the plain call is what the probe refuses


def test_tied_export_state_dict_is_written_once_and_reloads_tied(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**SMALL, tie_word_embeddings=True))
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    with pytest.raises(RuntimeError, match="share memory"):
        save_file(sd, str(tmp_path / "x.safetensors"))
    kept = drop_tied_aliases(model, sd)
    assert set(sd) - set(kept) == {"lm_head.weight"}
    save_file({k: v.contiguous() for k, v in kept.items()}, str(tmp_path / "model.safetensors"))
    model.config.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    # untied weights are all kept
    untied = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL))
    assert drop_tied_aliases(untied, untied.state_dict()).keys() == untied.state_dict().keys()


def test_router_aux_loss_is_the_models_own():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2,
                                                           router_aux_loss_coef=0.02)).eval()
    aux = router_aux(model)
    assert (aux.coef, aux.num_experts, aux.top_k) == (0.02, 4, 2)
    ids = torch.randint(3, 101, (2, 10))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, output_router_logits=True)
        with aux.capture(model) as logits:
            model(input_ids=ids, use_cache=False)
        assert len(logits) == 2 and all(torch.equal(a, b) for a, b in zip(logits, out.router_logits))
        everything = aux.loss(logits, torch.ones(2, 10, dtype=torch.bool))
        assert abs(float(everything) - float(out.aux_loss)) < 1e-6
        # padding excluded: equals the model's own loss given the same 2-D mask
        mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4], dtype=torch.bool)
        own = model(input_ids=ids, attention_mask=mask.long(), use_cache=False, output_router_logits=True).aux_loss
        assert abs(float(aux.loss(logits, mask)) - float(own)) < 1e-6
        model(input_ids=ids, use_cache=False)
        assert len(logits) == 2  # hooks removed on exit
    assert router_aux(AutoModelForCausalLM.from_config(LlamaConfig(**SMALL))) is None
    assert families.moe_leaf_classes(model) == ["MixtralSparseMoeBlock"]
