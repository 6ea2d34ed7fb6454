"""MoE under ZeRO-3: step time with and without the expert blocks registered as ZeRO-3 leaf modules.

    python bench/moe_leaf_modules.py [--family mixtral] [--steps 8] [--repeat 2] [--seq-len 512]

Builds a tiny random-init checkpoint of the family (tests/model_zoo.py, saved with ``save_pretrained``), prepares
the SuperNI subset with its tokenizer, and trains it on 2 ranks (real ``deepspeed`` launcher, ZeRO-3, gradient
checkpointing) with ``model.zero3_leaf_modules`` true and false, interleaved ``--repeat`` times. Prints the median
step time (steps after the first) and real tokens/s of each, and their ratio. A benchmark: it asserts nothing.
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
    p.add_argument("--family", default="mixtral")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    a = p.parse_args()
    from tests.conftest import MISTRAL, SUPERNI, deepspeed_cmd
    from tests.model_zoo import build_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="moe_leaf_"))
    ckpt = build_checkpoint(a.family, tmp / a.family)
    data = tmp / "data"
    subprocess.run([sys.executable, "-m", "data_tools.cli", "prepare", "--superni", str(SUPERNI), "--tokenizer",
                    str(MISTRAL), "--seq-len", str(a.seq_len), "--out", str(data)], check=True, cwd=ROOT,
                   capture_output=True)
    times: dict[bool, list] = {True: [], False: []}
    tps: dict[bool, list] = {True: [], False: []}
    for r in range(a.repeat):
        for leaf in (True, False):
            run = tmp / f"run_{leaf}_{r}"
            subprocess.run(deepspeed_cmd(2, "launcher/train.py", f"model.pretrained={ckpt}", f"data.path={data}",
                                         f"output_dir={run}", f"train.max_steps={a.steps}", "train.progress_bar=false",
                                         f"model.zero3_leaf_modules={str(leaf).lower()}", "checkpoint.export=false",
                                         "train.micro_batch_size=2"),
                           check=True, cwd=ROOT, capture_output=True)
            rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            rec = [x for x in rec if x["kind"] == "train" and x["step"] > 1]
            times[leaf] += [x["step_time_s"] for x in rec]
            tps[leaf] += [x["real_tokens_per_s"] for x in rec]
    print(f"{a.family}, 2 CPU ranks, ZeRO-3, seq_len {a.seq_len}, micro-batch 2, {a.steps} steps x {a.repeat}")
    print("| leaf modules | median step time (s) | median real tokens/s |")
    print("|---|---|---|")
    for leaf in (True, False):
        print(f"| {'on' if leaf else 'off'} | {statistics.median(times[leaf]):.3f} | "
              f"{statistics.median(tps[leaf]):.0f} |")
    print(f"step time on / off: {statistics.median(times[True]) / statistics.median(times[False]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
