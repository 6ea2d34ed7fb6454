"""Every family of the zoo trains from its Hugging Face checkpoint through ``model.pretrained`` (world 1, one
process for all): the step-1 loss of a packed row equals its examples' loss computed one at a time by plain
transformers, the export reloads with ``from_pretrained`` (tied weights tied) and reproduces the engine's loss, or
the run is refused before training with the isolation message."""

import json
import sys

import pytest
import torch

from tests.conftest import MISTRAL, free_port, run_cmd
from tests.model_zoo import FAMILIES, TIED, build_checkpoint

pytestmark = pytest.mark.distributed

#: families that no isolation method separates on this CPU install (their kernels are CUDA packages)
REFUSED_ON_CPU = {"qwen3_5": ("qwen3_5_text", "flash-linear-attention"),
                  "granitemoehybrid": ("granitemoehybrid", "mamba-ssm")}
#: the isolation method the probe must choose (position_ids for every other family)
METHOD = {"gpt_oss": "mask_mapping"}

RECORDS = [
    {"prompt": "Translate the following sentence into French and explain each word you used: the cat sits on the "
               "mat by the door.", "completion": " Le chat est assis sur le tapis pres de la porte."},
    {"prompt": "List three prime numbers greater than twenty and say why each of them is prime.",
     "completion": " 23, 29 and 31: none has a divisor other than one and itself."},
    {"prompt": "Write one sentence about the sea.", "completion": " The sea was calm and grey under a low sky."},
]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    src = tmp / "three.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    data = tmp / "one_row"
    run_cmd(["itune-data", "prepare", "--input", str(src), "--tokenizer", str(MISTRAL), "--seq-len", "128",
             "--out", str(data)])
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 1  # exactly one packed row of 3 examples, each > the window 16
    zoo = tmp / "zoo"
    for fam in FAMILIES:
        build_checkpoint(fam, zoo / fam)
    out = tmp / "matrix.json"
    run_cmd([sys.executable, "tests/scripts/family_matrix.py", str(out), "--data", str(data), "--zoo", str(zoo),
             "--families", ",".join(FAMILIES), "optim.lr=1e-2", "optim.warmup_steps=0"],
            env={"MASTER_PORT": str(free_port())})
    return {"data": data, "zoo": zoo, "results": json.loads(out.read_text())}


def _row(data):
    from itune.data import shards

    t = shards.open_split(data, "train")
    return {k: torch.tensor(t.column(k)[0].as_py()) for k in ("input_ids", "labels", "position_ids",
                                                                 "example_lengths")}


def loss_one_at_a_time(model, row) -> tuple[float, int]:
    """Sum CE / trained tokens of the row's examples, each run alone (no packing, no position_ids given)."""
    total, count, start = 0.0, 0, 0
    with torch.no_grad():
        for n in row["example_lengths"].tolist():
            ids, labels = row["input_ids"][start:start + n], row["labels"][start:start + n]
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100,
                                                             reduction="sum"))
            count += int((labels[1:] != -100).sum())
            start += n
    return total / count, count


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_from_its_checkpoint(matrix, family):
    from transformers import AutoModelForCausalLM

    res = matrix["results"][family]
    if family in REFUSED_ON_CPU:
        model_type, package = REFUSED_ON_CPU[family]
        assert res["error"].startswith(f"ConfigError: {matrix['data']}: packed rows would let examples attend to "
                                       f"each other in this {model_type} model (attention sdpa, float32; ")
        assert package in res["error"] and "itune-data prepare --no-pack" in res["error"]
        assert not (matrix["zoo"] / "runs" / family / "losses.jsonl").exists()  # refused before training
        return
    assert "error" not in res, res
    row = _row(matrix["data"])
    ckpt = AutoModelForCausalLM.from_pretrained(matrix["zoo"] / family, dtype=torch.float32).eval()
    ref, count = loss_one_at_a_time(ckpt, row)
    assert count == json.loads((matrix["data"] / "manifest.json").read_text())["splits"]["train"]["trainable_tokens"]
    (step1,) = res["losses"]
    assert abs(step1["loss"] - ref) < 1e-5, (step1, ref)
    probe = res["summary"]["packed_isolation"]
    assert probe["method"] == METHOD.get(family, "position_ids") and probe["isolated"]
    assert probe["tried"][-1]["leak"] <= 1e-5
    # the export: from_pretrained, tied weights tied, the engine's loss reproduced one example at a time
    export = matrix["zoo"] / "runs" / family / "export"
    check = json.loads((export / "export_check.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert abs(loss_one_at_a_time(exported, row)[0] - check["engine_loss"]) < 1e-5
    assert abs(check["engine_loss"] - ref) > 1e-4  # the step changed the weights
    tied = family in TIED
    assert check["tied_embeddings"] == tied == res["summary"]["model"]["tied_embeddings"]
    assert (exported.get_output_embeddings().weight is exported.get_input_embeddings().weight) == tied
    from safetensors import safe_open

    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied) or family == "gpt_neox"
        exported_names = set(f.keys())
    with safe_open(str(matrix["zoo"] / family / "model.safetensors"), "pt") as f:
        assert exported_names == set(f.keys())  # the published layout (Mixtral's per-expert w1/w2/w3, ...)


def test_moe_families_log_their_router_aux_loss(matrix):
    for family in ("mixtral", "qwen3_moe", "gpt_oss", "qwen2_moe", "olmoe"):
        res = matrix["results"][family]
        (step1,) = res["losses"]
        info = res["summary"]["model"]
        assert info["router_aux_loss_coef"] > 0 and step1["aux_loss"] > 0, family
        assert info["zero3_leaf_modules"], family
    assert "aux_loss" not in matrix["results"]["llama3"]["losses"][0]


@pytest.mark.parametrize("family", ["granite", "llama3"])
def test_first_update_equals_a_plain_pytorch_step(matrix, family):
    """Granite's loss moves slowly from a random init: its ``logits_scaling`` (8 in released configs) divides the
    logits, so an update of the same size moves them 8x less (and ``embedding_multiplier`` 12 with
    ``residual_multiplier`` 0.22 let the embedding dominate). itune is not the cause: its first update equals
    plain PyTorch's (AdamW, lr 1e-2, betas 0.9/0.95, clipping 1.0, sum CE / N) on the same row."""
    from transformers import AutoModelForCausalLM

    from itune.loss import count_targets, sum_cross_entropy
    from itune.model import param_groups

    row = _row(matrix["data"])
    model = AutoModelForCausalLM.from_pretrained(matrix["zoo"] / family, dtype=torch.float32)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ids, labels, pos = row["input_ids"][None], row["labels"][None], row["position_ids"][None]
    loss = sum_cross_entropy(model(input_ids=ids, position_ids=pos, use_cache=False).logits, labels, pos)
    (loss / count_targets(labels, pos)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    after, _ = loss_one_at_a_time(model.eval(), row)
    check = json.loads((matrix["zoo"] / "runs" / family / "export" / "export_check.json").read_text())
    assert abs(after - check["engine_loss"]) < 2e-5
    drop = matrix["results"][family]["losses"][0]["loss"] - after
    if family == "granite":
        assert 0 < drop < 0.1  # slow, as the multipliers make it
    else:
        assert drop > 0.3
