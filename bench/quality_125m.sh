#!/usr/bin/env bash
# The OPT-125M comparison of the README and docs/quality.md: a 300-step lr sweep of every method
# (3 values each), then each method's best run continued to 1,000 steps (32M tokens), all on the
# offline corpus (data/corpus: python -m sst_dist.data corpus) with the bundled tokenizer.
#
#   bash bench/quality_125m.sh OUT [GPUS] [RUNS_PER_GPU]
set -euo pipefail
out=${1:?usage: bash bench/quality_125m.sh OUT [GPUS] [RUNS_PER_GPU]}
gpus=${2:-1}
per_gpu=${3:-1}
cd "$(dirname "$0")/.."
if [ ! -d data/corpus ]; then
  echo "error: data/corpus is missing; build it with 'python -m sst_dist.data corpus' (docs/quality.md)" >&2
  exit 2
fi
exec "${PYTHON:-python3}" bench/quality.py --size 125m --steps 300 --best-to 1000 --device cuda \
  --gpus "$gpus" --runs-per-gpu "$per_gpu" --warmup 100 --eval-every 100 --eval-tokens 262144 \
  --out "$out" --set data.source=local --set data.path=data/corpus --set data.tokenizer=bundled \
  --sweep full:optim.lr=6e-4,1.2e-3,2.4e-3 \
  --sweep lora:optim.lowrank_lr=1e-3,2e-3,4e-3 \
  --sweep relora:optim.lowrank_lr=1e-3,2e-3,4e-3 \
  --sweep sst:optim.lowrank_lr=1e-3,2e-3,4e-3 \
  --sweep galore:galore.lr=5e-3,1e-2,2e-2 \
  --sweep sst+galore:optim.lowrank_lr=1e-3,2e-3,4e-3
