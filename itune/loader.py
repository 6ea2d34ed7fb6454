"""Deterministic, seekable loading of packed rows for data-parallel training.

The global order of rows depends only on (seed, epoch), never on the world size. Optimizer step ``s`` of an epoch
uses global positions ``[s*G, (s+1)*G)`` of that order, ``G = micro_batch_size x accumulation x world_size``.
Within a step, micro-batch ``m`` of rank ``r`` takes positions ``s*G + (m*world_size + r)*micro_batch_size`` onward.
Positions past the end of the epoch are filled with all-padding rows (labels -100), which carry no loss.
Loader state is ``(epoch, step_in_epoch)``: resuming seeks there directly; nothing is replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from itune.config import BatchPlan
from itune.data.render import IGNORE_INDEX


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation of row indices for one epoch; a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


@dataclass
class Batch:
    """One micro-batch for one rank.

    Attributes:
        input_ids, labels, position_ids: int64 tensors [micro_batch_size, seq_len]. labels are unshifted.
        row_ids: global row indices, -1 for all-padding filler rows.
        real_tokens: tokens of the batch that belong to examples (not padding).
        real_mask: bool [micro_batch_size, seq_len], True on tokens of examples (a row's examples come first,
            then its padding tail); None when not built.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    row_ids: list[int]
    real_tokens: int = 0
    real_mask: torch.Tensor | None = None


class PackedRows:
    """Random access to a prepared split (memory-mapped Arrow) as tensors."""

    def __init__(self, table, seq_len: int, pad_id: int):
        self.table = table
        self.seq_len = seq_len
        self.pad_id = pad_id
        self._cols = {k: table.column(k) for k in ("input_ids", "labels", "position_ids")}
        self._real = [sum(x) for x in table.column("example_lengths").to_pylist()]

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, row_ids: list[int]) -> Batch:
        """Rows as a batch; row id -1 gives a padding row (pad ids, labels -100, positions 0..seq_len-1)."""
        n = len(row_ids)
        out = {k: np.empty((n, self.seq_len), dtype=np.int64) for k in self._cols}
        for j, r in enumerate(row_ids):
            if r < 0:
                out["input_ids"][j] = self.pad_id
                out["labels"][j] = IGNORE_INDEX
                out["position_ids"][j] = np.arange(self.seq_len)
            else:
                for k, col in self._cols.items():
                    out[k][j] = col[int(r)].values.to_numpy()
        real = torch.tensor([self._real[r] if r >= 0 else 0 for r in row_ids])
        return Batch(torch.from_numpy(out["input_ids"]), torch.from_numpy(out["labels"]),
                     torch.from_numpy(out["position_ids"]), list(row_ids), int(real.sum()),
                     torch.arange(self.seq_len)[None, :] < real[:, None])


def step_row_ids(plan: BatchPlan, seed: int, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
    """Row ids of each micro-batch of ``rank`` for one optimizer step: [accumulation][micro_batch_size]."""
    order = epoch_order(plan.rows, seed, epoch)
    g = plan.global_rows_per_step
    base = step_in_epoch * g
    out = []
    for m in range(plan.gradient_accumulation_steps):
        start = base + (m * plan.world_size + rank) * plan.micro_batch_size
        out.append([int(order[p]) if p < plan.rows else -1 for p in range(start, start + plan.micro_batch_size)])
    return out
