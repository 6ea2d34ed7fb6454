"""What a model family needs to train correctly on packed rows: one table, consulted by model loading and the step.

A *family* is a transformers ``model_type``. The table (:data:`FAMILIES`) says, as data:

- ``isolation``: the ways transformers offers to keep the examples of a packed row apart, tried in order by
  :func:`probe_isolation` until one isolates on the loaded model (see :data:`ISOLATION_METHODS`);
- ``attn_excluded``: attention implementations the family cannot train with although its class flags allow them;
- ``moe_blocks``: class names of the mixture-of-experts blocks, registered as ZeRO-3 leaf modules so ZeRO-3
  gathers a block's parameters at once (``deepspeed.utils.set_z3_leaf_modules``).

Everything else is read from the model itself: whether sdpa / flash-attention are supported (the class flags
``_supports_sdpa``, ``_supports_flash_attn``), tied embeddings (``lm_head.weight is embed_tokens.weight``), the
router auxiliary loss (``router_aux_loss_coef``, ``num_experts``, ``num_experts_per_tok`` of the ForCausalLM module
and the ``load_balancing_loss_func`` of its modeling file). A family missing from the table gets
:data:`DEFAULT_FAMILY`, which tries every isolation method; the probe, not the table, decides.

Packed rows (``itune-data prepare``): examples follow each other from position 0, then a padding tail;
``position_ids`` restart at 0 for every example and for the tail, e.g. lengths [3, 2] in a row of 7:
``position_ids = [0, 1, 2, 0, 1, 0, 1]``. The trainer calls the model with ``attention_mask=None`` and
``use_cache=False`` plus the extra arguments of the chosen isolation method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from itune.config import ATTN_IMPLEMENTATIONS as ATTN_CHOICES
from itune.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """What one model family needs (see the module docstring).

    Attributes:
        isolation: isolation methods to probe, in order; each is a tuple of method names combined (e.g.
            ``("mask_mapping", "seq_idx")``).
        attn_excluded: attention implementations refused for this family, with the reason.
        moe_blocks: class names of MoE blocks (router + experts) to register as ZeRO-3 leaf modules.
        note: shown in the refusal message when nothing isolates.
    """

    isolation: tuple = (("position_ids",),)
    attn_excluded: dict = field(default_factory=dict)
    moe_blocks: tuple = ()
    note: str = ""


_GENERIC = (("position_ids",), ("mask_mapping",), ("varlen",), ("mask_mapping", "seq_idx"), ("varlen", "seq_idx"))
DEFAULT_FAMILY = Family(isolation=_GENERIC)

#: model_type -> Family. Families not listed get DEFAULT_FAMILY (every method probed).
FAMILIES: dict[str, Family] = {
    **{t: Family() for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                             "olmo2", "olmo3", "gpt_neox", "glm4", "smollm3", "granite", "cohere", "cohere2",
                             "starcoder2", "phi", "stablelm", "ministral", "exaone4", "seed_oss", "hunyuan_v1_dense")},
    "mixtral": Family(moe_blocks=("MixtralSparseMoeBlock",)),
    "qwen2_moe": Family(moe_blocks=("Qwen2MoeSparseMoeBlock",)),
    "qwen3_moe": Family(moe_blocks=("Qwen3MoeSparseMoeBlock",)),
    "olmoe": Family(moe_blocks=("OlmoeSparseMoeBlock",)),
    "granitemoe": Family(moe_blocks=("GraniteMoeMoE",)),
    # the forward builds its masks without position_ids: transformers' own packed masks, passed per layer type
    "gpt_oss": Family(isolation=(("mask_mapping",),), moe_blocks=("GptOssMLP",),
                      attn_excluded={"flash_attention_2": "its attention sinks need the vllm-flash-attn3 kernel",
                                     "flash_attention_3": "its attention sinks need the vllm-flash-attn3 kernel"}),
    # gated-delta-net layers separate sequences only through cu_seq_lens (flash-linear-attention kernels)
    "qwen3_5_text": Family(isolation=(("varlen",), ("mask_mapping", "varlen")),
                           note="its linear-attention layers keep packed sequences apart only with the "
                                "flash-linear-attention and causal-conv1d kernels (CUDA)"),
    "qwen3_5": Family(isolation=(("varlen",), ("mask_mapping", "varlen")),
                      note="its linear-attention layers keep packed sequences apart only with the "
                           "flash-linear-attention and causal-conv1d kernels (CUDA)"),
    "qwen3_next": Family(isolation=(("varlen",), ("mask_mapping", "varlen")), moe_blocks=("Qwen3NextSparseMoeBlock",),
                         note="its linear-attention layers keep packed sequences apart only with the "
                              "flash-linear-attention and causal-conv1d kernels (CUDA)"),
    # Mamba2 layers need seq_idx; the attention layers' mask is built without position_ids
    "granitemoehybrid": Family(isolation=(("mask_mapping", "seq_idx"), ("mask_mapping", "seq_idx", "varlen")),
                               moe_blocks=("GraniteMoeHybridMoE",),
                               note="its Mamba2 layers keep packed sequences apart only with the mamba-ssm and "
                                    "causal-conv1d kernels (CUDA)"),
}

#: method name -> what it passes (besides input_ids, position_ids, use_cache=False)
ISOLATION_METHODS = {
    "position_ids": "position_ids restarting at 0 per example, attention_mask=None (sdpa/eager/flex build a "
                    "block-diagonal causal mask from them; flash-attention takes the varlen path)",
    "mask_mapping": "attention_mask as a dict {layer type: mask} built by transformers.masking_utils from the "
                    "position_ids (for models whose forward builds its masks without them)",
    "varlen": "cu_seq_lens_q/k and max_length_q/k of the examples (the batch flattened to one row)",
    "seq_idx": "seq_idx, the example index of each token (Mamba2 kernels; the batch flattened to one row)",
}

_FLATTEN = {"varlen", "seq_idx"}


def family_of(hf_config) -> tuple[str, Family]:
    """The family of a transformers config: ``(model_type, Family)`` (DEFAULT_FAMILY when not listed)."""
    t = getattr(hf_config, "model_type", "")
    return t, FAMILIES.get(t, DEFAULT_FAMILY)


# ----------------------------------------------------------------------------------------------- attention


def causal_lm_class(hf_config):
    """The transformers ForCausalLM class of a config (None for remote code or an unknown config)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    except KeyError:
        return None


