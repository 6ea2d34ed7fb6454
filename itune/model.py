"""Model construction under ZeRO-3, the DeepSpeed config the trainer injects into, optimizer and schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from itune.config import BatchPlan, ModelConfig, OptimConfig, RunConfig, path_not_found
from itune.errors import ConfigError

# keys the trainer owns, with the run-config field that sets them
INJECTED_KEYS = {
    "train_batch_size": "train.micro_batch_size x train.gradient_accumulation_steps x world size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.* (itune builds AdamW)",
    "scheduler": "optim.schedule / optim.warmup_steps",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
}


def use_bf16(model_cfg: ModelConfig, cuda: bool) -> bool:
    """bf16 when asked for, or ``auto`` on CUDA; fp32 on CPU (``auto``)."""
    if model_cfg.dtype == "bf16":
        return True
    return model_cfg.dtype == "auto" and cuda


def build_ds_config(path: str | Path, plan: BatchPlan, optim: OptimConfig, hidden_size: int, bf16: bool) -> dict:
    """Reads an engine-settings JSON and injects batch sizes, clipping and precision.

    ``"auto"`` bucket sizes are resolved from the hidden size as transformers' DeepSpeed integration does:
    reduce_bucket_size = h*h, stage3_prefetch_bucket_size = 0.9*h*h, stage3_param_persistence_threshold = 10*h.

    Raises:
        ConfigError: the file is missing, is not a JSON object (names the line and column) or sets a key the
            trainer injects (names the key and where to set it).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(path_not_found("ds_config", p))
    fix = "fix the JSON or point ds_config at a file in ds_configs/"
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config: {p}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); {fix}") \
            from None
    except UnicodeDecodeError:
        raise ConfigError(f"ds_config: {p}: not valid JSON (not UTF-8 text); {fix}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config: {p}: a JSON object ({{...}}) expected, got {type(ds).__name__}; {fix}")
    bad = [f"{k!r} (set {INJECTED_KEYS[k]} in the run config)" for k in INJECTED_KEYS if k in ds]
    if bad:
        raise ConfigError(f"{p}: sets keys that the trainer injects: {', '.join(bad)}; remove them from the JSON")
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.gradient_accumulation_steps
    if plan.sequence_parallel_size == 1:
        ds["train_batch_size"] = plan.global_rows_per_step
    else:  # DeepSpeed's batch check counts all ranks before it knows the SP groups and data-parallel ranks after:
        ds.pop("train_batch_size", None)  # it derives the value from the two below
    ds["gradient_clipping"] = optim.grad_clip
    ds["bf16"] = {"enabled": bf16}
    z = ds.get("zero_optimization", {})
    auto = {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}
    for k, v in auto.items():
        if z.get(k) == "auto":
            z[k] = v
    return ds


