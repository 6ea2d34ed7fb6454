"""Data-preparation throughput: itune's JSONL -> verified packed shards, against a tokenizer floor and HF/TRL.

    python bench/data_throughput.py                 # ~50 MB corpus, the three methods, Markdown table
    python bench/data_throughput.py --quick         # ~2 MB corpus, for a fast check
    python bench/data_throughput.py --scale 1 4     # also itune alone on a 4x corpus (peak RSS vs input size)

Corpus (the one in shared/notes/platform.md, "Baselines measured here"): prompt/completion JSONL built by
repeating the records of the SuperNI train tasks (Tk-Instruct prompt: definition + 2 positive examples, via
``itune.data.sources.read_superni_task``), alpaca_libre and fastchat_sharegpt_dummy (flattened: earlier turns with
``<|user|>``/``<|assistant|>`` headers as the prompt, the last assistant turn as the completion), each prompt
prefixed with a distinct random number so that no two records are equal. It is written under ``--out-dir``
(default ``runs/bench_data``, git-ignored), never elsewhere in the repository.

Methods, each in its own subprocess (so peak memory is per method):

- ``itune``: ``itune-data prepare --input corpus.jsonl --format prompt_completion --seq-len 2048 --num-proc 2``
  (2 worker processes, as (b)'s ``num_proc=2``) followed by
  ``itune-data verify`` (JSONL in, verified packed shards out). Tokens and packing efficiency from the manifest.
- ``floor`` (a): the records already parsed in memory, ``tokenizers.Tokenizer.encode_batch`` of the
  prompt + " " + completion strings in 2 forked worker processes (one per core, Rust-side parallelism off).
- ``floor_fast`` (a'): the same with ``encode_batch_fast``, which skips the offsets bookkeeping. itune encodes
  this way where a tokenizer's offsets follow from its ids (``TextTokenizer.piece_offsets``), so (a') is the
  floor of its encoding step; the target is stated against (a).
- ``hf`` (b): ``datasets.load_dataset("json")``, ``map(batched=True, num_proc=2)`` tokenize-and-mask (TRL's
  prompt-completion method: the prompt and prompt + completion are tokenized, labels -100 over their common
  prefix, EOS appended), ``trl.pack_dataset(seq_length=2048, strategy="bfd")`` with the same ``num_proc`` (as
  ``SFTTrainer`` passes it), ``save_to_disk``. Needs ``trl`` (a benchmark-only dependency: ``pip install trl``).

Token definition, the same for every method: the tokens of each example as trained, i.e. BOS + tokens of
``prompt + " " + completion.strip()`` + EOS (itune's ``completion`` template; the manifest's ``tokens``). The
floor counts its encodings plus one EOS each; HF counts the real (non-padding) tokens of its packed rows.

Peak memory: the process tree of each method (the method's process and every worker / CLI child) is sampled
with psutil every 0.2 s; "peak RSS" is the largest sum of RSS over the tree, "peak PSS" the largest sum of PSS
(shared pages counted once: the fair total for forked workers). "max proc RSS" is the largest single process's
``ru_maxrss`` (``getrusage`` self + children).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_DATA = SHARED / "data"
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "mistral-7b-v0.3"

TARGETS = {"vs_floor": 0.9, "vs_hf": 1.4, "packing": 0.998, "rss_fraction_of_hf": 0.5}


# ---------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------

def base_records(data_root: Path) -> list[tuple[str, str, str]]:
    """(source, prompt, completion) for every usable record of the three sources."""
    sys.path.insert(0, str(ROOT))
    from itune.data.sources import read_source, read_split_file, read_superni_task, superni_task_path

    out = []
    sn = data_root / "superni"
    for name in read_split_file(sn / "splits" / "train_tasks.txt"):
        for ex, reason, _ in read_superni_task(superni_task_path(sn / "tasks", name), 2, True):
            if ex is not None:
                out.append(("superni", ex.messages[0].content, ex.messages[1].content))
    for path in (data_root / "alpaca_libre" / "alpaca_libre_tasks_v3.jsonl",
                 data_root / "fastchat_sharegpt_dummy" / "dummy_conversation.json"):
        for ex, err, _ in read_source(path):
            if ex is None:
                continue
            msgs = ex.messages
            last = max(i for i, m in enumerate(msgs) if m.role == "assistant")
            if last == 1 and msgs[0].role == "user":
                prompt = msgs[0].content
            else:  # multi-turn: earlier turns as text with role headers
                prompt = "".join(f"<|{m.role}|>\n{m.content}\n" for m in msgs[:last]) + "<|assistant|>\n"
            out.append((path.parent.name, prompt, msgs[last].content))
    return out


def build_corpus(path: Path, size_mb: float, data_root: Path, seed: int = 0) -> dict:
    """Writes ``path`` (JSONL, about ``size_mb`` MB) and returns its description."""
    base = base_records(data_root)
    rng = random.Random(seed)
    target = int(size_mb * 1e6)
    used: set[int] = set()
    n = written = 0
    per_source: dict[str, int] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            order = list(range(len(base)))
            rng.shuffle(order)
            for i in order:
                src, prompt, completion = base[i]
                while True:
                    r = rng.randrange(10**11, 10**12)
                    if r not in used:
                        used.add(r)
                        break
                line = json.dumps({"prompt": f"{r} {prompt}", "completion": completion}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                n += 1
                per_source[src] = per_source.get(src, 0) + 1
                if written >= target:
                    break
    os.replace(tmp, path)
    return {"path": str(path), "bytes": written, "records": n, "base_records": len(base), "per_source": per_source}


def read_corpus(path: Path) -> tuple[list[str], list[str]]:
    prompts, completions = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            prompts.append(r["prompt"])
            completions.append(r["completion"])
    return prompts, completions


# ---------------------------------------------------------------------------------------------------------------
# Methods (each runs in a child process: ``data_throughput.py _child METHOD ...``)
# ---------------------------------------------------------------------------------------------------------------

def _usage() -> dict:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"max_proc_rss_mb": max(s.ru_maxrss, c.ru_maxrss) / 1024,
            "cpu_s": s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime}


def run_itune(corpus: Path, tokenizer: Path, seq_len: int, work: Path) -> dict:
    out = work / "itune_out"
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).parent / "itune-data"
    cmd = [str(exe) if exe.exists() else "itune-data"]
    prep = cmd + ["prepare", "--input", str(corpus), "--format", "prompt_completion", "--tokenizer", str(tokenizer),
                  "--seq-len", str(seq_len), "--num-proc", "2", "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(prep, check=True, stdout=subprocess.DEVNULL)
    t1 = time.perf_counter()
    v = subprocess.run(cmd + ["verify", str(out)], capture_output=True, text=True)
    t2 = time.perf_counter()
    if v.returncode != 0:
        raise SystemExit(f"itune-data verify failed:\n{v.stdout}\n{v.stderr}")
    m = json.loads((out / "manifest.json").read_text())
    tr = m["splits"]["train"]
    return {"tokens": tr["tokens"], "rows": tr["rows"], "packing_efficiency": tr["tokens"] / (tr["rows"] * seq_len),
            "examples": tr["counts"]["written"], "rejected": tr["counts"]["rejected"],
            "wall_s": t2 - t0, "phases": {"prepare_s": t1 - t0, "verify_s": t2 - t1},
            "output_bytes": sum(p.stat().st_size for p in out.iterdir()),
            "command": " ".join(prep[1:]) + f" && itune-data verify {out}"}


def _floor_worker(tokenizer_file: str, texts: list[str], conn, fast: bool = False, batch: int = 1024) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    n = 0
    for i in range(0, len(texts), batch):
        n += sum(len(e.ids) + 1 for e in encode(texts[i:i + batch]))  # + EOS
    conn.send(n)
    conn.close()


def run_floor(corpus: Path, tokenizer: Path, workers: int = 2, fast: bool = False) -> dict:
    import multiprocessing as mp

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core, no Rust thread pool
    prompts, completions = read_corpus(corpus)  # parsed before timing: the floor starts from records in memory
    texts = [p + " " + c.strip() for p, c in zip(prompts, completions)]
    del prompts, completions
    import resource

    ctx = mp.get_context("fork")
    step = -(-len(texts) // workers)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs, pipes = [], []
    for w in range(workers):
        a, b = ctx.Pipe(duplex=False)
        part = texts[w * step:(w + 1) * step]
        p = ctx.Process(target=_floor_worker, args=(str(tokenizer / "tokenizer.json"), part, b, fast))
        p.start()
        procs.append(p)
        pipes.append(a)
    tokens = sum(a.recv() for a in pipes)
    for p in procs:
        p.join()
    t1 = time.perf_counter()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime  # the workers only, not the untimed JSON parsing
    return {"tokens": tokens, "examples": len(texts), "wall_s": t1 - t0, "packing_efficiency": None, "cpu_s": cpu}


def run_hf(corpus: Path, tokenizer: Path, seq_len: int, work: Path, num_proc: int = 2) -> dict:
    cache = work / "hf_cache"
    out = work / "hf_out"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    t0 = time.perf_counter()
    import datasets
    from transformers import AutoTokenizer
    from trl import pack_dataset

    datasets.disable_progress_bars()
    t_import = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))
    t_load = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    eos = tok.eos_token_id

    def tokenize_and_mask(batch):
        prompts = batch["prompt"]
        texts = [p + " " + c.strip() for p, c in zip(prompts, batch["completion"])]
        p_ids = tok(prompts)["input_ids"]
        f_ids = tok(texts)["input_ids"]
        input_ids, labels = [], []
        for p, f in zip(p_ids, f_ids):
            k = 0  # common prefix (TRL's common_prefix_length)
            for a, b in zip(p, f):
                if a != b:
                    break
                k += 1
            input_ids.append(f + [eos])
            labels.append([-100] * k + f[k:] + [eos])
        return {"input_ids": input_ids, "labels": labels}

    ds = ds.map(tokenize_and_mask, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
    t_map = time.perf_counter()
    ds = pack_dataset(ds, seq_len, strategy="bfd", map_kwargs={"num_proc": num_proc})
    t_pack = time.perf_counter()
    ds.save_to_disk(str(out))
    t1 = time.perf_counter()
    import pyarrow.compute as pc

    table = datasets.load_from_disk(str(out)).data.table
    tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py())
    rows = table.num_rows
    return {"tokens": tokens, "rows": rows, "packing_efficiency": tokens / (rows * seq_len), "wall_s": t1 - t0,
            "phases": {"import_s": t_import - t0, "load_json_s": t_load - t_import, "tokenize_mask_s": t_map - t_load,
                       "pack_s": t_pack - t_map, "save_s": t1 - t_pack},
            "versions": {"datasets": datasets.__version__, "trl": __import__("trl").__version__}}


def child_main(argv: list[str]) -> None:
    method, corpus, tokenizer, seq_len, work = argv[0], Path(argv[1]), Path(argv[2]), int(argv[3]), Path(argv[4])
    if method == "itune":
        res = run_itune(corpus, tokenizer, seq_len, work)
    elif method == "floor":
        res = run_floor(corpus, tokenizer)
    elif method == "floor_fast":
        res = run_floor(corpus, tokenizer, fast=True)
    elif method == "hf":
        res = run_hf(corpus, tokenizer, seq_len, work)
    else:
        raise SystemExit(f"unknown method {method}")
    res = {**_usage(), **res}  # a method's own cpu_s (timed section only) wins
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------

class TreeSampler(threading.Thread):
    """Samples RSS and PSS summed over a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            rss = pss = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    mi = p.memory_full_info()
                    rss += mi.rss
                    pss += getattr(mi, "pss", mi.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.stop.wait(self.interval)


def measure(method: str, corpus: Path, tokenizer: Path, seq_len: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_child", method, str(corpus),
                             str(tokenizer), str(seq_len), str(work)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.stop.set()
    sampler.join()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{method}: child failed with exit status {proc.returncode}")
    res = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[7:])
    res.update(method=method, tokens_per_s=res["tokens"] / res["wall_s"], peak_rss_mb=sampler.peak_rss / 2**20,
               peak_pss_mb=sampler.peak_pss / 2**20, child_total_s=total, loadavg_before=load0,
               loadavg_after=os.getloadavg(), cpu_util=res["cpu_s"] / total)
    return res


LABELS = {"itune": "itune prepare + verify", "floor": "(a) floor: tokenizers encode_batch, 2 procs",
          "floor_fast": "(a') tokenizers encode_batch_fast (no offsets), 2 procs",
          "hf": "(b) HF datasets map(num_proc=2) + TRL pack_dataset bfd + save_to_disk"}


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def table(results: dict) -> str:
    fl, hf = results.get("floor"), results.get("hf")
    lines = ["| method | tokens | wall s | tokens/s | vs (a) | vs (b) | packing eff. | peak RSS MB (tree) | "
             "peak PSS MB (tree) | max proc RSS MB | CPU s | tokens per CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in ("itune", "floor", "floor_fast", "hf"):
        r = results.get(m)
        if r is None:
            continue
        va = r["tokens_per_s"] / fl["tokens_per_s"] if fl else None
        vb = r["tokens_per_s"] / hf["tokens_per_s"] if hf else None
        lines.append(f"| {LABELS[m]} | {r['tokens']:,} | {r['wall_s']:.1f} | {r['tokens_per_s'] / 1e6:.3f} M | "
                     f"{_f(va, '.2f')} | {_f(vb, '.2f')} | {_f(r.get('packing_efficiency'), '.4f')} | "
                     f"{r['peak_rss_mb']:,.0f} | {r['peak_pss_mb']:,.0f} | {r['max_proc_rss_mb']:,.0f} | "
                     f"{r['cpu_s']:.0f} | {r['tokens'] / r['cpu_s'] / 1e6:.3f} M |")
    return "\n".join(lines)


def targets(results: dict) -> str:
    it, fl, hf = results.get("itune"), results.get("floor"), results.get("hf")
    if it is None:
        return ""
    rows = ["| target | measured | met |", "|---|---|---|"]

    def row(name, value, ok):
        rows.append(f"| {name} | {value} | {'met' if ok else '**not met**'} |")

    if fl:
        v = it["tokens_per_s"] / fl["tokens_per_s"]
        row(f"itune tokens/s >= {TARGETS['vs_floor']}x (a)", f"{v:.2f}x", v >= TARGETS["vs_floor"])
    if hf:
        v = it["tokens_per_s"] / hf["tokens_per_s"]
        row(f"itune tokens/s >= {TARGETS['vs_hf']}x (b)", f"{v:.2f}x", v >= TARGETS["vs_hf"])
    pe = it["packing_efficiency"]
    row(f"itune packing efficiency >= {TARGETS['packing']}", f"{pe:.4f}", pe >= TARGETS["packing"])
    if hf:
        for key, name in (("peak_pss_mb", "peak PSS (tree)"), ("peak_rss_mb", "peak RSS (tree)")):
            lim = TARGETS["rss_fraction_of_hf"] * hf[key]
            row(f"itune {name} <= half of (b) ({lim:,.0f} MB)", f"{it[key]:,.0f} MB", it[key] <= lim)
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    ap.add_argument("--quick", action="store_true", help="2 MB corpus, for a fast check")
    ap.add_argument("--out-dir", default=str(ROOT / "runs" / "bench_data"), help="corpus and outputs (git-ignored)")
    ap.add_argument("--data-root", default=str(DEFAULT_DATA), help="directory with superni/, alpaca_libre/, ...")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--methods", nargs="+", default=["floor", "floor_fast", "hf", "itune"],
                    choices=["floor", "floor_fast", "hf", "itune"])
    ap.add_argument("--scale", nargs="+", type=float, default=[1.0],
                    help="corpus-size multiples for itune alone (peak memory vs input size); 1 reuses the main run")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each method (interleaved); the table shows "
                                                          "each method's fastest run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the corpora and outputs")
    a = ap.parse_args(argv)
    size = 2.0 if a.quick else a.size_mb
    out = Path(a.out_dir).resolve()
    if out.is_relative_to(ROOT) and not out.is_relative_to(ROOT / "runs"):
        raise SystemExit(f"--out-dir {out}: inside the repository only under runs/ (git-ignored)")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, data_root = Path(a.tokenizer).resolve(), Path(a.data_root).resolve()
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "nproc": os.cpu_count(),
            "size_mb": size, "seq_len": a.seq_len, "argv": sys.argv[1:], "loadavg_start": os.getloadavg()}

    t0 = time.perf_counter()
    corpus = out / f"corpus_{size:g}mb.jsonl"
    info["corpus"] = build_corpus(corpus, size, data_root, a.seed)
    info["corpus"]["build_s"] = time.perf_counter() - t0
    c = info["corpus"]
    print(f"corpus: {c['records']:,} records, {c['bytes'] / 1e6:.1f} MB ({c['per_source']}), "
          f"built in {c['build_s']:.1f} s", flush=True)

    runs: dict[str, list] = {m: [] for m in a.methods}
    for rep in range(a.repeat):  # methods interleaved, so that a change in machine load hits all of them
        for m in a.methods:
            print(f"running {m} ({rep + 1}/{a.repeat}) ...", flush=True)
            r = measure(m, corpus, tokenizer, a.seq_len, out / "work")
            runs[m].append(r)
            print(f"  {r['tokens']:,} tokens in {r['wall_s']:.1f} s = {r['tokens_per_s'] / 1e6:.3f} M tokens/s, "
                  f"peak RSS {r['peak_rss_mb']:,.0f} MB, PSS {r['peak_pss_mb']:,.0f} MB, "
                  f"load {r['loadavg_after'][0]:.2f}"
                  + (f", phases {({k: round(v, 1) for k, v in r['phases'].items()})}" if "phases" in r else ""),
                  flush=True)
    # per method, its fastest run: the one least slowed down by other work on a shared machine
    results = {m: max(rs, key=lambda r: r["tokens_per_s"]) for m, rs in runs.items()}

    scale = {}
    for s in a.scale:
        if s == 1.0 and "itune" in results:
            scale[s] = results["itune"]
            continue
        sc = out / f"corpus_{size * s:g}mb.jsonl"
        print(f"itune at {s:g}x ({size * s:g} MB) ...", flush=True)
        ci = build_corpus(sc, size * s, data_root, a.seed + 1)
        scale[s] = measure("itune", sc, tokenizer, a.seq_len, out / "work")
        scale[s]["corpus"] = ci
        if not a.keep:
            sc.unlink(missing_ok=True)
    info["loadavg_end"] = os.getloadavg()

    print()
    print(f"Corpus {c['bytes'] / 1e6:.1f} MB, {c['records']:,} records; seq_len {a.seq_len}; {info['nproc']} cores; "
          f"load average at start {info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}")
    print()
    print(table(results))
    if a.repeat > 1:
        print()
        for m, rs in runs.items():
            tps = sorted(r["tokens_per_s"] / 1e6 for r in rs)
            print(f"{m}: {a.repeat} runs, tokens/s {', '.join(f'{x:.3f}' for x in tps)} M (table: fastest run)")
    print()
    print(targets(results))
    if len(scale) > 1:
        print()
        print("| itune corpus | records | tokens | wall s | tokens/s | peak RSS MB (tree) | peak PSS MB (tree) | "
              "max proc RSS MB |")
        print("|---|---|---|---|---|---|---|---|")
        for s, r in sorted(scale.items()):
            mb = size * s
            print(f"| {s:g}x ({mb:g} MB) | {r['examples']:,} | {r['tokens']:,} | {r['wall_s']:.1f} | "
                  f"{r['tokens_per_s'] / 1e6:.3f} M | {r['peak_rss_mb']:,.0f} | {r['peak_pss_mb']:,.0f} | "
                  f"{r['max_proc_rss_mb']:,.0f} |")
    res_path = out / f"results_{size:g}mb.json"
    dump = {"info": info, "results": results, "runs": runs, "scale": {str(k): v for k, v in scale.items()}}
    res_path.write_text(json.dumps(dump, indent=2) + "\n")
    print(f"\nresults: {res_path}")
    if not a.keep:
        corpus.unlink(missing_ok=True)
        shutil.rmtree(out / "work", ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
    else:
        sys.exit(main())
