"""Trains one optimizer step of each given checkpoint through ``model.pretrained``, one after the other in this
process (world 1: one rank adds nothing to what a family needs, and one interpreter saves the start-up of each).

    python tests/scripts/family_matrix.py OUT.json --data DIR --zoo DIR --families a,b,c [key=value ...]

For each family ``f``: the run config is the defaults plus ``model.pretrained=ZOO/f``, ``data.path``,
``output_dir=ZOO/runs/f`` and the overrides; ``preflight`` + ``run``. OUT.json maps each family to
``{"summary": train_summary, "losses": [...]}`` or ``{"error": "ExceptionType: message"}`` (an itune error
refusing the run).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    import argparse

    from itune.config import load_config
    from itune.errors import ItuneError
    from itune.train import preflight, run

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--data", required=True)
    p.add_argument("--zoo", required=True)
    p.add_argument("--families", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    results = {}
    for fam in a.families.split(","):
        out = os.path.join(a.zoo, "runs", fam)
        cfg = load_config(None, [f"model.pretrained={os.path.join(a.zoo, fam)}", f"data.path={a.data}",
                                 f"output_dir={out}", "train.progress_bar=false", *a.overrides])
        try:
            preflight(cfg)
            summary = run(cfg)
            with open(os.path.join(out, "losses.jsonl")) as f:
                results[fam] = {"summary": summary, "losses": [json.loads(x) for x in f]}
        except ItuneError as e:
            results[fam] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{fam}: {json.dumps(results[fam])[:300]}", flush=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
