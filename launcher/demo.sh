#!/usr/bin/env bash
# The main job end to end on the embedded default, offline:
#   embedded task suite -> SentencePiece tokenizer -> prepare (pack + shard) -> ZeRO-3 training on 2 ranks
#   -> held-out evaluation of the trained and the untrained model, side by side.
# Usage: bash launcher/demo.sh [OUT_DIR]   (default runs/demo; `make demo` runs it in the project's venv)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
NPROC=${NPROC:-2}
# a free port for the ranks' rendezvous (29500, DeepSpeed's default, may be taken by another job)
PORT=${MASTER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
rm -rf "$OUT"
echo "== 1/4 data: embedded task suite, tokenizer, packed shards"
itune-data synthetic-suite --out "$OUT/suite"
itune-data train-tokenizer --superni "$OUT/suite" --vocab-size 1024 --out "$OUT/tokenizer"
itune-data prepare --superni "$OUT/suite" --tokenizer "$OUT/tokenizer" --seq-len 1024 --out "$OUT/data"
itune-data verify "$OUT/data"
echo "== 2/4 train: DeepSpeed ZeRO-3, $NPROC ranks"
deepspeed --num_gpus "$NPROC" --master_port "$PORT" launcher/train.py --config configs/demo.yaml \
  output_dir="$OUT/train" data.path="$OUT/data"
echo "== 3/4 held-out evaluation (tasks never seen in training)"
itune-eval --data "$OUT/data" --model "$OUT/train/export_step0" --out "$OUT/eval_untrained" --max-new-tokens 24 \
  > "$OUT/eval_untrained.log"
itune-eval --data "$OUT/data" --model "$OUT/train/export" --out "$OUT/eval_trained" --max-new-tokens 24 \
  > "$OUT/eval_trained.log"
echo "== 4/4 held-out scores: untrained vs trained"
itune-eval --compare "$OUT/eval_untrained/results.json" "$OUT/eval_trained/results.json" | head -4
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
u, t = (json.load(open(f"{out}/eval_{k}/results.json"))["results"] for k in ("untrained", "trained"))
print(f"held-out tasks (never trained on): ROUGE-L {u['rougeL_default_track']:.2f} -> {t['rougeL_default_track']:.2f}, "
      f"exact match {u['exact_match_default_track']:.2f} -> {t['exact_match_default_track']:.2f} "
      f"(untrained -> trained, 0-100); full tables: {out}/eval_trained/results.md")
PY
itune-report "$OUT/train" --eval "$OUT/eval_untrained" --eval "$OUT/eval_trained" --out "$OUT/report.png"
