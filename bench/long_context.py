"""Long context on 2 CPU ranks: peak memory per rank and real tokens/s against seq_len, loss from the full logits
(``train.tiled_loss=false``) against the tiled loss (the default).

    python bench/long_context.py [--seq-lens 2048 4096 8192 16384 32768] [--full-up-to 16384] [--steps 3]
                                 [--budget-gib 8]

The model of the long-context issue: a random-init Llama, hidden 256, 4 layers, 4 heads, vocabulary 32768 (the
shared Mistral tokenizer), fp32, ZeRO-3, gradient checkpointing, one packed row per rank per step (micro-batch 1),
on the SuperNI subset prepared at each seq_len (real ``deepspeed`` launcher). Per run: the peak RSS of rank 0
(``memory_gb`` of its metrics: the whole process, model set-up included) and the median real tokens/s of the
steps after the first. Then, per mode, the longest measured seq_len whose peak fits ``--budget-gib``. Runs whose
full logits would not fit this machine's memory are left out (``--full-up-to``). A benchmark: it asserts nothing.
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
ARCH = ("model.architecture.hidden_size=256", "model.architecture.intermediate_size=704",
        "model.architecture.num_hidden_layers=4", "model.architecture.num_attention_heads=4",
        "model.architecture.num_key_value_heads=4", "model.architecture.max_position_embeddings=65536")


#: benchmark modes: overrides of each
MODES = {"full": ["train.tiled_loss=false"], "tiled": [],
         "tiled+sp2": ["train.sequence_parallel_size=2"],
         "tiled+sp2+mlp": ["train.sequence_parallel_size=2", "model.tiled_mlp=true"]}


def run_extra(data: Path, out: Path, mode: str, steps: int) -> dict:
    """One run of ``mode`` (:data:`MODES`); returns peak GiB and tokens/s, or the error."""
    from tests.conftest import deepspeed_cmd

    r = subprocess.run(deepspeed_cmd(2, "launcher/train.py", "--config", "configs/superni_tiny.yaml", *ARCH,
                                     f"data.path={data}", f"output_dir={out}", f"train.max_steps={steps}",
                                     "train.progress_bar=false", "train.micro_batch_size=1",
                                     "train.gradient_accumulation_steps=1", "checkpoint.export=false",
                                     "checkpoint.every_steps=0", *MODES[mode]),
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stdout + r.stderr)[-600:]}
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rec = [x for x in rec if x["kind"] == "train"]
    return {"peak_gib": max(x["memory_gb"] for x in rec),
            "tokens_per_s": statistics.median(x["real_tokens_per_s"] for x in rec[1:] or rec)}


def run_one(data: Path, out: Path, seq_len: int, tiled: bool, steps: int) -> dict:
    return run_extra(data, out, "tiled" if tiled else "full", steps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--full-up-to", type=int, default=16384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--modes", nargs="+", default=None, choices=sorted(MODES),
                   help="instead of the full / tiled table: these modes at every --seq-lens (peak GiB, tokens/s)")
    a = p.parse_args()
    from tests.conftest import MISTRAL, SUPERNI

    tmp = Path(tempfile.mkdtemp(prefix="long_context_"))
    if a.modes:
        print("| seq_len | " + " | ".join(f"{m}: peak GiB | tokens/s" for m in a.modes) + " |")
        print("|---|" + "---|---|" * len(a.modes))
        for seq in a.seq_lens:
            data = tmp / f"data{seq}"
            subprocess.run([sys.executable, "-m", "data_tools.cli", "prepare", "--superni", str(SUPERNI),
                            "--tokenizer", str(MISTRAL), "--seq-len", str(seq), "--out", str(data)], check=True,
                           cwd=ROOT, capture_output=True)
            cells = []
            for m in a.modes:
                r = run_extra(data, tmp / f"run{seq}_{m}", m, a.steps)
                cells.append(f"{r['peak_gib']:.2f} | {r['tokens_per_s']:.0f}" if "error" not in r else "error | -")
            print(f"| {seq} | " + " | ".join(cells) + " |", flush=True)
        return 0
    results: dict = {}
    for seq in a.seq_lens:
        data = tmp / f"data{seq}"
        subprocess.run([sys.executable, "-m", "data_tools.cli", "prepare", "--superni", str(SUPERNI), "--tokenizer",
                        str(MISTRAL), "--seq-len", str(seq), "--out", str(data)], check=True, cwd=ROOT,
                       capture_output=True)
        for tiled in (False, True):
            if not tiled and seq > a.full_up_to:
                continue
            results[(seq, tiled)] = run_one(data, tmp / f"run{seq}_{tiled}", seq, tiled, a.steps)
            print(seq, "tiled" if tiled else "full", results[(seq, tiled)], flush=True)
    print("\nLlama h256 x 4 layers, vocab 32768, fp32, ZeRO-3 + gradient checkpointing, 2 CPU ranks, 1 row per rank")
    print("| seq_len | full logits: peak GiB | tokens/s | tiled loss: peak GiB | tokens/s | peak ratio | tokens/s ratio |")
    print("|---|---|---|---|---|---|---|")
    for seq in a.seq_lens:
        f, t = results.get((seq, False), {}), results.get((seq, True), {})

        def cell(x, k, fmt):
            return format(x[k], fmt) if k in x else ("error" if "error" in x else "not run")

        ratio = lambda k, fmt: format(t[k] / f[k], fmt) if k in t and k in f else "-"  # noqa: E731
        print(f"| {seq} | {cell(f, 'peak_gib', '.2f')} | {cell(f, 'tokens_per_s', '.0f')} | "
              f"{cell(t, 'peak_gib', '.2f')} | {cell(t, 'tokens_per_s', '.0f')} | {ratio('peak_gib', '.2f')} | "
              f"{ratio('tokens_per_s', '.2f')} |")
    for tiled in (False, True):
        fits = [s for s in a.seq_lens if results.get((s, tiled), {}).get("peak_gib", 1e9) <= a.budget_gib]
        print(f"longest seq_len within {a.budget_gib:g} GiB per rank, {'tiled loss' if tiled else 'full logits'}: "
              f"{max(fits) if fits else 'none'} (of those measured)")
    for seq, err in [(s, r["error"]) for (s, _), r in results.items() if "error" in r]:
        print(f"seq_len {seq} failed: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