def _flash_installed(impl: str) -> bool:
    import importlib.util

    pkg = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}[impl]
    return importlib.util.find_spec(pkg) is not None


def choose_attn_implementation(requested: str, hf_config, cuda: bool, installed=_flash_installed) -> tuple[str, str]:
    """Resolves ``model.attn_implementation`` for a model config, before any process group starts.

    ``auto``: flash-attention 3, then 2, on CUDA when the package is installed and the family supports it
    (isolation on packed rows is then probed like any other implementation); else ``sdpa`` when the model class
    supports it (``_supports_sdpa``); else ``eager``.

    Args:
        requested: ``auto``, ``flash_attention_3``, ``flash_attention_2``, ``sdpa`` or ``eager``.
        cuda: whether the run uses CUDA.
        installed: ``installed(impl) -> bool``, whether the flash-attention package of ``impl`` is importable.

    Returns:
        ``(implementation, reason)``, e.g. ``("eager", "auto: Gemma2ForCausalLM does not support sdpa")``.

    Raises:
        ConfigError: an explicit value the model class or the family refuses, or flash-attention without CUDA or
            its package; the message names ``model.attn_implementation`` and the values that work.
    """
    cls = causal_lm_class(hf_config)
    name = cls.__name__ if cls is not None else type(hf_config).__name__
    model_type, fam = family_of(hf_config)
    flags = {"sdpa": getattr(cls, "_supports_sdpa", True), "eager": True,
             "flash_attention_2": getattr(cls, "_supports_flash_attn", True),
             "flash_attention_3": getattr(cls, "_supports_flash_attn", True)}

    def refusal(impl: str) -> str | None:
        if impl in fam.attn_excluded:
            return f"{model_type}: {fam.attn_excluded[impl]}"
        if not flags[impl]:
            return f"{name} does not support {impl}"
        if impl.startswith("flash"):
            if not cuda:
                return f"{impl} needs CUDA"
            if not installed(impl):
                return f"{impl} needs the {'flash-attn' if impl.endswith('2') else 'flash-attn 3'} package"
        return None

    if requested == "auto":
        skipped = []
        for impl in ("flash_attention_3", "flash_attention_2", "sdpa", "eager"):
            why = refusal(impl)
            if why is None:
                return impl, "auto" + (f" ({'; '.join(skipped)})" if skipped else "")
            if why not in skipped:
                skipped.append(why)
    if requested not in ATTN_CHOICES:
        raise ConfigError(f"model.attn_implementation: {requested!r} is not one of {', '.join(ATTN_CHOICES)}")
    why = refusal(requested)
    if why is not None:
        ok = [i for i in ("sdpa", "eager", "flash_attention_2", "flash_attention_3") if refusal(i) is None]
        raise ConfigError(f"model.attn_implementation: {requested} cannot be used ({why}); use auto or one of "
                          f"{', '.join(ok)}")
    return requested, "requested"


