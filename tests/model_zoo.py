"""Tiny random-init Hugging Face checkpoints of popular decoder families, laid out as a user's checkpoint directory.

``build_checkpoint(name, out_dir)`` writes ``config.json``, ``generation_config.json`` and ``model.safetensors``
(``save_pretrained``) and copies the tokenizer files of ``tokenizer_dir`` beside them, so the directory loads with
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` like a downloaded model.

Every family is tiny (2-4 layers, hidden 64, 4 heads / 2 KV heads of 16 dims) but keeps what sets it apart from
Llama switched on: tied embeddings where the small released models tie them, sliding-window layers (window 16,
shorter than the rows tests pack), logit soft-capping, MoE routers with a non-zero aux-loss coefficient,
linear-attention / Mamba layers, no-RoPE layers, Granite's multipliers. Token ids follow the Mistral v0.3
tokenizer (vocab 32768, ``<s>`` 1, ``</s>`` 2); it defines no pad token, and the config's ``pad_token_id`` is 0
(``<unk>``): the embedding row of ``pad_token_id`` is zeroed at init and gets no gradient (``padding_idx``), which
must not hit ``</s>``, a token that is trained.

Class names are resolved from ``transformers`` only when a checkpoint is built, so importing this module is cheap.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ITUNE_SHARED", ROOT.parent / "shared"))
MISTRAL = SHARED / "tokenizers" / "mistral-7b-v0.3"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")

VOCAB_SIZE = 32768
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
SLIDING_WINDOW = 16

# shared by every family (a family's own kwargs override these)
_BASE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)
_HEAD_DIM = dict(head_dim=16)
_ALTERNATING = ["sliding_attention", "full_attention"]
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


@dataclass(frozen=True)
class Family:
    """How to build one family: ``transformers.<config>(**_BASE, **kwargs)``, then
    ``AutoModelForCausalLM.from_config``; ``model`` names the class that must come out (the auto mapping's when
    None)."""

    config: str
    kwargs: dict = field(default_factory=dict)
    model: str | None = None
    base: bool = True  # start from _BASE

    def config_class(self):
        import transformers

        return getattr(transformers, self.config)

    def make_config(self):
        kwargs = {**(_BASE if self.base else {}), **self.kwargs}
        return self.config_class()(**kwargs)


FAMILIES: dict[str, Family] = {
    # Llama 3.1 / 3.2: llama3 RoPE scaling; 3.2-1B/3B tie the embeddings
    "llama3": Family("LlamaConfig", dict(_HEAD_DIM, max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE,
                                         tie_word_embeddings=False)),
    "llama3_tied": Family("LlamaConfig", dict(_HEAD_DIM, max_position_embeddings=131072,
                                              rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True)),
    # every layer is sliding-window
    "mistral": Family("MistralConfig", dict(_HEAD_DIM, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)),
    # Qwen2 always has q/k/v biases; the small Qwen2/2.5/3 models tie the embeddings
    "qwen2": Family("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": Family("Qwen3Config", dict(_HEAD_DIM, tie_word_embeddings=True)),
    "qwen3_moe": Family("Qwen3MoeConfig", dict(
        _HEAD_DIM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
        router_aux_loss_coef=0.01, output_router_logits=False, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False)),
    "mixtral": Family("MixtralConfig", dict(_HEAD_DIM, num_local_experts=4, num_experts_per_tok=2,
                                            router_aux_loss_coef=0.02, output_router_logits=False,
                                            sliding_window=None, tie_word_embeddings=False)),
    "gemma": Family("GemmaConfig", dict(_HEAD_DIM, tie_word_embeddings=True)),
    "gemma2": Family("Gemma2Config", dict(
        _HEAD_DIM, query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=SLIDING_WINDOW, layer_types=_ALTERNATING, tie_word_embeddings=True)),
    "gemma3": Family("Gemma3TextConfig", dict(
        _HEAD_DIM, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW, layer_types=_ALTERNATING,
        tie_word_embeddings=True), model="Gemma3ForCausalLM"),
    "phi3": Family("Phi3Config", dict(tie_word_embeddings=False)),
    "olmo2": Family("Olmo2Config", dict(tie_word_embeddings=False)),
    "olmo3": Family("Olmo3Config", dict(sliding_window=SLIDING_WINDOW, layer_types=_ALTERNATING,
                                        tie_word_embeddings=False)),
    "gpt_neox": Family("GPTNeoXConfig", dict(use_parallel_residual=True, tie_word_embeddings=False)),
    "glm4": Family("Glm4Config", dict(_HEAD_DIM, tie_word_embeddings=False)),
    # no_rope_layers: 1 = RoPE, 0 = no RoPE (SmolLM3 drops RoPE in every 4th layer)
    "smollm3": Family("SmolLM3Config", dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0],
                                            tie_word_embeddings=True)),
    # Granite-3.x multipliers
    "granite": Family("GraniteConfig", dict(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                                            attention_multiplier=0.015625, tie_word_embeddings=True)),
    # released config.json files carry both experts_per_token and num_experts_per_tok
    "gpt_oss": Family("GptOssConfig", dict(
        _HEAD_DIM, num_local_experts=4, num_experts_per_tok=2, experts_per_token=2, sliding_window=SLIDING_WINDOW,
        layer_types=_ALTERNATING, router_aux_loss_coef=0.9, output_router_logits=False, tie_word_embeddings=False)),
    # Qwen3.5 text model: Gated DeltaNet (linear attention) layers + gated full-attention layers
    "qwen3_5": Family("Qwen3_5TextConfig", dict(
        _HEAD_DIM, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        tie_word_embeddings=False), model="Qwen3_5ForCausalLM"),
    # Granite-4.0-H: Mamba2 layers + attention layers (no RoPE), each with MoE + shared MLP
    "granitemoehybrid": Family("GraniteMoeHybridConfig", dict(
        num_hidden_layers=4, layers_block_type=["mamba", "attention", "mamba", "attention"],
        intermediate_size=64, shared_intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.01, output_router_logits=False, position_embedding_type="nope",
        mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=16, embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
        attention_multiplier=0.015625, tie_word_embeddings=True)),
    "qwen2_moe": Family("Qwen2MoeConfig", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
        router_aux_loss_coef=0.001, output_router_logits=False, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False)),
    "olmoe": Family("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=64,
                                        router_aux_loss_coef=0.01, output_router_logits=False,
                                        tie_word_embeddings=False)),
}

TIED = {"llama3_tied", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "smollm3", "granite", "granitemoehybrid"}
MOE = {"qwen3_moe", "mixtral", "gpt_oss", "granitemoehybrid", "qwen2_moe", "olmoe"}
HYBRID = {"qwen3_5", "granitemoehybrid"}  # layers without softmax attention (linear attention / Mamba2)


def build_checkpoint(name: str, out_dir: Path, tokenizer_dir: Path = MISTRAL, seed: int = 0) -> Path:
    """Writes the random-init checkpoint of family ``name`` into ``out_dir`` (created) and returns ``out_dir``.

    Raises:
        KeyError: ``name`` is not in :data:`FAMILIES`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    family = FAMILIES[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = family.make_config()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if family.model is not None and type(model).__name__ != family.model:
        raise TypeError(f"{name}: AutoModelForCausalLM built {type(model).__name__}, not {family.model}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_dir = Path(tokenizer_dir)
    for fname in TOKENIZER_FILES:
        if (tokenizer_dir / fname).is_file():
            shutil.copyfile(tokenizer_dir / fname, out_dir / fname)
    return out_dir
