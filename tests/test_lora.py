"""LoRA (model.lora, PEFT) under ZeRO-3 with gradient checkpointing, on a tied-embedding checkpoint (Qwen3):
adapter gradients on 2 ranks equal one process without DeepSpeed; the merged export and base + adapter give the same
logits; a preempted run resumes with the uninterrupted losses, on 2 ranks and on 1; the base stays frozen."""

import json
import shutil

import pytest
import torch

from itune.config import LoraSettings, load_config
from itune.data import shards
from itune.checkpoint import load_export
from itune.families import Isolation
from itune.loader import PackedRows
from itune.loss import aligned_targets, packed_loss_sum
from itune.model import apply_lora
from itune.train import EXIT_PREEMPTED
from tests.conftest import deepspeed_cmd, run_cmd
from tests.model_zoo import build_checkpoint

pytestmark = pytest.mark.distributed
FAMILY = "qwen3"  # tied input / output embeddings
LORA = ["model.lora.r=4", "model.lora.alpha=8", "model.architecture=null"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_checkpoint(FAMILY, tmp_path_factory.mktemp("lora") / FAMILY)


def test_config_and_refusals():
    cfg = load_config("configs/superni_tiny.yaml", ["model.lora.r=16", "model.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.model.lora == LoraSettings(r=16, target_modules=["q_proj", "v_proj"])
    assert load_config("configs/superni_tiny.yaml", []).model.lora is None


def test_lora_gradients_under_zero3_equal_one_process(tmp_path, base, superni_data):
    from transformers import AutoModelForCausalLM

    data = superni_data(256)
    f = tmp_path / "g.pt"
    run_cmd(deepspeed_cmd(2, "tests/scripts/grad_split.py", str(f), "--config", "configs/superni_tiny.yaml",
                          f"output_dir={tmp_path / 'run'}", f"data.path={data}", f"model.pretrained={base}", *LORA,
                          "train.micro_batch_size=2", "train.gradient_accumulation_steps=2",
                          "train.progress_bar=false"))
    got = torch.load(f, weights_only=True)
    assert got["grads"] and all(".lora_A." in n or ".lora_B." in n for n in got["grads"])  # the base is frozen
    # one process, no DeepSpeed: the same checkpoint, adapters, rows and loss (sum CE / trained tokens)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    model = apply_lora(model, LoraSettings(r=4, alpha=8), seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    manifest = shards.read_manifest(data)
    rows = PackedRows(shards.open_split(data, "train"), manifest["seq_len"], manifest["tokenizer"]["pad_id"])
    iso = Isolation(tuple(got["isolation"].split("+")), model.config.get_text_config())
    batches = [rows.rows(ids) for rank_rows in got["rows"] for ids in rank_rows]
    n = sum(int((aligned_targets(b.labels, b.position_ids) != -100).sum()) for b in batches)
    assert n == got["target_tokens"]
    loss = sum(packed_loss_sum(model, b.input_ids, b.position_ids, b.labels, iso, 1024) for b in batches) / n
    loss.backward()
    assert abs(float(loss) - got["loss"]) < 1e-5
    ref = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert ref.keys() == got["grads"].keys()
    for name, g in ref.items():
        assert g.abs().sum() > 0 or ".lora_A." in name, name  # B starts at 0, so A's first gradient is 0
        assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-7), name


def _merged_and_adapter_logits(export, base):
    """Token ids [1, 40] and the logits of the merged export and of ``base`` + the PEFT adapter in
    ``export/adapter`` on them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                             export / "adapter")
    ids = torch.randint(3, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ids, merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits


def _losses(run):
    return [json.loads(x) for x in (run / "losses.jsonl").read_text().splitlines()]


def test_export_resume_and_adapter(tmp_path, base, superni_data):
    from transformers import AutoModelForCausalLM

    from tests.test_resume import COMMON, STEPS, _preempt

    data = superni_data(256)
    args = [*COMMON, f"data.path={data}", f"model.pretrained={base}", *LORA]
    ref = tmp_path / "uninterrupted"
    out = run_cmd(deepspeed_cmd(2, "launcher/train.py", *args, f"output_dir={ref}", "checkpoint.export=true")).stdout
    assert "trainable (LoRA r=4)" in out
    summary = json.loads((ref / "train_summary.json").read_text())
    assert summary["model"]["tied_embeddings"] is True and 0 < summary["model"]["trainable_parameters"] < \
        summary["model"]["parameters"] / 10
    export = ref / "export"
    assert json.loads((export / "export_check.json").read_text())["abs_diff"] <= 1e-4
    adapter_cfg = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["base_model_name_or_path"] == str(base.resolve())
    ids, a, b = _merged_and_adapter_logits(export, base)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(input_ids=ids).logits
        via_eval = load_export(export / "adapter")(input_ids=ids).logits  # what itune-eval --model loads
    assert (a - b).abs().max() <= 1e-5 and (a - plain).abs().max() > 1e-4  # the adapter trained, and merges exactly
    assert (via_eval - a).abs().max() <= 1e-5
    # preempted and resumed: the uninterrupted losses
    run = tmp_path / "preempted"
    cmd = deepspeed_cmd(2, "launcher/train.py", *args, f"output_dir={run}")
    rc, out = _preempt(cmd, run)
    assert rc == EXIT_PREEMPTED, out[-3000:]
    assert 2 <= int((run / "checkpoints" / "latest").read_text().removeprefix("global_step")) < STEPS
    shutil.copytree(run, tmp_path / "one_rank")
    run_cmd(cmd)
    assert _losses(run) == _losses(ref)
    # the same checkpoint resumed on 1 rank (DeepSpeed's universal checkpoint, the same rows per step)
    one = tmp_path / "one_rank"
    out = run_cmd(deepspeed_cmd(1, "launcher/train.py", *args, f"output_dir={one}",
                                "train.gradient_accumulation_steps=4")).stdout
    assert "saved with 2 ranks, now 1" in out
    assert [x["step"] for x in _losses(one)] == [x["step"] for x in _losses(ref)]
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(_losses(one), _losses(ref)))


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory):
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("lora_moe") / "mixtral")


def test_lora_on_moe_gradients_with_the_router_aux_loss(tmp_path, moe_base, superni_data):
    """LoRA on a MoE checkpoint (Mixtral: fused expert weights, adapted through PEFT's parameter wrappers, and the
    router) under ZeRO-3 on 2 ranks: the adapters' gradients equal one process computing
    ``sum CE / N + c x sum_m (T_m / T) x aux_m`` on the same rows; the router aux loss is kept with LoRA."""
    from transformers import AutoModelForCausalLM

    from itune.config import BatchPlan
    from itune.families import router_aux
    from itune.loader import step_row_ids
    from itune.loss import count_targets, sum_cross_entropy

    data = superni_data(256)
    f = tmp_path / "g.pt"
    run_cmd(deepspeed_cmd(2, "tests/scripts/grad_split.py", str(f), f"model.pretrained={moe_base}", *LORA,
                          f"data.path={data}", f"output_dir={tmp_path / 'run'}", "train.micro_batch_size=1",
                          "train.progress_bar=false"))
    got = torch.load(f, weights_only=True)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(moe_base, dtype=torch.float32),
                       LoraSettings(r=4, alpha=8), seed=0)
    model.train()
    aux = router_aux(model)
    assert aux is not None and aux.coef == 0.02
    manifest = shards.read_manifest(data)
    rows = PackedRows(shards.open_split(data, "train"), manifest["seq_len"], manifest["tokenizer"]["pad_id"])
    plan = BatchPlan(len(rows), manifest["seq_len"], 1, 1, 2, 1, None)
    batches = [rows.rows(step_row_ids(plan, 0, 0, 0, r)[0]) for r in range(2)]
    n = sum(count_targets(b.labels, b.position_ids) for b in batches)
    t = sum(b.real_tokens for b in batches)
    objective, aux_value = 0.0, 0.0
    for b in batches:
        with aux.capture(model) as router_logits:
            logits = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
        a = aux.loss(router_logits, b.real_mask)
        objective = objective + sum_cross_entropy(logits, b.labels, b.position_ids) / n + aux.coef * (
            b.real_tokens / t) * a
        aux_value += float(a) * b.real_tokens / t
    objective.backward()
    assert abs(got["aux_loss"] - aux_value) < 1e-5
    ref = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert ref.keys() == got["grads"].keys()
    adapted = {name.split(".lora_")[0].split("layers.0.")[-1] for name in ref if "layers.0." in name}
    assert adapted == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate", "mlp.experts", "mlp.experts.base_layer"}  # experts' fused weights included
    for name, g in ref.items():
        assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-7), name
    assert any(float(got["grads"][k].abs().sum()) > 0 for k in got["grads"] if "experts" in k and "lora_B" in k)


def test_lora_on_moe_export_merges_exactly(tmp_path, moe_base, superni_data):
    """Trained LoRA on Mixtral under ZeRO-3: the verified merged export and base + PEFT adapter give the same
    logits, and the merge changed the experts' fused weights."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    out = run_cmd(deepspeed_cmd(2, "launcher/train.py", "--config", "configs/superni_tiny.yaml", *LORA,
                                f"model.pretrained={moe_base}", f"data.path={superni_data(256)}",
                                f"output_dir={run}", "train.max_steps=2", "train.progress_bar=false",
                                "optim.lr=1e-2")).stdout
    assert "trainable (LoRA r=4)" in out and "router aux loss x 0.02" in out
    losses = _losses(run)
    assert len(losses) == 2 and all(x["aux_loss"] > 0 for x in losses)
    export = run / "export"
    assert json.loads((export / "export_check.json").read_text())["abs_diff"] <= 1e-4
    record = json.loads((export / "itune_training.json").read_text())  # what itune-eval's contamination check reads
    assert record["step"] == 2 and json.loads((export / "adapter" / "itune_training.json").read_text()) == record
    _, a, b = _merged_and_adapter_logits(export, moe_base)
    assert (a - b).abs().max() <= 1e-5
    before, after = load_file(moe_base / "model.safetensors"), load_file(export / "model.safetensors")
    assert before.keys() == after.keys()  # the published layout: block_sparse_moe.experts.N.w1 / w2 / w3
    experts = [k for k in before if ".experts." in k]
    assert len(experts) == 2 * 4 * 3 and all(not torch.equal(before[k], after[k]) for k in experts)
