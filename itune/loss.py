"""Token cross-entropy normalised by the global count of trained tokens of the optimizer step.

loss_step = sum over every trained token of the step (all micro-batches, all ranks) of CE / N_step,
N_step = global count of those tokens. (The fix for per-micro-batch means: transformers PR #34191,
torchtune PR #1875.) DeepSpeed divides the backward loss by the accumulation steps and averages gradients over
data-parallel ranks, so each micro-batch backpropagates ``sum_CE x accumulation x world_size / N_step``.
"""

from __future__ import annotations

import importlib.util
import inspect

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


def aligned_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """:func:`shifted_targets` padded with one -100 at the end: [batch, seq_len], ``targets[:, i]`` is what the
    logits at position i predict (so a row split along the sequence keeps each target with its position)."""
    return F.pad(shifted_targets(labels, position_ids), (0, 1), value=IGNORE_INDEX)


def count_targets(labels: torch.Tensor, position_ids: torch.Tensor, sp=None) -> int:
    """Number of trained tokens (targets != -100) in a micro-batch; with sequence parallelism
    (:class:`itune.sequence_parallel.SequenceParallel`), in this rank's shard of it."""
    t = aligned_targets(labels, position_ids)
    return int(((sp.shard(t) if sp is not None else t) != IGNORE_INDEX).sum())


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


# ---------------------------------------------------------------------------------------------------------------
# Tiled loss: the cross-entropy over sequence tiles of the final hidden states, never the full-sequence logits
# ---------------------------------------------------------------------------------------------------------------

