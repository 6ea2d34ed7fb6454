"""LoRA against full fine-tuning on 2 CPU ranks: peak memory per rank and real tokens/s, same model and data.

    python bench/lora_memory.py [--steps 4] [--seq-len 1024] [--hidden 512] [--layers 8]

A random-init Llama checkpoint (hidden ``--hidden``, ``--layers`` layers, vocabulary 32768, saved with
``save_pretrained``) trained on the SuperNI subset for ``--steps`` steps with ZeRO-3 and gradient checkpointing
(real ``deepspeed`` launcher, micro-batch 1), fully and with ``model.lora.r=16``. Per run: the peak RSS of rank 0
(``memory_gb``: the whole process) and the median real tokens/s of the steps after the first, then the ratios.
A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    a = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import MISTRAL, SUPERNI, deepspeed_cmd
    from tests.model_zoo import TOKENIZER_FILES

    tmp = Path(tempfile.mkdtemp(prefix="lora_memory_"))
    base = tmp / "base"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32768, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                      num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=max(4096, a.seq_len), tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    for f in TOKENIZER_FILES:
        if (MISTRAL / f).is_file():
            (base / f).write_bytes((MISTRAL / f).read_bytes())
    data = tmp / "data"
    subprocess.run([sys.executable, "-m", "data_tools.cli", "prepare", "--superni", str(SUPERNI), "--tokenizer",
                    str(MISTRAL), "--seq-len", str(a.seq_len), "--out", str(data)], check=True, cwd=ROOT,
                   capture_output=True)
    res = {}
    for name, extra in (("full", []), ("lora r=16", ["model.lora.r=16"])):
        run = tmp / name.replace(" ", "_").replace("=", "")
        r = subprocess.run(deepspeed_cmd(2, "launcher/train.py", "--config", "configs/superni_tiny.yaml",
                                         "model.architecture=null", f"model.pretrained={base}", f"data.path={data}",
                                         f"output_dir={run}", f"train.max_steps={a.steps}", "train.progress_bar=false",
                                         "train.micro_batch_size=1", "train.gradient_accumulation_steps=1",
                                         "checkpoint.export=false", "checkpoint.every_steps=0", *extra),
                           cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            print(name, "failed:", (r.stdout + r.stderr)[-800:])
            return 1
        rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
        summary = json.loads((run / "train_summary.json").read_text())
        res[name] = {"peak_gib": max(x["memory_gb"] for x in rec),
                     "tokens_per_s": statistics.median(x["real_tokens_per_s"] for x in rec[1:]),
                     "trainable": summary["model"]["trainable_parameters"],
                     "parameters": summary["model"]["parameters"]}
    print(f"Llama h{a.hidden} x {a.layers} layers ({res['full']['parameters']:,} parameters), fp32, ZeRO-3 + gradient "
          f"checkpointing, 2 CPU ranks, seq_len {a.seq_len}, 1 row per rank, {a.steps} steps")
    print("| run | trainable parameters | peak RSS rank 0 (GiB) | real tokens/s |")
    print("|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['trainable']:,} | {r['peak_gib']:.2f} | {r['tokens_per_s']:.0f} |")
    f, lo = res["full"], res["lora r=16"]
    print(f"LoRA / full: peak memory {lo['peak_gib'] / f['peak_gib']:.2f}x, "
          f"tokens/s {lo['tokens_per_s'] / f['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
