"""Batched, left-padded greedy generation that is safe under ZeRO-3 on any number of ranks.

Instances are split across ranks (rank ``r`` takes instances ``r, r + world, ...``); every rank runs the same
number of ``generate`` calls (a rank with fewer instances repeats a dummy batch and discards it) and each call uses
``synced_gpus`` under ZeRO-3, so no rank waits forever for a gather from a rank that has finished. Predictions are
gathered back in the original order.

Positions come from the attention mask (HF ``generate`` with left padding), so batched output equals unbatched
output (transformers #26569).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist


def _is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads prompts.

    Returns:
        input_ids [batch, max_len] int64 and attention_mask [batch, max_len] (0 on padding).
    """
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p):] = 1
    return ids, mask


def generate_all(model, prompts: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int = 64,
                 min_new_tokens: int = 0, batch_size: int = 8, synced_gpus: bool = False, do_sample: bool = False,
                 temperature: float = 1.0, seed: int = 0) -> list[list[int]]:
    """Generates a continuation for every prompt (on every rank, when distributed).

    Args:
        model: a causal LM (plain module, or the module of a ZeRO-3 engine).
        prompts: token ids of every prompt, the same list on every rank.
        min_new_tokens: EOS is suppressed before this many tokens (0: never).
        synced_gpus: True under ZeRO-3 (every rank keeps stepping until all are done).

    Returns:
        Generated ids per prompt (prompt excluded, cut after the first EOS), identical on every rank.
    """
    rank = tdist.get_rank() if _is_dist() else 0
    world = tdist.get_world_size() if _is_dist() else 1
    mine = list(range(rank, len(prompts), world))
    # longest first within a rank: less padding, and the first batch shows memory problems early
    mine.sort(key=lambda i: -len(prompts[i]))
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    counts = [len(batches)]
    if world > 1:
        t = torch.tensor(counts)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        counts = [int(t.item())]
    device = next(model.parameters()).device
    out: dict[int, list[int]] = {}
    torch.manual_seed(seed + rank)
    model.eval()
    for b in range(counts[0]):
        idx = batches[b] if b < len(batches) else [0]  # dummy batch keeps collectives in step
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
                                 do_sample=do_sample,
                                 temperature=temperature if do_sample else None, top_p=None, top_k=None,
                                 eos_token_id=eos_id, pad_token_id=pad_id, synced_gpus=synced_gpus,
                                 use_cache=True)
        if b >= len(batches):
            continue
        for row, i in zip(gen[:, ids.shape[1]:].tolist(), idx):
            out[i] = row[: row.index(eos_id) + 1] if eos_id in row else row
    if world > 1:
        gathered: list = [None] * world
        tdist.all_gather_object(gathered, out)
        for g in gathered:
            out.update(g)
    return [out[i] for i in range(len(prompts))]