# ----------------------------------------------------------------------------------------------- isolation


def _layer_types(text_config) -> list[str]:
    for attr in ("layer_types", "layers_block_type"):
        v = getattr(text_config, attr, None)
        if isinstance(v, (list, tuple)) and v:
            return list(v)
    return ["full_attention"]


def mask_mapping(text_config, position_ids: torch.Tensor, dtype: torch.dtype) -> dict:
    """transformers' own masks for a packed batch, one per layer type of the model.

    Full-attention layers get ``create_causal_mask``, sliding-window layers ``create_sliding_window_causal_mask``,
    chunked layers ``create_chunked_causal_mask``, each given ``position_ids`` (so the mask is block-diagonal per
    example) and ``attention_mask=None``; recurrent layers (linear attention, Mamba) get None. The format follows
    ``text_config._attn_implementation`` (a boolean or additive 4-D mask, a flex BlockMask, or None for
    flash-attention, which takes the varlen path from ``position_ids``).

    Args:
        position_ids: [batch, seq_len].

    Returns:
        ``{layer type: mask or None}``; keys are the model's layer types plus ``full_attention`` and
        ``sliding_attention``.
    """
    from transformers import masking_utils as mu

    b, s = position_ids.shape
    embeds = torch.empty(b, s, 0, dtype=dtype, device=position_ids.device)  # only shape, dtype, device are read
    kw = dict(config=text_config, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=position_ids)
    full = mu.create_causal_mask(**kw)
    out = {"full_attention": full, "attention": full}
    for t in set(_layer_types(text_config)) | {"sliding_attention"}:
        if t in ("full_attention", "attention", "global", "global_attention"):
            out[t] = full
        elif "sliding" in t or t == "local":
            out[t] = (mu.create_sliding_window_causal_mask(**kw)
                      if getattr(text_config, "sliding_window", None) else full)
        elif "chunk" in t:
            out[t] = mu.create_chunked_causal_mask(**kw)
        else:  # linear attention, mamba, ...: no attention mask for an unpadded batch
            out[t] = None
    return out


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """Flash-attention's varlen arguments of a flattened packed batch.

    Args:
        position_ids: [1, tokens] (the batch flattened); an example starts wherever the position is 0.

    Returns:
        ``cu_seq_lens_q/k`` (int32 [examples + 1], cumulative lengths from 0) and ``max_length_q/k`` (int).
        E.g. positions [0, 1, 2, 0, 1, 0] -> cu_seq_lens [0, 3, 5, 6], max_length 3.
    """
    p = position_ids.reshape(-1)
    starts = torch.nonzero(p == 0).flatten()
    cu = torch.cat([starts, torch.tensor([p.numel()], device=p.device)]).to(torch.int32)
    m = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}


