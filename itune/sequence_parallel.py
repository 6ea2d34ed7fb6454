"""Ulysses sequence parallelism (DeepSpeed ALST, arXiv 2506.13996) on packed rows.

``train.sequence_parallel_size: N`` splits every row's sequence over N consecutive ranks (an SP group): each rank
runs the model on ``seq_len / N`` positions, and in every attention layer DeepSpeed's ``UlyssesSPAttentionHF``
all-to-all trades the sequence split for a head split, so each rank attends over the whole row for
``heads / N`` heads. The ``world_size / N`` SP groups are the data-parallel replicas: they read different rows.

DeepSpeed's wrapper drops the attention mask and calls the attention with ``is_causal=True`` over the gathered
row, which would let packed examples see each other (measured: loss off by 8.7e-3 on a packed row). So the core
attention it wraps is replaced first by :func:`packed_attention`, which builds each example's causal mask from the
gathered ``position_ids`` (0 starts an example). Targets are shifted on the whole row before it is split, so the
last position of a shard predicts the first token of the next one, and every trained token counts once per SP
group in the step's token count (:func:`itune.loss.packed_loss_sum`). In eval mode the wrapper steps aside
(``disable_in_eval``): held-out loss, generation and the export check run on whole rows, on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in sequence parallelism: ``size`` ranks per SP group, ``rank`` within it."""

    size: int
    rank: int

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's positions of ``t`` ([batch, seq_len, ...] -> [batch, seq_len / size, ...])."""
        n = t.shape[1] // self.size
        return t[:, self.rank * n:(self.rank + 1) * n]


def packed_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Block-causal mask of packed rows: bool [batch, 1, seq, seq], True where query i may attend key j (same
    example, j <= i). An example starts where ``position_ids`` is 0 ([batch, seq])."""
    doc = (position_ids == 0).cumsum(-1)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def packed_attention(core):
    """``core`` (a transformers attention function) with the per-example causal mask of the row's
    ``position_ids`` when it is called without a mask (as DeepSpeed's Ulysses wrapper calls it)."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        pos = kwargs.get("position_ids")
        if attention_mask is None and pos is not None and pos.shape[-1] == query.shape[-2] == key.shape[-2]:
            attention_mask = packed_mask(pos)
        return core(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def register(hf_config, attn_implementation: str, size: int, micro_batch_size: int, seq_len: int):
    """Registers Ulysses attention with transformers (before the model is built) and creates the SP groups;
    returns the ``mpu`` for ``deepspeed.initialize``.

    Raises:
        ValueError: (from DeepSpeed) an attention implementation it cannot wrap (``eager``).
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS[attn_implementation] = packed_attention(ALL_ATTENTION_FUNCTIONS[attn_implementation])
    hf_config._attn_implementation = attn_implementation
    return UlyssesSPAttentionHF.register_with_transformers(
        SimpleNamespace(config=hf_config), attn_implementation, size, micro_batch_size, seq_length=seq_len,
        seq_length_is_variable=False, disable_in_eval=True)


def problems(size: int, world: int, seq_len: int, hf_config=None,
             attn_implementation: str | None = None) -> list[str]:
    """Why ``train.sequence_parallel_size=size`` cannot run here (empty when it can); the model's heads and
    attention are checked when given (``hf_config``, ``attn_implementation``)."""
    if size <= 1:
        return []
    out = []
    if world % size:
        out.append(f"train.sequence_parallel_size {size} does not divide the world size {world}")
    if seq_len % size:
        out.append(f"train.sequence_parallel_size {size} does not divide seq_len {seq_len} (the data's)")
    if hf_config is not None:
        cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        heads = getattr(cfg, "num_attention_heads", None)
        if heads is None or heads % size:
            out.append(f"train.sequence_parallel_size {size} does not divide the model's {heads} attention heads")
    if attn_implementation == "eager":
        out.append("train.sequence_parallel_size > 1 needs model.attn_implementation sdpa or flash_attention_2/3 "
                   "(eager is chosen)")
    return out
