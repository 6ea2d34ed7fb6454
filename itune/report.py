"""``itune-report``: one picture of a run: training and held-out loss, learning rate, real tokens/s, memory,
skipped steps, and held-out scores per task and per category for one or more evaluations side by side.

    itune-report runs/demo/train --eval runs/demo/eval_untrained --eval runs/demo/eval_trained --out report.png

Writes the PNG (matplotlib, no display needed) and, beside it, ``<out>.json`` with every plotted number (what tests
and other tools read). Reads ``metrics.jsonl`` (rank 0's logged scalars), ``losses.jsonl`` (skipped steps) and, per
``--eval`` directory, ``results.json`` (official ROUGE-L and exact match) with ``references.jsonl`` (task and
category names).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from itune.errors import ConfigError


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e.msg}); is this an itune run directory?") from None
    return out


def run_data(run_dir: Path) -> dict:
    """The curves of a training run: per step ``loss``, ``lr``, ``real_tokens_per_s``, ``memory_gb``, the held-out
    loss (``heldout``: steps and values) and ``skipped`` steps.

    Raises:
        ConfigError: no ``metrics.jsonl`` in ``run_dir``.
    """
    metrics = _jsonl(run_dir / "metrics.jsonl")
    if not metrics:
        raise ConfigError(f"{run_dir}: no metrics.jsonl (give the output_dir of a training run)")
    train = [m for m in metrics if m.get("kind") == "train"]
    held = [m for m in metrics if m.get("kind") == "heldout" and "loss" in m]
    out = {"steps": [m["step"] for m in train]}
    for k in ("loss", "lr", "real_tokens_per_s", "memory_gb"):
        out[k] = [m.get(k) for m in train]
    out["heldout"] = {"steps": [m["step"] for m in held], "loss": [m["loss"] for m in held]}
    out["skipped"] = [x["step"] for x in _jsonl(run_dir / "losses.jsonl") if x.get("skipped")]
    return out


def eval_data(eval_dir: Path) -> dict:
    """Held-out scores of one evaluation: overall, per task and per category (official ROUGE-L and exact match of
    the default track, 0-100).

    Raises:
        ConfigError: no ``results.json`` in ``eval_dir``.
    """
    from itune.eval.metrics import category_key

    res_file = eval_dir / "results.json"
    if not res_file.is_file():
        raise ConfigError(f"{eval_dir}: no results.json (give an itune-eval --out directory)")
    res = json.loads(res_file.read_text())["results"]
    refs = _jsonl(eval_dir / "references.jsonl")
    tasks = sorted({r["task_id"] for r in refs})
    cats = sorted({r["task_category"] for r in refs if r.get("task_category")})

    def pick(names, key):
        return {n: {m: res.get(f"{m}_for_{key(n)}_default_track") for m in ("rougeL", "exact_match")} for n in names}

    return {"name": eval_dir.name, "rougeL": res.get("rougeL_default_track"),
            "exact_match": res.get("exact_match_default_track"), "tasks": pick(tasks, lambda t: t),
            "categories": pick(cats, category_key)}


def write_report(run_dir: Path, eval_dirs: list[Path], out: Path) -> dict:
    """Draws the report to ``out`` (PNG) and writes its data to ``out`` + ``.json``; returns the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {"run": str(run_dir), "train": run_data(run_dir), "evals": [eval_data(d) for d in eval_dirs]}
    t = data["train"]
    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    a = ax[0][0]
    a.plot(t["steps"], t["loss"], label="train")
    if t["heldout"]["steps"]:
        a.plot(t["heldout"]["steps"], t["heldout"]["loss"], "o-", label="held-out")
    for s in t["skipped"]:
        a.axvline(s, color="red", alpha=0.4)
    a.set(title="loss" + (f" ({len(t['skipped'])} skipped steps in red)" if t["skipped"] else ""), xlabel="step")
    a.legend()
    for a, k, title in ((ax[0][1], "lr", "learning rate"), (ax[0][2], "real_tokens_per_s", "real tokens/s"),
                        (ax[1][0], "memory_gb", "peak memory (GiB, rank 0)")):
        a.plot(t["steps"], t[k])
        a.set(title=title, xlabel="step")
    for a, part in ((ax[1][1], "tasks"), (ax[1][2], "categories")):
        names = sorted({n for e in data["evals"] for n in e[part]})
        width = 0.8 / max(1, len(data["evals"]))
        for i, e in enumerate(data["evals"]):
            a.bar([j + i * width for j in range(len(names))],
                  [(e[part].get(n) or {}).get("rougeL") or 0 for n in names], width, label=e["name"])
        a.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=60, ha="right", fontsize=7)
        a.set(title=f"held-out ROUGE-L per {part[:-1] if part == 'tasks' else 'category'}", ylim=(0, 100))
        if data["evals"]:
            a.legend(fontsize=7)
    fig.suptitle(f"itune run {run_dir}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    Path(str(out) + ".json").write_text(json.dumps(data, indent=2) + "\n")
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run's output_dir")
    p.add_argument("--eval", action="append", default=[], metavar="DIR", help="an itune-eval --out directory "
                   "(repeatable: shown side by side)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.run_dir) / "report.png"
    try:
        write_report(Path(a.run_dir), [Path(d) for d in a.eval], out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (data: {out}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
