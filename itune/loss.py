"""Token cross-entropy normalised by the global count of trained tokens of the optimizer step.

loss_step = sum over every trained token of the step (all micro-batches, all ranks) of CE / N_step,
N_step = global count of those tokens. (The fix for per-micro-batch means: transformers PR #34191,
torchtune PR #1875.) DeepSpeed divides the backward loss by the accumulation steps and averages gradients over
data-parallel ranks, so each micro-batch backpropagates ``sum_CE x accumulation x world_size / N_step``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from itune.data.render import IGNORE_INDEX


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Targets aligned with logits: ``targets[:, i] = labels[:, i + 1]``, -100 where position i+1 starts an example.

    Args:
        labels: [batch, seq_len] unshifted labels.
        position_ids: [batch, seq_len]; 0 marks the first token of an example (or of the padding tail).

    Returns:
        [batch, seq_len - 1] int64 targets.
    """
    t = labels[:, 1:].clone()
    t[position_ids[:, 1:] == 0] = IGNORE_INDEX  # never predict across an example boundary
    return t


def count_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> int:
    """Number of trained tokens (targets != -100) in a micro-batch."""
    return int((shifted_targets(labels, position_ids) != IGNORE_INDEX).sum())


def sum_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies (fp32) over the trained targets.

    Args:
        logits: [batch, seq_len, vocab].
    """
    targets = shifted_targets(labels, position_ids)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position [batch, seq_len - 1]; 0 where not trained."""
    targets = shifted_targets(labels, position_ids)
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                           reduction="none")
