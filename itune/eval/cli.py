"""``itune-eval``: held-out generation and official SuperNI scoring.

    itune-eval --data runs/data/superni_512 --model runs/superni_tiny/export --out runs/superni_tiny/eval
    deepspeed --num_gpus 2 launcher/eval.py --data runs/data/superni_512 --run-dir runs/superni_tiny
    itune-eval --compare runs/a/eval/results.json runs/b/eval/results.json
    itune-eval --score DIR   (score predictions.jsonl + references.jsonl in DIR, official rules)
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="itune-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="prepared data directory (manifest.json + <split>_eval.jsonl)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="exported Hugging Face checkpoint directory")
    src.add_argument("--run-dir", help="training run directory with DeepSpeed checkpoints (ZeRO-3 generation)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="output directory (default: <model or run-dir>/eval)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call per rank")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    p.add_argument("--seed", type=int, default=0, help="with --sample (per rank: seed + rank)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="suppress EOS before this many tokens")
    p.add_argument("--max-instances", type=int, default=None, help="first N instances per task")
    p.add_argument("--ngram-threshold", type=float, default=0.5,
                   help="report instances whose 13-gram overlap with the training rows exceeds this fraction")
    p.add_argument("--xlingual-tokenizer", help="GPT-2-style tokenizer directory for xlingual-track ROUGE-L")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print two results files side by side")
    p.add_argument("--score", metavar="DIR", help="score DIR/predictions.jsonl against DIR/references.jsonl")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    from itune.errors import ItuneError

    try:
        return _run(a, p)
    except ItuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly
        from itune.fileio import stdout_closed_by_reader

        return stdout_closed_by_reader()


def check_generation_args(a) -> None:
    """Refuses out-of-range generation options and a split the data does not have, all at once, before any model
    is loaded.

    Raises:
        ConfigError: listing every problem; ManifestError: ``--data`` is not prepared data.
    """
    from itune.data import shards
    from itune.errors import ConfigError

    problems = []
    for flag, value, lowest in (("--batch-size", a.batch_size, 1), ("--max-new-tokens", a.max_new_tokens, 1),
                                ("--min-new-tokens", a.min_new_tokens, 0), ("--max-instances", a.max_instances, 1)):
        if value is not None and value < lowest:
            problems.append(f"{flag}: must be >= {lowest}, got {value}")
    if a.min_new_tokens > a.max_new_tokens >= 1:
        problems.append(f"--min-new-tokens {a.min_new_tokens} exceeds --max-new-tokens {a.max_new_tokens}")
    if a.sample and not (a.temperature > 0 and a.temperature != float("inf")):
        problems.append(f"--temperature: must be > 0 with --sample, got {a.temperature}")
    if not 0 <= a.ngram_threshold <= 1:
        problems.append(f"--ngram-threshold: a fraction in [0, 1], got {a.ngram_threshold}")
    if a.xlingual_tokenizer and not __import__("pathlib").Path(a.xlingual_tokenizer).exists():
        problems.append(f"--xlingual-tokenizer: {a.xlingual_tokenizer} not found; give a tokenizer directory or "
                        "leave the option out")
    splits = shards.read_manifest(a.data)["splits"]
    if a.split not in splits:
        problems.append(f"--split {a.split!r}: {a.data} has splits {sorted(splits)}")
    if problems:
        raise ConfigError("invalid evaluation options:\n  - " + "\n  - ".join(problems))


def _run(a, p) -> int:
    from pathlib import Path

    from itune.errors import ConfigError
    from itune.eval import report
    from itune.eval.run import load_results

    for f in a.compare or []:
        if not Path(f).is_file():
            raise ConfigError(f"{f}: not a file; --compare takes two results.json files written by itune-eval")
    if a.score and not (Path(a.score) / "predictions.jsonl").is_file():
        raise ConfigError(f"{a.score}: no predictions.jsonl here; --score takes a directory holding "
                          "predictions.jsonl and references.jsonl (official formats)")
    if a.compare:
        print(report.compare_results(load_results(a.compare[0]), load_results(a.compare[1]),
                                     Path(a.compare[0]).parent.name or "a", Path(a.compare[1]).parent.name or "b"))
        return 0
    if a.score:
        from itune.eval.metrics import score_superni

        preds, refs = report.read_official_files(a.score)
        scores = score_superni(preds, refs, xlingual_tokenizer=a.xlingual_tokenizer)
        report.write_results(Path(a.score) / "official_results.json", dict(scores))
        print(report.markdown_table(dict(scores), refs))
        return 0
    if not a.data or not (a.model or a.run_dir):
        p.error("--data and one of --model / --run-dir are required (or --compare / --score)")
    check_generation_args(a)
    out = a.out or str(Path(a.model or a.run_dir) / "eval")
    new = [d for d in (Path(out), *Path(out).parents) if not d.exists()]  # created by the lock
    lock = lock_out(a, out)  # before any model is loaded; a refusal stops every rank
    try:
        return _generate(a, out)
    finally:
        if lock is not None:
            lock.release()
            for d in new:  # a failed evaluation leaves no empty directory behind (e.g. a mistyped --model)
                try:
                    d.rmdir()
                except OSError:
                    break


def lock_out(a, out: str):
    """One evaluation per output directory: rank 0 takes ``out/.itune.lock`` (:mod:`itune.lock`). Under a launcher
    the process group is started first (gloo for ``--model``, the ZeRO-3 engine's for ``--run-dir``), so that a
    refusal stops every rank with the same error.

    Returns:
        The lock on rank 0, None on the other ranks.

    Raises:
        ConfigError: another process holds ``out``.
    """
    from itune import dist
    from itune.lock import hold_dir_lock_rank0

    env = dist.resolve()
    if env.world_size > 1:
        dist.export_for_torch(env)
        if a.model:  # an exported model under a launcher: plain data parallel generation
            import torch.distributed as tdist

            tdist.init_process_group("gloo")
        else:  # ZeRO-3 generation: the process group engine_from_run goes on with
            import torch

            from itune.comm import init_distributed

            if init_distributed():
                torch.cuda.set_device(env.local_rank)
    return hold_dir_lock_rank0(out, "itune-eval", env.rank, env.world_size, choose="--out")


def _generate(a, out: str) -> int:
    """Loads the model, generates, scores and writes ``out`` (whose lock the caller holds)."""
    from pathlib import Path

    from itune.eval import report
    from itune.eval.run import engine_from_run, evaluate, model_from_export

    if a.model:
        from itune.eval.contamination import training_record

        model, step, synced, name = model_from_export(a.model, a.data), None, False, a.model
        training = training_record(a.model)
        step = training["step"] if training else None
    else:
        model, step, training = engine_from_run(a.run_dir, a.data)
        synced, name = True, a.run_dir
    res = evaluate(model, a.data, out, split=a.split, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                   min_new_tokens=a.min_new_tokens,
                   max_instances=a.max_instances, synced_gpus=synced, model_name=name, step=step,
                   training=training, ngram_threshold=a.ngram_threshold, xlingual_tokenizer=a.xlingual_tokenizer,
                   do_sample=a.sample, temperature=a.temperature, seed=a.seed)
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_rank() == 0:
        print(report.markdown_table(res["results"], report.read_references(Path(out) / report.REFERENCES_FILE)))
        r = res["results"]
        cont = res["contamination"]
        if "fraction" in cont:
            print(f"contamination: {cont['contaminated']}/{cont['instances']} instances above "
                  f"{cont['threshold']} {cont['ngram']}-gram overlap with the training rows")
        else:
            print(f"contamination check: {cont['skipped']}")
        empty = sum(1 for line in (Path(out) / "predictions.jsonl").read_text().splitlines()
                    if not json.loads(line)["prediction"])
        if empty > res["num_instances"] // 2:
            print(f"warning: {empty}/{res['num_instances']} predictions are empty (the model ends with EOS at once);"
                  " an undertrained model does this (see --min-new-tokens to inspect its text anyway)")
        x = res.get("extra_metrics", {})
        print(f"{res['num_instances']} instances: ROUGE-L {r['rougeL_default_track']:.4f} "
              f"EM {r['exact_match_default_track']:.4f} (official); chrF {x.get('chrF', float('nan')):.2f} "
              f"BLEU {x.get('BLEU', float('nan')):.2f} (extra) -> {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
