"""Examples packed in one row never see each other: logits and per-token losses equal the unpacked ones."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from itune.data.pack import position_ids_for
from itune.loss import per_token_losses, shifted_targets, sum_cross_entropy


def _model(attn):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_in_packed_row_equal_logits_alone(attn):
    model = _model(attn)
    a = torch.randint(3, 97, (7,))
    b = torch.randint(3, 97, (5,))
    row = torch.cat([a, b, torch.zeros(4, dtype=torch.long)])[None]
    pos = torch.tensor(position_ids_for([7, 5], 16))[None]
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=pos, use_cache=False).logits[0]
        alone_a = model(input_ids=a[None], use_cache=False).logits[0]
        alone_b = model(input_ids=b[None], use_cache=False).logits[0]
    assert torch.allclose(packed[:7], alone_a, atol=1e-5)
    assert torch.allclose(packed[7:12], alone_b, atol=1e-5)


def test_per_token_losses_packed_equal_unpacked():
    model = _model("sdpa")
    a, b = torch.randint(3, 97, (6,)), torch.randint(3, 97, (4,))
    la = torch.tensor([-100, -100, -100, int(a[3]), int(a[4]), int(a[5])])
    lb = torch.tensor([-100, -100, int(b[2]), int(b[3])])
    row = torch.cat([a, b, torch.zeros(2, dtype=torch.long)])[None]
    labels = torch.cat([la, lb, torch.full((2,), -100)])[None]
    pos = torch.tensor(position_ids_for([6, 4], 12))[None]
    with torch.no_grad():
        packed = per_token_losses(model(input_ids=row, position_ids=pos, use_cache=False).logits, labels, pos)[0]
        ua = per_token_losses(model(input_ids=a[None], use_cache=False).logits, la[None],
                              torch.arange(6)[None])[0]
        ub = per_token_losses(model(input_ids=b[None], use_cache=False).logits, lb[None],
                              torch.arange(4)[None])[0]
    assert torch.allclose(packed[:5], ua, atol=1e-5)
    assert packed[5] == 0  # the last token of a never predicts the first token of b
    assert torch.allclose(packed[6:9], ub, atol=1e-5)
    assert torch.all(packed[9:] == 0)


def test_shifted_targets_mask_example_boundaries():
    labels = torch.tensor([[-100, 5, 6, 9, -100, 7, -100]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 0]])
    # target i = label i+1, except where position i+1 starts an example (index 3 and 6)
    assert shifted_targets(labels, pos).tolist() == [[5, 6, -100, -100, 7, -100]]


def test_sum_cross_entropy_counts_only_targets():
    logits = torch.zeros(1, 4, 10)
    labels = torch.tensor([[-100, 3, -100, 4]])
    pos = torch.arange(4)[None]
    assert abs(float(sum_cross_entropy(logits, labels, pos)) - 2 * math.log(10)) < 1e-5