def seq_idx(position_ids: torch.Tensor) -> torch.Tensor:
    """Example index of every token (int32, same shape), counting from 0 in each row: positions [0, 1, 0, 1, 2]
    -> [0, 0, 1, 1, 1] (the ``seq_idx`` of mamba-ssm's kernels)."""
    return (torch.cumsum((position_ids == 0).to(torch.int32), dim=-1) - 1).to(torch.int32)


@dataclass(frozen=True)
class Isolation:
    """A chosen isolation method: the extra forward arguments derived from ``position_ids``.

    Attributes:
        methods: names from :data:`ISOLATION_METHODS`, combined.
        text_config: the model's text config (for the masks).
    """

    methods: tuple
    text_config: object = None

    @property
    def name(self) -> str:
        return "+".join(self.methods)

    @property
    def flatten(self) -> bool:
        """Whether the batch is flattened to one row ([batch, seq] -> [1, batch x seq]) for the call."""
        return bool(_FLATTEN & set(self.methods))

    def forward_kwargs(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict:
        """Extra keyword arguments for a packed batch whose (possibly flattened) positions are ``position_ids``."""
        kw: dict = {}
        if "mask_mapping" in self.methods:
            kw["attention_mask"] = mask_mapping(self.text_config, position_ids, dtype)
        if "varlen" in self.methods:
            kw.update(varlen_kwargs(position_ids))
        if "seq_idx" in self.methods:
            kw["seq_idx"] = seq_idx(position_ids)
        return kw


def model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def forward_packed(model, input_ids: torch.Tensor, position_ids: torch.Tensor, isolation: Isolation, **extra):
    """Calls a causal LM on packed rows with ``use_cache=False``, ``attention_mask=None`` and the isolation
    method's arguments.

    Args:
        input_ids, position_ids: [batch, seq_len].
        extra: more keyword arguments for the model (e.g. ``output_router_logits=True``).

    Returns:
        the model output, with ``logits`` reshaped back to [batch, seq_len, vocab] when the batch was flattened
        (router logits stay per flattened token).
    """
    b, s = input_ids.shape
    if isolation.flatten:
        input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
    kw = isolation.forward_kwargs(position_ids, model_dtype(model))
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kw, **extra)
    if isolation.flatten and out.logits is not None and out.logits.shape[1] == b * s:
        out.logits = out.logits.reshape(b, s, -1)
    return out


def _text_config(model):
    c = model.config
    return c.get_text_config() if hasattr(c, "get_text_config") else c


def probe_rows(vocab: int, lengths=(11, 17, 23), pad: int = 5, seed: int = 0):
    """Inputs of the isolation probe: a packed row of examples of ``lengths`` plus a ``pad``-token tail, the same
    row with the first example's tokens redrawn, and the examples alone. Token ids in [3, vocab); identical on
    every rank (seeded generator).

    Returns:
        ``(row [1, L], row_other_first [1, L], position_ids [1, L], examples [list of 1-D tensors])``.
    """
    g = torch.Generator().manual_seed(seed)
    hi = max(4, vocab)
    ex = [torch.randint(3, hi, (n,), generator=g) for n in lengths]
    other = torch.randint(3, hi, (lengths[0],), generator=g)
    tail = torch.zeros(pad, dtype=torch.long)
    row = torch.cat([*ex, tail])[None]
    row_b = torch.cat([other, *ex[1:], tail])[None]
    pos = torch.cat([torch.arange(n) for n in (*lengths, pad)])[None]
    return row, row_b, pos, ex


#: absolute tolerance of the probe, per dtype, scaled by max(1, max |logit|)
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _max_all_ranks(values: list[float]) -> list[float]:
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64)
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


