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
