"""The tiled loss (train.tiled_loss, on by default) equals the cross-entropy of the full logits: loss and every
gradient, on packed rows, for plain, tied, soft-capped (Gemma 2), scaled (Granite) and MoE families, with tiles
that cut examples anywhere; a model whose logits it cannot reproduce is detected on the loaded model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from itune.families import Isolation
from itune.loss import check_tiled_loss, output_logits, packed_loss_sum
from tests.model_zoo import FAMILIES

ISO = Isolation(("position_ids",))
FAMILY_NAMES = ["llama3", "llama3_tied", "gemma2", "granite", "mixtral"]


def _model(name):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[name].make_config(), dtype=torch.float32,
                                            attn_implementation="eager").train()


def _batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 40), generator=g)
    # row 0: examples of 13, 19 and 8 tokens; row 1: 25 tokens then 15 of padding (position 0 restarts)
    pos = torch.cat([torch.cat([torch.arange(13), torch.arange(19), torch.arange(8)])[None],
                     torch.cat([torch.arange(25), torch.arange(15)])[None]])
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, 25:] = -100  # the padding
    return ids, pos, labels


def _loss_and_grads(model, batch, tile):
    model.zero_grad(set_to_none=True)
    loss = packed_loss_sum(model, *batch[:2], batch[2], ISO, tile)
    (loss * 0.37).backward()  # a scaling outside the tiled function must reach every gradient, lm_head's included
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tiled_equals_full_logits(name):
    model = _model(name)
    batch = _batch(model.config.vocab_size)
    full, g_full = _loss_and_grads(model, batch, None)
    for tile in (1, 17):  # one position per tile; tiles that cut examples (40 positions: 3 tiles)
        tiled, g_tiled = _loss_and_grads(model, batch, tile)
        assert abs(tiled - full) <= 1e-6 * abs(full), (name, tile)
        assert g_tiled.keys() == g_full.keys() and "model.embed_tokens.weight" in g_full
        for n, g in g_full.items():
            assert (g_tiled[n] - g).abs().max() <= 1e-5 * g.abs().max(), (name, tile, n)  # summation order only
    assert check_tiled_loss(model, ISO, model.config.vocab_size, 1024) is None


def test_family_logit_transforms_are_applied():
    for name, attr in (("gemma2", "final_logit_softcapping"), ("granite", "logits_scaling")):
        model = _model(name)
        assert getattr(model.config, attr)
        h = torch.randn(1, 3, model.config.hidden_size)
        plain = model.get_output_embeddings()(h)
        assert not torch.allclose(output_logits(model, h), plain)  # the transform matters for these families


def test_a_model_with_other_logits_falls_back(monkeypatch):
    model = _model("llama3")
    lm_head = model.lm_head

    class Doubled(torch.nn.Module):  # a family whose forward scales its logits in a way output_logits does not know
        def forward(self, x):
            return lm_head(x) * 2

    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: lm_head)
    model.lm_head = Doubled()
    why = check_tiled_loss(model, ISO, model.config.vocab_size, 1024)
    assert why is not None and why.startswith("tiled ") and "vs full logits" in why


def test_tiled_mlp_equals_the_plain_mlp():
    from itune.model import apply_tiled_mlp

    model = _model("llama3")
    ids = torch.randint(3, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(2))
    batch = (ids, torch.arange(200)[None], ids.clone())
    plain, g_plain = _loss_and_grads(model, batch, None)
    assert apply_tiled_mlp(model) == model.config.num_hidden_layers  # ceil(200 / hidden 64) = 4 tiles per call
    tiled, g_tiled = _loss_and_grads(model, batch, None)
    assert abs(tiled - plain) <= 1e-6 * abs(plain)
    for n, g in g_plain.items():
        assert (g_tiled[n] - g).abs().max() <= 1e-5 * g.abs().max(), n
    assert apply_tiled_mlp(_model("gpt_neox")) == 0  # no gated MLP: the trainer refuses model.tiled_mlp there


class _StandInLiger:
    """A plain-PyTorch stand-in for ``liger_kernel.transformers.functional`` (Liger's Triton kernels need CUDA):
    ``liger_fused_linear_cross_entropy`` with Liger's signature, recording how it is called."""

    def __init__(self):
        self.calls = []

    def liger_fused_linear_cross_entropy(self, input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
                                         lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                                         return_z_loss=False, accum_dtype=None, use_token_scaling=False,
                                         return_token_accuracy=False):
        self.calls.append(dict(shape=tuple(input.shape), weight=weight, ignore_index=ignore_index,
                               reduction=reduction, softcap=softcap, accum_dtype=accum_dtype))
        logits = torch.nn.functional.linear(input, weight).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


@pytest.fixture
def stand_in_liger(monkeypatch):
    import sys
    import types

    fake = _StandInLiger()
    module = types.ModuleType("liger_kernel.transformers.functional")
    module.liger_fused_linear_cross_entropy = fake.liger_fused_linear_cross_entropy
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", module)
    return fake


def test_liger_loss_refused_where_it_cannot_run():
    from itune.loss import liger_loss_problems

    assert liger_loss_problems(False, True, cuda=False) == []
    assert liger_loss_problems(True, False, cuda=False) == [
        "train.liger_loss: Liger's fused linear cross-entropy replaces the tiled loss; set train.tiled_loss=true (or "
        "remove train.liger_loss)",
        "train.liger_loss: Liger's fused linear cross-entropy runs Triton kernels on CUDA and this machine has no CUDA "
        "device; remove train.liger_loss (itune's tiled loss, the default, runs anywhere)"]
    assert liger_loss_problems(True, True, cuda=True, find_spec=lambda n: None) == [
        "train.liger_loss: needs the liger-kernel package (pip install liger-kernel)"]
    assert liger_loss_problems(True, True, cuda=True, find_spec=lambda n: object()) == []
    from itune.config import load_config
    from itune.model import check_model_config

    problems = check_model_config(load_config("configs/superni_tiny.yaml", ["train.liger_loss=true"]))
    assert [p for p in problems if "liger" in p] == ([] if torch.cuda.is_available() else [
        "train.liger_loss: Liger's fused linear cross-entropy runs Triton kernels on CUDA and this machine has no CUDA "
        "device; remove train.liger_loss (itune's tiled loss, the default, runs anywhere)"])


@pytest.mark.parametrize("name", ["gemma2", "llama3_tied"])
def test_liger_kernel_is_called_as_lm_head_with_the_soft_cap(name, stand_in_liger):
    """The Liger path's wiring, with a stand-in kernel: one call per micro-batch on the trained positions only,
    reduction sum, the family's soft-cap, fp32 accumulation, the lm_head weight (the tied embedding itself); loss
    and gradients equal the full logits'."""
    model = _model(name)
    batch = _batch(model.config.vocab_size)
    full, g_full = _loss_and_grads(model, batch, None)
    model.zero_grad(set_to_none=True)
    loss = packed_loss_sum(model, *batch[:2], batch[2], ISO, 1024, kernel="liger")
    (loss * 0.37).backward()
    [call] = stand_in_liger.calls
    from itune.loss import count_targets

    assert call["shape"] == (count_targets(batch[2], batch[1]), model.config.hidden_size) == (57, 64)
    assert (call["ignore_index"], call["reduction"], call["accum_dtype"]) == (-100, "sum", torch.float32)
    assert call["softcap"] == getattr(model.config, "final_logit_softcapping", None)
    assert call["weight"] is model.get_output_embeddings().weight
    assert abs(float(loss) - full) <= 1e-6 * abs(full)
    for n, g in g_full.items():
        got = dict(model.named_parameters())[n].grad
        assert (got - g).abs().max() <= 1e-5 * g.abs().max(), n


def test_choose_loss_proves_liger_and_falls_back(stand_in_liger):
    from itune.train import choose_loss

    llama = _model("llama3")
    assert choose_loss(llama, ISO, llama.config.vocab_size, 512, liger=True) == (
        512, "liger", ["loss: tiled, Liger's fused linear cross-entropy (train.liger_loss)"])
    granite = _model("granite")  # logits divided by logits_scaling: Liger has no such option
    assert choose_loss(granite, ISO, granite.config.vocab_size, 512, liger=True) == (512, "itune", [
        "loss: Liger's fused linear cross-entropy does not fit this model (TypeError: Liger's fused loss has no "
        "logits scaling (logits_scaling / logit_scale)); using itune's tiled loss",
        "loss: tiled, 512 positions per tile (train.loss_tile_tokens)"])
    assert choose_loss(llama, ISO, llama.config.vocab_size, 512, liger=False)[1] == "itune"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Liger's Triton kernels)")
@pytest.mark.parametrize("name", ["llama3_tied", "gemma2"])
def test_liger_kernel_equals_full_logits_on_cuda(name):
    pytest.importorskip("liger_kernel", reason="needs a CUDA GPU with liger-kernel installed")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[name].make_config(), dtype=torch.float32,
                                            attn_implementation="eager").cuda().train()
    batch = tuple(x.cuda() for x in _batch(model.config.vocab_size))
    full, g_full = _loss_and_grads(model, batch, None)
    model.zero_grad(set_to_none=True)
    loss = packed_loss_sum(model, *batch[:2], batch[2], ISO, 1024, kernel="liger")
    (loss * 0.37).backward()
    assert abs(float(loss) - full) <= 1e-5 * abs(full)
    for n, g in g_full.items():
        got = dict(model.named_parameters())[n].grad
        assert (got - g).abs().max() <= 1e-4 * g.abs().max(), n