def _measure(model, iso: Isolation, vocab: int, device) -> dict:
    """One probe of one method: the largest change of later examples' logits when the first example changes
    (``leak``, 0 when isolated), and the largest difference of each example's logits packed vs alone
    (``diff_first`` for the first example, which causality already isolates: the numeric noise of the
    comparison; ``diff_later`` for the others)."""
    row, row_b, pos, ex = probe_rows(vocab)
    n0 = len(ex[0])
    end = n0 + sum(len(e) for e in ex[1:])
    with torch.no_grad():
        a = forward_packed(model, row.to(device), pos.to(device), iso).logits[0].float()
        b = forward_packed(model, row_b.to(device), pos.to(device), iso).logits[0].float()
        alone = [forward_packed(model, e[None].to(device), torch.arange(len(e))[None].to(device), iso)
                 .logits[0].float() for e in ex]
    leak = float((a[n0:end] - b[n0:end]).abs().max())
    diffs, start = [], 0
    for e, al in zip(ex, alone):
        diffs.append(float((a[start:start + len(e)] - al).abs().max()))
        start += len(e)
    return {"leak": leak, "diff_first": diffs[0], "diff_later": max(diffs[1:]),
            "scale": max(1.0, float(a[:end].abs().max()))}


def probe_isolation(model, vocab: int, packed: bool = True) -> dict:
    """Probes the loaded model (every rank, under ZeRO-3 too): is a packed row computed as its examples alone?

    For each isolation method of the family (:data:`FAMILIES`) in order: a packed row of 3 random examples
    (11, 17 and 23 tokens) and a padding tail, in the model's dtype and attention implementation, is compared with
    (a) the same row with the first example redrawn (examples 2-3 must not change: ``leak``) and (b) each example
    alone (``diff_later``, allowed up to 4x the first example's difference ``diff_first``, which is numeric noise
    only). Isolated when ``leak <= tol`` and ``diff_later <= max(tol, 4 x diff_first)``, with
    ``tol = PROBE_TOLERANCE[dtype] x max(1, max |logit|)``. Measurements are the maximum over ranks, so every
    rank decides alike. Five forward passes per method tried.

    Args:
        model: the causal LM (``engine.module`` under ZeRO-3: parameters are gathered by the engine's hooks).
        vocab: token ids are drawn below this.
        packed: whether the data packs several examples per row (False: the result is reported, not enforced).

    Returns:
        ``{"isolation": Isolation or None, "method": name, "isolated": bool, "tried": [per method: leak,
        diff_first, diff_later, tolerance, isolated or error], "dtype", "attn_implementation", "seconds",
        "model_type"}``.
    """
    t0 = time.time()
    text = _text_config(model)
    model_type, fam = family_of(model.config)
    dtype = model_dtype(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tried, chosen = [], None
    for methods in fam.isolation:
        iso = Isolation(tuple(methods), text)
        try:
            m = _measure(model, iso, vocab, device)
        except Exception as e:  # noqa: BLE001  (a method the model does not accept)
            m = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        err, leak, d0, d1, scale = _max_all_ranks([1.0 if "error" in m else 0.0] + [
            m.get(k, 0.0) for k in ("leak", "diff_first", "diff_later", "scale")])
        if err:
            tried.append({"method": iso.name, "error": m.get("error", "failed on another rank")})
            continue
        tol = PROBE_TOLERANCE.get(dtype, 2e-2) * scale
        ok = leak <= tol and d1 <= max(tol, 4 * d0)
        tried.append({"method": iso.name, "leak": leak, "diff_first": d0, "diff_later": d1, "tolerance": tol,
                      "isolated": ok})
        if ok:
            chosen = iso
            break
    if was_training:
        model.train()
    if chosen is None and not packed:
        chosen = Isolation(("position_ids",), text)
    return {"model_type": model_type, "attn_implementation": getattr(text, "_attn_implementation", None),
            "dtype": str(dtype).replace("torch.", ""), "isolation": chosen,
            "method": chosen.name if chosen is not None else None,
            "isolated": chosen is not None and any(t.get("isolated") for t in tried), "tried": tried,
            "seconds": round(time.time() - t0, 3)}


def refusal_message(probe: dict, data_path) -> str:
    """The one-line refusal of packed data for a model that no isolation method isolates."""
    fam = FAMILIES.get(probe["model_type"], DEFAULT_FAMILY)
    parts = []
    for t in probe["tried"]:
        if "error" in t:
            parts.append(f"{t['method']}: {t['error']}")
        else:
            parts.append(f"{t['method']}: logits of a later example change by {max(t['leak'], t['diff_later']):.3g} "
                         f"(tolerance {t['tolerance']:.3g})")
    return (f"{data_path}: packed rows would let examples attend to each other in this {probe['model_type']} model "
            f"(attention {probe['attn_implementation']}, {probe['dtype']}"
            + (f"; {fam.note}" if fam.note else "") + f"); probed: {'; '.join(parts)}. Ways out: prepare the data "
            "without packing (`itune-data prepare --no-pack`), or set another model.attn_implementation")


# ----------------------------------------------------------------------------------------------- MoE


def moe_leaf_classes(model) -> list[str]:
    """Class names of the family's MoE blocks present in ``model`` (empty for a dense model)."""
    _, fam = family_of(model.config)
    present = {type(m).__name__ for m in model.modules()}
    return [c for c in fam.moe_blocks if c in present]


@dataclass(frozen=True)
class RouterAux:
    """The router load-balancing loss of a MoE model, as its own forward computes it.

    Attributes:
        coef: ``router_aux_loss_coef`` of the model.
        num_experts, top_k: from the ForCausalLM module (``num_experts``, ``num_experts_per_tok``).
        fn: the family's ``load_balancing_loss_func`` (Switch Transformer, arXiv 2101.03961, eqs. 4-6):
            ``E x sum_e f_e x P_e`` over the tokens the mask keeps, all layers pooled.
        router_class, index: where the router logits come from (the model class's own
            ``_can_record_outputs["router_logits"]``: the router module and the index of its output), read with
            forward hooks, so the model's forward never computes its own aux loss (it would need a 2-D attention
            mask, which packed rows do not have).
    """

    coef: float
    num_experts: int
    top_k: int
    fn: object
    router_class: type
    index: int

    def capture(self, model):
        """Context manager recording the router logits of one forward: ``with aux.capture(model) as logits:``;
        ``logits`` is a list of [tokens, experts] tensors, one per MoE layer, filled by the forward. The hooks are
        removed on exit, before backward, so recomputation under gradient checkpointing adds nothing."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            got: list = []

            def hook(module, args, output):
                got.append(output[self.index] if isinstance(output, (tuple, list)) else output)

            handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, self.router_class)]
            try:
                yield got
            finally:
                for h in handles:
                    h.remove()

        return ctx()

    def loss(self, router_logits, real_mask: torch.Tensor) -> torch.Tensor:
        """Aux loss of one micro-batch over its real (non-padding) tokens.

        Args:
            router_logits: per MoE layer, [tokens, experts] (tokens = batch x seq_len, flattened).
            real_mask: [batch, seq_len] bool, True on tokens of examples.
        """
        return self.fn(tuple(router_logits), self.num_experts, self.top_k, real_mask.to(torch.float32))


def router_aux(model) -> RouterAux | None:
    """The model's router auxiliary loss, or None for a dense model or a coefficient of 0. A PEFT model (LoRA) is
    read through its base model, whose family class defines the loss."""
    import sys

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    coef = getattr(model, "router_aux_loss_coef", None)
    fn = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    n = getattr(model, "num_experts", None)
    k = getattr(model, "num_experts_per_tok", None)
    rec = (getattr(type(model), "_can_record_outputs", None) or {}).get("router_logits")
    if not coef or fn is None or not n or not k or rec is None:
        return None
    cls = getattr(rec, "target_class", rec)
    return RouterAux(float(coef), int(n), int(k), fn, cls, int(getattr(rec, "index", 0)))
