"""Where a data-preparation worker spends its time: one process, CPU time, against the tokenizer floor.

    python bench/data_stages.py                    # ~10 MB corpus (built like data_throughput.py's), 3 passes
    python bench/data_stages.py --size-mb 2        # quicker

Runs in this one process, Rust-side parallelism off (as in a ``--num-proc`` worker), on the chunks that
``itune-data prepare --format prompt_completion`` would hand its workers:

- ``floor``: ``tokenizers.Tokenizer.encode_batch`` of the prompt + " " + completion strings and reading ``.ids``
  (the floor of ``bench/data_throughput.py``, records parsed beforehand, not timed);
- ``floor_fast``: the same with ``encode_batch_fast`` (no offsets);
- ``itune worker``: ``itune.data.pipeline.process_chunk`` on every chunk (JSON line in, labelled tokens out);
- the worker's stages one by one (internal functions, same order), to show what its Python work costs.

Each figure is the fastest of ``--repeat`` passes (CPU seconds, ``time.process_time``); the cyclic garbage collector
is paused as in a worker. This is a benchmark, not a test: absolute times drift on shared machines, compare the
figures of one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, as a --num-proc worker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data_throughput import DEFAULT_DATA, DEFAULT_TOKENIZER, build_corpus  # noqa: E402


def _plan(corpus: Path, tokenizer: Path, seq_len: int):
    """The pipeline plan ``prepare_sources`` builds for this corpus (nothing is written)."""
    import itune.data.prepare as prep

    got = {}
    real = prep._run
    prep._run = lambda plan, *a, **k: got.setdefault("plan", plan)
    try:
        prep.prepare_sources(prep.SourcesOptions(inputs=[corpus], tokenizer=tokenizer, seq_len=seq_len,
                                                 out_dir=corpus.parent / "unused", format="prompt_completion"))
    finally:
        prep._run = real
    return got["plan"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=10.0)
    ap.add_argument("--out-dir", default=str(ROOT / "runs" / "bench_data"), help="corpus (git-ignored)")
    ap.add_argument("--data-root", default=str(DEFAULT_DATA))
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)

    import numpy as np

    from itune.data import pipeline as P
    from itune.data import render as R
    from itune.data.sources import decode_jsonl_line, parse_record

    out = Path(a.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / f"stages_{a.size_mb:g}mb.jsonl"
    info = build_corpus(corpus, a.size_mb, Path(a.data_root).resolve())
    plan = _plan(corpus, Path(a.tokenizer).resolve(), a.seq_len)
    spec = plan.sources[0]
    chunks = list(P.iter_chunks(plan))
    P._init_worker(plan, False)
    tok = P._WORKER["tok"]
    raw = [[(loc, line, first) for loc, (line, first), _ in c[2].items()] for c in chunks]
    texts = [[(r := json.loads(line))["prompt"] + " " + r["completion"].strip() for _, line, _ in b] for b in raw]
    gc.disable()

    def best(fn) -> float:
        times = []
        for _ in range(a.repeat):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return min(times)

    rows = [("floor: encode_batch + .ids", best(lambda: [[e.ids for e in tok._tok.encode_batch(b)] for b in texts])),
            ("floor_fast: encode_batch_fast + .ids",
             best(lambda: [[e.ids for e in tok._tok.encode_batch_fast(b)] for b in texts])),
            ("itune worker: process_chunk", best(lambda: [P.process_chunk(c) for c in chunks]))]

    stages: dict[str, float] = {}

    def staged():
        for block in raw:
            t = time.process_time()
            recs = [decode_jsonl_line(line, loc, first) for loc, line, first in block]
            t = _add(stages, "JSON decode", t)
            exs = [parse_record(r, spec.format, loc, spec.name, spec.path, plan.fields, plan.task_field)
                   for r, (loc, _, _) in zip(recs, block)]
            t = _add(stages, "records (parse_record)", t)
            segs = [R.segments(ex, spec.template, tok, plan.train_on) for ex in exs]
            lays = [R._layout(s) for s in segs]
            t = _add(stages, "template (segments, layout)", t)
            for ex, s, lay in zip(exs, segs, lays):
                R.check_rendered_special_text(ex, s, spec.template, tok, lay[0])
            t = _add(stages, "special-token check", t)
            flat, counts = tok.encode_batch_flat([lay[0] for lay in lays])
            t = _add(stages, "encode_batch_fast + ids to arrays", t)
            lengths = np.fromiter(map(len, (lay[0] for lay in lays)), dtype=np.int64, count=len(lays))
            base = np.cumsum(lengths + 1) - (lengths + 1)
            starts, ends, _ = tok.piece_offsets(flat, counts, [lay[0] for lay in lays], base)
            ids, labels, _ = R._label_flat(flat, counts, starts, ends, base, lays, tok)
            P.pack_tokens(ids, labels != R.IGNORE_INDEX)
            _add(stages, "offsets, labels, token packing", t)

    passes = []
    for _ in range(a.repeat):
        stages.clear()
        staged()
        passes.append(dict(stages))
    fastest = min(passes, key=lambda s: sum(s.values()))

    n = sum(len(b) for b in raw)
    print(f"corpus {corpus} ({info['records']:,} records, {info['bytes'] / 1e6:.1f} MB), {len(chunks)} chunks; "
          f"fastest of {a.repeat} passes, CPU s\n")
    print("| what | CPU s | us per record |\n|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {s / n * 1e6:.1f} |")
    for name, s in fastest.items():
        print(f"| stage: {name} | {s:.3f} | {s / n * 1e6:.1f} |")
    print(f"\nitune worker / floor: {rows[2][1] / rows[0][1]:.2f}; itune worker / floor_fast: "
          f"{rows[2][1] / rows[1][1]:.2f}")
    return 0


def _add(stages: dict, name: str, t0: float) -> float:
    t = time.process_time()
    stages[name] = stages.get(name, 0.0) + t - t0
    return t


if __name__ == "__main__":
    sys.exit(main())