def check_model_config(cfg: RunConfig) -> list[str]:
    """Problems with the model section found without building anything: unknown ``architecture`` keys (checked
    against ``LlamaConfig``), head arithmetic, a missing checkpoint directory, an unreadable checkpoint config,
    truncated or missing safetensors files (:func:`itune.checkpoint.safetensors_problems`), an attention
    implementation the model refuses."""
    from transformers import LlamaConfig

    e = []
    hf_config = LlamaConfig()
    if cfg.model.pretrained:
        from itune.checkpoint import safetensors_problems

        d = Path(cfg.model.pretrained)
        if not d.exists():
            return [path_not_found("model.pretrained", d)]
        if not (d / "config.json").is_file():
            return [f"model.pretrained: {d} is not a Hugging Face model directory (no config.json)"]
        try:
            hf_config = model_config(cfg, 0)
        except (OSError, ValueError, KeyError, TypeError) as err:  # a config.json transformers cannot read
            return [f"model.pretrained: {d / 'config.json'} cannot be read by transformers ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200] if str(err) else ''})"]
        e += [f"model.pretrained: {x}" for x in safetensors_problems(d)]
        if not (d / "tokenizer.json").is_file():  # the data's tokenizer is checked against the model's
            e.append(f"model.pretrained: {d} has no tokenizer.json; copy the model's tokenizer files (tokenizer.json, "
                     "tokenizer_config.json, special_tokens_map.json) into it, as save_pretrained of the tokenizer "
                     "writes them")
    try:
        attention(cfg, hf_config, torch.cuda.is_available())
    except ConfigError as err:
        e.append(str(err))
    lora = cfg.model.lora
    if lora is not None:
        if isinstance(lora.r, int) and lora.r < 1:
            e.append(f"model.lora.r: {lora.r}: must be >= 1")
        if isinstance(lora.dropout, (int, float)) and not 0 <= lora.dropout < 1:
            e.append(f"model.lora.dropout: {lora.dropout}: must be in [0, 1)")
        if isinstance(lora.alpha, (int, float)) and not lora.alpha > 0:
            e.append(f"model.lora.alpha: {lora.alpha}: must be > 0")
    e += quantization_problems(cfg, torch.cuda.is_available())
    from itune.loss import liger_loss_problems

    e += liger_loss_problems(cfg.train.liger_loss, cfg.train.tiled_loss, torch.cuda.is_available())
    if cfg.model.activation_offload and not torch.cuda.is_available():
        e.append("model.activation_offload: moves activations from GPU to CPU memory, and this machine has no CUDA "
                 "device; set model.activation_offload=false")
    if cfg.model.pretrained:
        return e
    known = set(LlamaConfig().to_dict())
    for k in cfg.model.architecture:
        if k not in known:
            close = [n for n in known if n.replace("_", "") == k.replace("_", "") or
                     (len(n) == len(k) and sum(a != b for a, b in zip(n, k)) <= 2)]
            e.append(f"model.architecture.{k}: not a LlamaConfig field" + (f" (did you mean {close[0]}?)"
                                                                          if close else ""))
    a = cfg.model.architecture
    h, heads, kv = a.get("hidden_size"), a.get("num_attention_heads"), a.get("num_key_value_heads")
    if isinstance(h, int) and isinstance(heads, int) and heads > 0 and h % heads:
        e.append(f"model.architecture: hidden_size {h} is not a multiple of num_attention_heads {heads}")
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        e.append(f"model.architecture: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return e


def model_config(cfg: RunConfig, vocab_size: int):
    """The transformers config: from the checkpoint directory, or a LlamaConfig from ``architecture``."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.model.pretrained:
        c = AutoConfig.from_pretrained(cfg.model.pretrained, trust_remote_code=cfg.model.trust_remote_code)
    else:
        c = LlamaConfig(**{"vocab_size": vocab_size, **cfg.model.architecture})
    c.use_cache = False
    return c


def attention(cfg: RunConfig, hf_config, cuda: bool) -> tuple[str, str]:
    """``model.attn_implementation`` resolved for this model (:func:`itune.families.choose_attn_implementation`).

    Raises:
        ConfigError: a value the model refuses, naming ``model.attn_implementation`` and the values that work.
    """
    from itune.families import choose_attn_implementation

    return choose_attn_implementation(cfg.model.attn_implementation, hf_config, cuda)


def embedding_rows(model_rows: int, tokenizer_size: int, model_cfg: ModelConfig) -> int:
    """Rows the input embedding (and an untied ``lm_head``) must have to train on data of a tokenizer.

    The model's own ``model_rows`` when the tokenizer fits (a tokenizer smaller than the embedding is fine: the
    extra rows are never read); else ``tokenizer_size`` rounded up to ``model.pad_vocab_size_to_multiple_of``,
    e.g. 32771 tokens with multiple 64 -> 32832 rows.

    Raises:
        ConfigError: the tokenizer is larger and ``model.resize_token_embeddings`` is false (names both sizes).
    """
    if tokenizer_size <= model_rows:
        return model_rows
    if not model_cfg.resize_token_embeddings:
        raise ConfigError(
            f"the data's tokenizer has {tokenizer_size} tokens but the model's embedding has {model_rows} rows "
            f"(vocab_size); set model.resize_token_embeddings=true to add {tokenizer_size - model_rows} rows "
            "(initialised to the mean of the existing rows), or prepare the data with the model's tokenizer")
    m = model_cfg.pad_vocab_size_to_multiple_of
    return -(-tokenizer_size // m) * m


def resize_embeddings(model, rows: int, ds_config: dict | None = None) -> int | None:
    """Grows the input embedding and an untied output embedding (``lm_head``) to ``rows`` rows in place; every
    new row (weight and bias) is the mean of the old rows, computed in fp32. Old rows are unchanged. Updates
    ``model.config.vocab_size``. A no-op when the embedding already has ``rows`` rows or more.

    This is transformers' ``resize_token_embeddings(rows, mean_resizing=True)`` without its random draw: it
    samples the new rows from N(mean, 1e-9 x covariance) (noise of std 6e-7 per element for rows of std 0.02),
    on every rank, as full unpartitioned tensors that ``deepspeed.initialize`` later partitions from rank 0's copy.
    Under ZeRO-3 (parameters partitioned by ``deepspeed.zero.Init``) the new weights are created partitioned
    with ``deepspeed.zero.Init(config_dict_or_path=ds_config)``, filled on rank 0 inside
    ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)`` and broadcast and re-partitioned on exit. Call it
    on every rank, before the optimizer and ``deepspeed.initialize``.

    Args:
        model: a transformers causal LM (``get_input_embeddings`` an ``nn.Embedding``, ``get_output_embeddings``
            an ``nn.Linear``, tied to the input embedding or not, or None).
        rows: embedding rows wanted (tokens).
        ds_config: the DeepSpeed config the model was partitioned with (required under ZeRO-3).

    Returns:
        the number of rows before resizing, or None when nothing changed.
    """
    import contextlib

    import deepspeed
    import torch.distributed as tdist

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    old_rows, hidden = tuple(getattr(inp.weight, "ds_shape", inp.weight.shape))
    if rows <= old_rows:
        return None
    tied = out is not None and out.weight is inp.weight
    zero3 = hasattr(inp.weight, "ds_id")
    rank0 = not tdist.is_initialized() or tdist.get_rank() == 0
    dtype = inp.weight.dtype
    with deepspeed.zero.Init(config_dict_or_path=ds_config) if zero3 else contextlib.nullcontext():
        new_inp = torch.nn.Embedding(rows, hidden, padding_idx=inp.padding_idx, dtype=dtype)
        new_out = (torch.nn.Linear(hidden, rows, bias=out.bias is not None, dtype=out.weight.dtype)
                   if out is not None and not tied else None)
    pairs = [(inp.weight, new_inp.weight)]
    if new_out is not None:
        pairs.append((out.weight, new_out.weight))
        if out.bias is not None:
            pairs.append((out.bias, new_out.bias))
    with deepspeed.zero.GatheredParameters([p for pair in pairs for p in pair], modifier_rank=0), torch.no_grad():
        if rank0 or not zero3:
            for old, new in pairs:  # [old_rows, hidden] -> [rows, hidden]; a bias [old_rows] -> [rows]
                new[:old_rows] = old
                new[old_rows:] = old.float().mean(dim=0).to(new.dtype)
    inp.weight, inp.num_embeddings = new_inp.weight, rows
    if tied:
        out.weight, out.out_features = inp.weight, rows
    elif new_out is not None:
        out.weight, out.bias, out.out_features = new_out.weight, new_out.bias, rows
    model.config.get_text_config().vocab_size = rows
    for m in (model, getattr(model, "base_model", None)):
        if m is not None and hasattr(m, "vocab_size"):
            m.vocab_size = rows
    return old_rows


def build_model(cfg: RunConfig, hf_config, bf16: bool, attn_implementation: str):
    """Builds (random init) or loads (safetensors) the model; partitioned at construction when ZeRO-3 is active.

    The caller must have created ``transformers.integrations.HfDeepSpeedConfig`` for a ZeRO-3 config and keep it
    alive: transformers then constructs under ``deepspeed.zero.Init`` so no rank holds the full model.

    Args:
        attn_implementation: resolved by :func:`attention` (never ``auto``).

    Raises:
        ConfigError: a checkpoint file that cannot be read (names the directory).
    """
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    kw = dict(attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.quantization is not None:
        kw["quantization_config"] = bnb_config(cfg.model.quantization, dtype)
    if cfg.model.pretrained:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, config=hf_config, use_safetensors=True,
                                                     **kw)
    else:
        model = AutoModelForCausalLM.from_config(hf_config, **kw)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay for matrices, none for norms and biases (shape read before partitioning)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (no_decay if len(shape) < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # DeepSpeed drops an empty group (LoRA: no trainable norm), the lr
    # scheduler built on the optimizer would then hold one lr too many


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier of the peak lr at optimizer step ``s`` (0-based): linear warmup, then cosine/linear/constant
    to ``min_lr_ratio`` at the last step."""
    warm = optim.warmup_steps
    lo = optim.min_lr_ratio

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if optim.schedule == "constant":
            return 1.0
        span = max(1, total_steps - warm - 1)
        progress = min(1.0, (s - warm) / span)
        if optim.schedule == "linear":
            return 1.0 - (1.0 - lo) * progress
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def flops_per_token(hf_config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x N (non-embedding matmul params) + 12 x layers x hidden x seq_len (attention
    scores and values, forward + backward), as in the PaLM paper (Chowdhery et al. 2022, appendix B).

    N counts, per layer, the q/o projections (2 x hidden x heads x head_dim), k/v (2 x hidden x kv_heads x
    head_dim) and a gated MLP of 3 x hidden x intermediate per active expert (``num_experts_per_tok`` experts of
    ``moe_intermediate_size`` for a MoE), plus the LM head. Hybrid layers (Mamba, linear attention) are counted as
    attention layers: an estimate there.
    """
    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    h, L = c.hidden_size, c.num_hidden_layers
    heads = c.num_attention_heads
    head = getattr(c, "head_dim", None) or h // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    top_k = getattr(c, "num_experts_per_tok", None) or getattr(c, "experts_per_token", None)
    inter = (getattr(c, "moe_intermediate_size", None) if top_k else None) or getattr(c, "intermediate_size", None) \
        or 4 * h
    per_layer = 2 * h * heads * head + 2 * h * kv * head + 3 * h * inter * (top_k or 1)
    n = L * per_layer + h * c.vocab_size  # + LM head
    return 6 * n + 12 * L * h * seq_len


def apply_tiled_mlp(model) -> int:
    """Makes every gated MLP of ``model`` (a module with ``gate_proj``, ``up_proj`` and ``down_proj``) run over
    sequence tiles with DeepSpeed's ``TiledMLP`` (``ceil(seq / hidden)`` tiles, the maximum over ranks so that
    ZeRO-3 gathers stay in step; the tiles are recomputed in the backward pass). Returns how many were changed.
    The output is the same as the module's own ``forward`` (per-token computation)."""
    import types

    import torch.distributed as tdist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    n = 0
    for module in model.modules():
        if not all(isinstance(getattr(module, k, None), torch.nn.Linear) for k in ("gate_proj", "up_proj",
                                                                                   "down_proj")):
            continue
        plain = module.forward

        def tiled(self, x, _plain=plain):
            hidden = x.shape[-1]
            shards = torch.tensor(max(1, -(-x.shape[-2] // hidden)), device=x.device)
            if tdist.is_available() and tdist.is_initialized():
                tdist.all_reduce(shards, op=tdist.ReduceOp.MAX)
            return TiledMLP.apply(lambda _self, t: _plain(t), self, x, int(shards), list(self.parameters()))

        module.forward = types.MethodType(tiled, module)
        n += 1
    return n


def peft_lora_config(lora):
    """PEFT's ``LoraConfig`` for :class:`itune.config.LoraSettings`."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules) or "all-linear",
                      modules_to_save=list(lora.modules_to_save) or None, task_type="CAUSAL_LM")


def apply_lora(model, lora, seed: int):
    """Wraps ``model`` with PEFT LoRA adapters (:func:`peft_lora_config`); the adapters are initialised from
    ``seed`` (every rank alike, before ZeRO-3 partitions them at ``deepspeed.initialize``), the base frozen.

    Raises:
        ConfigError: a target module name the model does not have.
    """
    from peft import get_peft_model

    torch.manual_seed(seed)
    try:
        return get_peft_model(model, peft_lora_config(lora))
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        raise ConfigError(f"model.lora: {str(e).splitlines()[0][:300]}") from None


def is_lora(model) -> bool:
    """Whether ``model`` is a PEFT model (LoRA adapters)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def quantization_problems(cfg: RunConfig, cuda: bool) -> list[str]:
    """Why ``model.quantization`` cannot run here (empty when it can or is unset): it needs ``model.lora``, a
    ``model.pretrained`` checkpoint, CUDA and the bitsandbytes package, 4 bits and a known quantization type."""
    q = cfg.model.quantization
    if q is None:
        return []
    e = []
    if q.bits != 4:
        e.append(f"model.quantization.bits: {q.bits}: only 4-bit (QLoRA) is supported")
    if q.quant_type not in ("nf4", "fp4"):
        e.append(f"model.quantization.quant_type: {q.quant_type!r}: choose nf4 or fp4")
    if cfg.model.lora is None:
        e.append("model.quantization: a 4-bit base cannot be trained; set model.lora (QLoRA trains adapters on it)")
    if not cfg.model.pretrained:
        e.append("model.quantization: quantizes a model.pretrained checkpoint; none is set")
    if not cuda:
        e.append("model.quantization: 4-bit weights need CUDA (bitsandbytes kernels), and this machine has no CUDA "
                 "device; remove model.quantization to train LoRA on the unquantized base")
    else:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            e.append("model.quantization: needs the bitsandbytes package (pip install bitsandbytes)")
    return e


def bnb_config(q, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for :class:`itune.config.QuantizationSettings`: 4-bit base weights,
    compute in ``dtype``, and the packed weights stored in ``dtype`` so that ZeRO-3 can partition them like any
    other parameter (``bnb_4bit_quant_storage``, as transformers documents for QLoRA with DeepSpeed ZeRO-3)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=dtype)