#: Config attributes of families whose logits are not plain ``lm_head(hidden)``, applied per tile as their
#: ``forward`` does: Gemma 2/3 soft-cap (``tanh(x / c) * c``), Granite divides by ``logits_scaling``, Cohere
#: multiplies by ``logit_scale``. Any other difference is caught by :func:`check_tiled_loss` on the loaded model.
def output_logits(model, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits for ``hidden`` ([..., hidden] -> [..., vocab]): ``lm_head`` (or ``weight``, its gathered
    weight) and the family's scaling (see above)."""
    logits = model.get_output_embeddings()(hidden) if weight is None else F.linear(hidden, weight)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class _TiledCrossEntropy(torch.autograd.Function):
    """Summed fp32 cross-entropy of ``hidden`` [n, hidden] against ``targets`` [n] through ``weight`` [vocab,
    hidden], ``tile`` rows at a time, keeping no logits: the backward pass recomputes each tile's logits and
    returns the gradients of ``hidden`` and ``weight`` (accumulated over tiles in fp32), so autograd adds the
    weight's gradient to its other uses (a tied input embedding) before the weight's own gradient hook runs."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, tile, logits_fn):
        ctx.save_for_backward(hidden, weight, targets)
        ctx.tile, ctx.logits_fn = tile, logits_fn
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], tile):
            logits = logits_fn(hidden[i:i + tile], weight).float()
            total += F.cross_entropy(logits, targets[i:i + tile], ignore_index=IGNORE_INDEX, reduction="sum")
        return total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        w = weight.detach().requires_grad_()
        for i in range(0, hidden.shape[0], ctx.tile):
            h = hidden[i:i + ctx.tile].detach().requires_grad_()
            with torch.enable_grad():
                loss = F.cross_entropy(ctx.logits_fn(h, w).float(), targets[i:i + ctx.tile],
                                       ignore_index=IGNORE_INDEX, reduction="sum")
                gh, gw = torch.autograd.grad(loss, (h, w), grad_out)
            grad_hidden[i:i + ctx.tile] = gh
            grad_weight += gw
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


class HiddenCapture:
    """Context manager: a forward hook on the model's decoder (``get_decoder()``) keeps its output
    ``last_hidden_state`` [batch, tokens, hidden] (after the final norm), part of the autograd graph."""

    def __init__(self, model):
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if self.decoder is None or self.decoder is model:
            raise TypeError(f"{type(model).__name__} has no separate decoder (get_decoder())")
        self.hidden: list = []

    def __enter__(self):
        def hook(module, args, output):
            h = getattr(output, "last_hidden_state", None)
            self.hidden.append(h if h is not None else output[0])

        self.handle = self.decoder.register_forward_hook(hook)
        return self.hidden

    def __exit__(self, *exc):
        self.handle.remove()
        return False


#: the kernels of the tiled loss: itune's (:class:`_TiledCrossEntropy`, any device) and Liger's fused linear
#: cross-entropy (``liger_kernel``, Triton: CUDA only; ``train.liger_loss``)
LOSS_KERNELS = ("itune", "liger")


def liger_loss_problems(liger_loss: bool, tiled_loss: bool, cuda: bool, find_spec=importlib.util.find_spec) -> list:
    """Why ``train.liger_loss`` cannot run here (empty when it can or is off): it replaces the tiled loss, so
    needs ``train.tiled_loss``; its Triton kernels need CUDA; it needs the ``liger-kernel`` package."""
    if not liger_loss:
        return []
    e = []
    if not tiled_loss:
        e.append("train.liger_loss: Liger's fused linear cross-entropy replaces the tiled loss; set "
                 "train.tiled_loss=true (or remove train.liger_loss)")
    if not cuda:
        e.append("train.liger_loss: Liger's fused linear cross-entropy runs Triton kernels on CUDA and this machine "
                 "has no CUDA device; remove train.liger_loss (itune's tiled loss, the default, runs anywhere)")
    elif find_spec("liger_kernel") is None:
        e.append("train.liger_loss: needs the liger-kernel package (pip install liger-kernel)")
    return e


def _liger_forward(model, head, t: torch.Tensor):
    """``lm_head``'s forward computing Liger's fused linear cross-entropy (sum over ``t``), or TypeError for a
    family whose logits Liger cannot reproduce (Granite's ``logits_scaling``, Cohere's ``logit_scale``)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(cfg, "logit_scale", None)
    if getattr(cfg, "logits_scaling", None) not in (None, 1) or (
            isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1):
        raise TypeError("Liger's fused loss has no logits scaling (logits_scaling / logit_scale)")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as flce

    kw = dict(ignore_index=IGNORE_INDEX, reduction="sum", softcap=getattr(cfg, "final_logit_softcapping", None) or None)
    if "accum_dtype" in inspect.signature(flce).parameters:
        kw["accum_dtype"] = torch.float32  # the weight gradient accumulated in fp32 over the chunks, as itune's

    def forward(x):
        return flce(x.contiguous(), head.weight, t, **kw).float()

    return forward


def tiled_sum_cross_entropy(model, hidden: torch.Tensor, targets: torch.Tensor, tile_tokens: int,
                            kernel: str = "itune") -> torch.Tensor:
    """The summed cross-entropy of ``targets`` from the final hidden states, over tiles of ``tile_tokens``
    positions (the ALST paper's tiled loss, arXiv 2506.13996).

    Only the trained positions are computed: their hidden states are gathered ([n, hidden], n = trained
    targets), then :class:`_TiledCrossEntropy` runs ``lm_head`` + fp32 cross-entropy over tiles without keeping
    logits, and recomputes them one tile at a time in the backward pass: at most one tile of logits ([tile_tokens,
    vocab] fp32) lives at once instead of the sequence's. It runs as the ``lm_head`` module's forward, so ZeRO-3
    gathers the weight for it (and again before its backward) as for a plain ``nn.Linear``, and the weight's
    gradient leaves it through autograd, summed with a tied input embedding's before ZeRO-3 reduces it.
    (DeepSpeed's ``sequence_tiled_compute`` / ``TiledFusedLogitsLoss`` call ``backward`` inside their backward
    instead: with a tied embedding under ZeRO-3 the ``lm_head`` part of the gradient was then lost, measured, and a
    scaling applied to ``TiledFusedLogitsLoss``'s output misses the weight's gradient.)

    Args:
        hidden: [batch, seq, hidden] final hidden states (the decoder's output).
        targets: [batch, seq] int64, what each position predicts (:func:`aligned_targets`), -100 where nothing.
        tile_tokens: positions per tile (>= 1).
        kernel: ``itune`` (above) or ``liger``: Liger's ``liger_fused_linear_cross_entropy`` (reduction ``sum``,
            Gemma's soft-cap passed on; it chunks the positions itself and computes the gradients in its
            forward), run as ``lm_head``'s forward in the same way.

    Returns:
        a scalar: the summed cross-entropy of the trained targets.

    Raises:
        TypeError: an ``lm_head`` with a bias; for ``liger``, a family with logits scaling.
    """
    head = model.get_output_embeddings()
    flat = targets.reshape(-1)
    keep = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    t = flat.index_select(0, keep)

    def logits_fn(x, w):
        return output_logits(model, x, w)

    def tiled_forward(x):  # lm_head's forward for this call: ZeRO-3's module hooks gather its weight around it
        return _TiledCrossEntropy.apply(x, head.weight, t, tile_tokens, logits_fn)

    if getattr(head, "bias", None) is not None:
        raise TypeError("an lm_head with a bias")
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"unknown loss kernel {kernel!r}; choose one of {LOSS_KERNELS}")
    head.forward = tiled_forward if kernel == "itune" else _liger_forward(model, head, t)
    try:
        return head(h)
    finally:
        del head.forward


