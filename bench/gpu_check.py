"""GPU validation in one run: CPU/GPU parity, bf16 ZeRO-3 throughput and MFU, and memory with offload.

    bash bench/gpu_check.sh            # on the GPU machine (writes a table and logs under $OUT or runs/gpu_check)
    bash bench/gpu_check.sh --dry-run  # here, on CPU: the same steps with a tiny model and 2 steps each

Steps (each a subprocess through the real launcher, results read from the run's metrics.jsonl):
1. parity: the tiny CPU test config (configs/superni_tiny.yaml), first 5 optimizer steps, on the GPU in fp32
   (losses vs the CPU reference in bench/cpu_reference_losses.json, tolerance 1e-4) and in bf16 (2e-2).
2. throughput: a ~1B-parameter Llama from config (random init), bf16, ZeRO-3, packed rows of seq_len tokens,
   gradient checkpointing on and off; real tokens/s, step time, peak memory, and
   MFU = flops_per_token x real tokens/s / peak FLOP/s, with flops_per_token = 6 N + 12 L h s (itune.model,
   PaLM appendix B) and peak 989e12 (dense bf16, H100/H200 SXM). A plain PyTorch bf16 loop (no DeepSpeed) on
   the same model and rows gives the framework-overhead ratio.
3. memory: the same model with ds_configs/zero3_offload.json (optimizer and parameters on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 8, "max_position_embeddings": 8192}
MODEL_TINY = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}
PEAK = 989e12


def launcher(nproc: int) -> list[str]:
    """The deepspeed launcher on a port free now (another job's rendezvous on 29500 must not stop the check)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port)]


def train(out: Path, log: Path, data: str, overrides: list[str], nproc: int = 1) -> list[dict]:
    cmd = launcher(nproc) + ["launcher/train.py", "--config", "configs/superni_tiny.yaml", f"output_dir={out}",
                             f"data.path={data}", "checkpoint.export=false", "train.progress_bar=false",
                             "checkpoint.resume=false", *overrides]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; see {log}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"]


def plain_loop(data: str, arch: dict, steps: int, micro: int) -> dict:
    """Plain PyTorch bf16 training loop over the same packed rows (no DeepSpeed): real tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from itune.data import shards
    from itune.loader import PackedRows
    from itune.loss import count_targets, sum_cross_entropy

    m = shards.read_manifest(data)
    rows = PackedRows(shards.open_split(data, "train"), m["seq_len"], m["tokenizer"]["pad_id"])
    cfg = LlamaConfig(vocab_size=m["tokenizer"]["vocab_size"], use_cache=False, **arch)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    tokens, t_total = 0, 0.0
    for step in range(steps + 1):  # step 0 warms up and is not timed
        b = rows.rows([(step * micro + j) % len(rows) for j in range(micro)])
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        logits = model(input_ids=b.input_ids.to(dev), position_ids=b.position_ids.to(dev), use_cache=False).logits
        loss = sum_cross_entropy(logits, b.labels.to(dev), b.position_ids.to(dev)) / max(
            1, count_targets(b.labels, b.position_ids))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        if step:
            t_total += time.time() - t0
            tokens += b.real_tokens
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    return {"real_tokens_per_s": tokens / t_total, "memory_gb": mem}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, help="prepared data (seq_len 4096 on the GPU)")
    p.add_argument("--cpu-reference", default=str(ROOT / "bench" / "cpu_reference_losses.json"))
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    p.add_argument("--dry-run", action="store_true", help="tiny model, 2 steps each, on CPU")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro", type=int, default=4, help="rows per micro-batch for the 1B runs")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = MODEL_TINY if a.dry_run else MODEL_1B
    steps = 2 if a.dry_run else a.steps
    table = []

    # 1. parity
    ref = json.loads(Path(a.cpu_reference).read_text())
    parity_data = ref["data"] if not a.dry_run else a.data
    for dtype, tol in (("fp32", 1e-4), ("bf16", 2e-2)):
        if a.dry_run and dtype == "bf16":
            continue
        got = train(out / f"parity_{dtype}", out / f"parity_{dtype}.log", parity_data,
                    ["train.max_steps=5", f"model.dtype={dtype}", "train.epochs=1"], nproc=ref["world_size"])
        diffs = [abs(g["loss"] - r) for g, r in zip(got, ref["losses"])]
        table.append({"check": f"parity {dtype}", "max_abs_diff": max(diffs), "tolerance": tol,
                      "ok": max(diffs) <= tol})

    # 2. throughput, 3. memory with offload
    base = [f"model.architecture={json.dumps(arch)}", f"train.max_steps={steps + 1}", "model.dtype=auto",
            f"train.micro_batch_size={a.micro}", "train.gradient_accumulation_steps=1",
            f"train.peak_flops_per_s={PEAK}", "optim.warmup_steps=0"]
    for name, extra in (("zero3 ckpt on", ["model.gradient_checkpointing=true"]),
                        ("zero3 ckpt off", ["model.gradient_checkpointing=false"]),
                        ("zero3 offload ckpt on", ["model.gradient_checkpointing=true",
                                                   "ds_config=ds_configs/zero3_offload.json"])):
        m = train(out / name.replace(" ", "_"), out / (name.replace(" ", "_") + ".log"), a.data, base + extra)
        timed = m[1:]  # the first step includes warm-up
        tps = sum(x["real_tokens_per_s"] for x in timed) / len(timed)
        table.append({"check": name, "real_tokens_per_s": round(tps, 1),
                      "step_time_s": round(sum(x["step_time_s"] for x in timed) / len(timed), 3),
                      "peak_memory_gb": round(max(x["memory_gb"] for x in m), 2),
                      "mfu": round(sum(x.get("mfu", 0) for x in timed) / len(timed), 4)})
    plain = plain_loop(a.data, arch, steps, a.micro)
    table.append({"check": "plain PyTorch loop (no DeepSpeed, no ckpt)", "real_tokens_per_s": round(
        plain["real_tokens_per_s"], 1), "peak_memory_gb": round(plain["memory_gb"], 2)})
    off = next(r for r in table if r["check"] == "zero3 ckpt off")
    table.append({"check": "itune zero3 (ckpt off) / plain loop", "ratio": round(
        off["real_tokens_per_s"] / plain["real_tokens_per_s"], 3)})
    (out / "gpu_check.json").write_text(json.dumps(table, indent=2))
    for row in table:
        print(json.dumps(row))
    return 0 if all(r.get("ok", True) for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
