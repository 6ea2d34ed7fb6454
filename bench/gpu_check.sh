#!/usr/bin/env bash
# GPU validation, one prepared run (see bench/gpu_check.py). On the GPU machine, with the repository copied there:
#   bash bench/gpu_check.sh                # needs .whl/ (deepspeed wheel + missing deps) and runs/data/gpu_4096
#   bash bench/gpu_check.sh --dry-run      # CPU, tiny model: checks the script itself
# Prepare here first:
#   itune-data prepare --superni ../shared/data/superni --tokenizer ../shared/tokenizers/mistral-7b-v0.3 \
#       --seq-len 4096 --out runs/data/gpu_4096
#   pip wheel deepspeed==0.19.8 --no-deps -w .whl
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
if [ "${1:-}" = "--dry-run" ]; then
  DATA=${DATA:-runs/data/superni_512}
  exec python3 bench/gpu_check.py --data "$DATA" --dry-run --out "${OUT:-runs/gpu_check_dry}"
fi
exec python3 bench/gpu_check.py --data "${DATA:-runs/data/gpu_4096}" --out "${OUT:-runs/gpu_check}"