def packed_loss_sum(model, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, isolation,
                    tile_tokens: int | None = None, sp=None, kernel: str = "itune") -> torch.Tensor:
    """Summed cross-entropy of a packed micro-batch ([batch, seq_len] inputs) through ``model`` (a DeepSpeed
    engine or a Hugging Face causal LM) with the isolation method's arguments.

    ``tile_tokens``: tiled (:func:`tiled_sum_cross_entropy`; the model computes the logits of the last position
    only, ``logits_to_keep=1``, and the decoder's output is taken by :class:`HiddenCapture`); None: from the full
    logits. ``sp`` (:class:`itune.sequence_parallel.SequenceParallel`): the targets are shifted on the whole rows,
    then this rank's shard of inputs, positions and targets goes through the model: the sum over the SP group is
    the rows' sum. ``kernel``: the tiled loss's kernel (:data:`LOSS_KERNELS`).
    """
    from itune.families import forward_packed

    targets = aligned_targets(labels, position_ids)
    if sp is not None:
        input_ids, position_ids, targets = sp.shard(input_ids), sp.shard(position_ids), sp.shard(targets)
    if not tile_tokens:
        logits = forward_packed(model, input_ids, position_ids, isolation).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    module = getattr(model, "module", model)
    with HiddenCapture(module) as got:
        forward_packed(model, input_ids, position_ids, isolation, logits_to_keep=1)
    hidden = got[-1].reshape(*input_ids.shape, -1)  # a flattened batch (varlen isolation) back to [batch, seq]
    return tiled_sum_cross_entropy(module, hidden, targets, tile_tokens, kernel)


def check_tiled_loss(model, isolation, vocab: int, tile_tokens: int, tol: float = 1e-4,
                     kernel: str = "itune") -> str | None:
    """Proves the tiled loss (with ``kernel``) on the loaded model: the summed cross-entropy of a probe row of 3
    packed examples ([1, 56] tokens, tiles of 16 so that it spans 4) through :func:`packed_loss_sum` tiled and from
    the full logits must agree within ``tol`` relative. Runs on every rank (under ZeRO-3 every rank must).

    Returns:
        None when they agree, else why not (the model has no separate decoder, does not take ``logits_to_keep``,
        or computes its logits otherwise than :func:`output_logits`): the caller falls back to the full logits.
    """
    from itune.families import probe_rows

    row, _, position_ids, _ = probe_rows(vocab)
    labels = row.clone()
    try:
        with torch.no_grad():
            full = float(packed_loss_sum(model, row, position_ids, labels, isolation, None))
            tiled = float(packed_loss_sum(model, row, position_ids, labels, isolation, min(16, tile_tokens),
                                          kernel=kernel))
    except (TypeError, ValueError, AttributeError, ImportError) as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    if not abs(tiled - full) <= tol * max(1.0, abs(full)):
        return f"tiled {tiled:.6f} vs full logits {full:.6f} on a probe row"
    return None
