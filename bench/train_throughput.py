"""Training throughput benchmark (not a test): itune's packed trainer vs a padded baseline on the same engine.

    python bench/train_throughput.py [--steps 3] [--repeat 2] [--out runs/bench_train]

One run, same tiny Llama for every row (hidden 256, 4 layers, 4 heads / 2 KV heads, intermediate 704, vocab
32768: the configs/superni_tiny.yaml run config with its architecture overridden, unless ``--model config``),
same prepared SuperNI data (tokenizer mistral-7b-v0.3, seq_len 1024), fp32, ZeRO-3 (ds_configs/zero3.json),
gradient checkpointing:

1. itune: ``deepspeed --num_gpus 2 launcher/train.py --config configs/superni_tiny.yaml ...`` on packed rows
   (2 rows/micro-batch/rank x 2 accumulation x 2 ranks = 8 rows of 1024 tokens per optimizer step); real
   (non-pad) tokens/s from ``metrics.jsonl``.
2. baseline: bench/train_padded_baseline.py under the same launcher, engine built by ``itune.train.setup`` on data
   prepared with ``--no-pack``: 8 examples/micro-batch/rank x 2 accumulation x 2 ranks = 32 examples per
   optimizer step (about as many real tokens as 1.), each micro-batch padded to its longest example.
3. plain loop: bench/train_plain_loop.py, one process, no DeepSpeed, the same 8 packed rows per optimizer step.
4. itune at world 1 (same per-rank batch), for per-rank peak memory.

Real tokens/s = sum of real tokens / sum of step wall times over steps 2..N (step 1 is warm-up). Runs 1-3 are
repeated ``--repeat`` times, interleaved, and the best repeat of each is reported (the machine is shared; the
per-repeat figures and ratios are printed too). Peak memory is each rank's max RSS (VmHWM, polled from /proc for
the trainer; ``getrusage`` in the helpers). Prints a Markdown table. Data and run directories go under ``--out``
(git-ignored ``runs/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUPERNI = "/work/shared/data/superni"
TOKENIZER = "/work/shared/tokenizers/mistral-7b-v0.3"
CONFIG = "configs/superni_tiny.yaml"
SEQ_LEN = 1024
ARCH_256 = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2}


def log(*a):
    print(*a, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class PeakRss:
    """Polls /proc for the descendants of a process and keeps each one's VmHWM (peak RSS), keyed by the
    ``--local_rank=N`` of its command line (deepspeed launcher ranks)."""

    def __init__(self, root_pid: int, interval: float = 0.3):
        self.root, self.interval = root_pid, interval
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _descendants(self) -> list[int]:
        parent = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        out, frontier = [], {self.root}
        while frontier:
            kids = {p for p, pp in parent.items() if pp in frontier}
            out += kids
            frontier = kids
        return out

    def _poll(self):
        for pid in self._descendants():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                m = next((re.fullmatch(rb"--local_rank=(\d+)", c) for c in cmd if c.startswith(b"--local_rank=")),
                         None)
                if m is None:
                    continue
                hwm = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
            except OSError:
                continue
            if hwm:
                r = int(m.group(1))
                self.peak[r] = max(self.peak.get(r, 0.0), int(hwm.group(1)) / 2**20)

    def _loop(self):
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval)

    def stop(self) -> list[float]:
        self._stop.set()
        self._t.join()
        return [self.peak[r] for r in sorted(self.peak)]


def run(cmd: list[str], log_path: Path, watch: bool = False, timeout: float = 900) -> list[float] | None:
    """Runs ``cmd`` in the repository root, output to ``log_path``; returns per-rank peak RSS (GiB) if ``watch``."""
    log("$ " + " ".join(cmd))
    t0 = time.time()
    with open(log_path, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        w = PeakRss(p.pid) if watch else None
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 15)
            p.wait()
            rc = "timeout"
        peaks = w.stop() if w else None
    log(f"  -> exit {rc} in {time.time() - t0:.0f} s (log: {log_path})")
    if rc != 0:
        sys.stdout.write("".join(log_path.read_text().splitlines(True)[-30:]))
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return peaks


def throughput(steps: list[dict]) -> tuple[float, int, float]:
    """(real tokens/s, mean real tokens per step, mean step time) over steps 2..N."""
    s = steps[1:]
    real = sum(x["real_tokens"] for x in s)
    t = sum(x["time_s"] for x in s)
    return real / t, round(real / len(s)), t / len(s)


def itune_steps(out_dir: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "real_tokens": r["real_tokens_per_s"] * r["step_time_s"], "time_s": r["step_time_s"],
             "padding_fraction": r["padding_fraction"], "memory_gb": r["memory_gb"]}
            for r in recs if r.get("kind") == "train"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per measured run (first one is warm-up)")
    ap.add_argument("--world1-steps", type=int, default=3, help="optimizer steps of the world-1 memory run")
    ap.add_argument("--model", choices=["256", "config"], default="256",
                    help="256: hidden 256 / 4 layers (platform.md's baseline model); config: the config's as is")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats of the three loops (best is shown)")
    ap.add_argument("--out", default="runs/bench_train")
    a = ap.parse_args()
    if not 2 <= a.steps <= 9:
        ap.error("--steps must be 2..9 (9 whole steps fit in one epoch of the packed rows)")
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    venv_bin = Path(sys.executable).parent
    deepspeed = str(venv_bin / "deepspeed")
    started = datetime.datetime.now()
    load_start = load_avg()
    log(f"train throughput benchmark, {started:%Y-%m-%d %H:%M}, {platform.node()}, {os.cpu_count()} cores, "
        f"load average {load_start}")

    # data: packed rows and one example per row, same examples and tokenizer
    packed, nopack = out / "data" / f"superni_{SEQ_LEN}_packed", out / "data" / f"superni_{SEQ_LEN}_nopack"
    for d, extra in ((packed, []), (nopack, ["--no-pack"])):
        run([str(venv_bin / "itune-data"), "prepare", "--superni", SUPERNI, "--tokenizer", TOKENIZER,
             "--seq-len", str(SEQ_LEN), "--out", str(d), "--overwrite", *extra], out / f"prepare_{d.name}.log")
    mp, mn = (json.loads((d / "manifest.json").read_text())["splits"]["train"] for d in (packed, nopack))

    arch = [f"model.architecture.{k}={v}" for k, v in ARCH_256.items()] if a.model == "256" else []
    common = [*arch, "checkpoint.export=false", "checkpoint.every_steps=0", "train.progress_bar=false",
              "data.eval_split=none"]  # no held-out split: no end-of-run held-out pass

    def fresh(name: str) -> Path:
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def ds(n: int, script: str, *args: str) -> list[str]:
        return [deepspeed, "--num_gpus", str(n), "--master_port", str(free_port()), script, *args]

    itune_args = ["--config", CONFIG, f"data.path={packed}", f"train.max_steps={a.steps}", *common]
    base_args = ["--config", CONFIG, f"data.path={nopack}", f"train.max_steps={a.steps}",
                 "train.micro_batch_size=8", "train.gradient_accumulation_steps=2", *common]
    plain_args = ["--config", CONFIG, f"data.path={packed}", f"train.max_steps={a.steps}",
                  "train.micro_batch_size=2", "train.gradient_accumulation_steps=4", *common]
    runs: dict[str, list[dict]] = {"itune": [], "baseline": [], "plain": []}
    cmds = {}
    # interleaved repeats: on a shared machine each repeat sees the three loops under similar load
    for r in range(a.repeat):
        # 1. itune, 2 ranks, packed rows
        d = fresh(f"itune_w2_r{r}")
        cmds["itune"] = ds(2, "launcher/train.py", *itune_args, f"output_dir={d}")
        peaks = run(cmds["itune"], out / f"itune_w2_r{r}.log", watch=True)
        st = itune_steps(d)
        runs["itune"].append({"steps": st, "peak": peaks, "tps": throughput(st), "load": load_avg(),
                              "pad": sum(x["padding_fraction"] for x in st[1:]) / len(st[1:])})
        # 2. padded baseline, same engine, 2 ranks
        d = fresh(f"baseline_w2_r{r}")
        cmds["baseline"] = ds(2, "bench/train_padded_baseline.py", str(d / "baseline.json"), *base_args,
                              f"output_dir={d}")
        run(cmds["baseline"], out / f"baseline_w2_r{r}.log")
        b = json.loads((d / "baseline.json").read_text())
        real = sum(x["real_tokens"] for x in b["steps"][1:])
        runs["baseline"].append({"steps": b["steps"], "peak": b["max_rss_gb_per_rank"], "tps": throughput(b["steps"]),
                                 "pad": 1 - real / sum(x["padded_tokens"] for x in b["steps"][1:]),
                                 "threads": b["torch_threads"], "load": load_avg()})
        # 3. plain PyTorch loop, one process, same 8 packed rows per optimizer step
        d = fresh(f"plain_w1_r{r}")
        cmds["plain"] = [sys.executable, "bench/train_plain_loop.py", str(d / "plain.json"), *plain_args,
                         f"output_dir={d}"]
        run(cmds["plain"], out / f"plain_w1_r{r}.log")
        pl = json.loads((d / "plain.json").read_text())
        runs["plain"].append({"steps": pl["steps"], "peak": pl["max_rss_gb_per_rank"], "tps": throughput(pl["steps"]),
                              "threads": pl["torch_threads"], "load": load_avg()})

    # 4. itune, 1 rank (same per-rank batch), for per-rank peak memory
    d = fresh("itune_w1")
    cmds["itune_w1"] = ds(1, "launcher/train.py", "--config", CONFIG, f"data.path={packed}",
                          f"train.max_steps={a.world1_steps}", *common, f"output_dir={d}")
    peaks = run(cmds["itune_w1"], out / "itune_w1.log", watch=True)
    st = itune_steps(d)
    w1 = {"steps": st, "peak": peaks, "tps": throughput(st) if len(st) > 1 else None}

    load_end = load_avg()
    took = (datetime.datetime.now() - started).total_seconds()
    rel = lambda c: " ".join(x.replace(str(ROOT) + "/", "").replace(str(venv_bin) + "/", "") for x in c)  # noqa: E731
    gb = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731

    def best(name: str) -> dict:
        """The repeat with the highest real tokens/s (the least disturbed by other work), peaks over repeats."""
        rs = runs[name]
        b = dict(max(rs, key=lambda x: x["tps"][0]))
        b["peak"] = [max(x["peak"][i] for x in rs) for i in range(len(rs[0]["peak"]))]
        b["all"] = ", ".join(f"{x['tps'][0]:.0f}" for x in rs)
        return b

    it, bl, pl = best("itune"), best("baseline"), best("plain")
    model = ("Llama hidden 256, 4 layers, 4 heads (2 KV), intermediate 704, vocab 32768" if a.model == "256"
             else "Llama per configs/superni_tiny.yaml")
    epoch_pad = epoch_padding(nopack, 8)
    lines = [
        f"Model: {model} ({it_params(out / 'itune_w2_r0.log')} parameters); fp32; ZeRO-3 (ds_configs/zero3.json); "
        "gradient checkpointing; sdpa attention.",
        f"Data: SuperNI train split, {mp['counts']['written']} examples, {mp['tokens']} real tokens (longest "
        f"example {mp['max_example_tokens']}); packed: {mp['rows']} rows of {SEQ_LEN} (packing efficiency "
        f"{mp['packing_efficiency']:.3f}); --no-pack: {mn['rows']} rows (one example each).",
        f"{a.steps} optimizer steps per run, step 1 excluded (warm-up); {a.repeat} interleaved repeat(s), best "
        f"shown (all repeats in brackets); torch threads per process: {bl['threads']} (trainer ranks) / "
        f"{pl['threads']} (plain loop).",
        "",
        "| run | ranks | optimizer step | real tokens / step | s / step | real tokens/s | padding | "
        "peak RSS per rank (GiB) |",
        "|---|---|---|---|---|---|---|---|",
        f"| itune, packed rows | 2 | 2 rows x 2 acc. x 2 ranks = 8 x {SEQ_LEN} | {it['tps'][1]} | {it['tps'][2]:.2f} "
        f"| **{it['tps'][0]:.0f}** ({it['all']}) | {it['pad']:.1%} | {gb(it['peak'])} |",
        f"| baseline: 1 example/row, padded to longest of 8 | 2 | 8 ex. x 2 acc. x 2 ranks = 32 examples | "
        f"{bl['tps'][1]} | {bl['tps'][2]:.2f} | **{bl['tps'][0]:.0f}** ({bl['all']}) | {bl['pad']:.1%} "
        f"| {gb(bl['peak'])} |",
        f"| plain PyTorch loop (no DeepSpeed), packed rows | 1 | 2 rows x 4 acc. = 8 x {SEQ_LEN} | {pl['tps'][1]} | "
        f"{pl['tps'][2]:.2f} | **{pl['tps'][0]:.0f}** ({pl['all']}) | {it['pad']:.1%} | {gb(pl['peak'])} |",
    ]
    if w1["tps"]:
        lines.append(f"| itune, packed rows (memory run, {a.world1_steps} steps) | 1 | 2 rows x 2 acc. = 4 x {SEQ_LEN} "
                     f"| {w1['tps'][1]} | {w1['tps'][2]:.2f} | {w1['tps'][0]:.0f} | - | {gb(w1['peak'])} |")
    ratio_b, ratio_p = it["tps"][0] / bl["tps"][0], it["tps"][0] / pl["tps"][0]
    paired = ", ".join(f"{i['tps'][0] / b['tps'][0]:.2f}x" for i, b in zip(runs["itune"], runs["baseline"]))
    lines += [
        "",
        f"- itune / baseline: **{ratio_b:.2f}x** (per repeat: {paired}); target >= 1.5x: "
        f"{'met' if ratio_b >= 1.5 else 'NOT met'}",
        f"- itune / plain loop: **{ratio_p:.2f}x**",
        f"- baseline padding over every micro-batch of 8 in the epoch (same seeded order): {epoch_pad:.1%} "
        f"(measured steps: {bl['pad']:.1%})",
        f"- itune peak RSS per rank: world 1 {gb(w1['peak'])} GiB, world 2 {gb(it['peak'])} GiB "
        f"(rank 0 max RSS in metrics.jsonl: {it['steps'][-1]['memory_gb']:.2f} GiB)",
        f"- load average (1/5/15 min) at start {load_start}, at end {load_end}; whole benchmark {took / 60:.1f} min",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"date": started.isoformat(timespec="minutes"), "load_start": load_start, "load_end": load_end,
         "duration_s": took, "commands": {k: rel(v) for k, v in cmds.items()}, "runs": runs, "itune_w1": w1,
         "ratio_itune_baseline": ratio_b, "ratio_itune_plain": ratio_p}, indent=2))
    log("\ncommands (last repeat):\n" + "\n".join(f"  {k}: {rel(v)}" for k, v in cmds.items()))
    return 0


def it_params(log_path: Path) -> str:
    m = re.search(r"model: .*? ([\d,]+) parameters", log_path.read_text())
    return m.group(1) if m else "?"


def epoch_padding(nopack: Path, per_batch: int) -> float:
    """Padding fraction of the baseline over a whole epoch: examples in itune's seeded order (seed 0, epoch 0),
    micro-batches of ``per_batch`` consecutive ones, each padded to its longest."""
    from itune.data import shards
    from itune.loader import epoch_order

    lengths = [sum(x) for x in shards.open_split(nopack, "train").column("example_lengths").to_pylist()]
    order = epoch_order(len(lengths), 0, 0)
    real = padded = 0
    for i in range(0, len(order), per_batch):
        n = [lengths[j] for j in order[i:i + per_batch]]
        real += sum(n)
        padded += len(n) * max(n)
    return 1 - real / padded


if __name__ == "__main__":
    sys.exit(main())
