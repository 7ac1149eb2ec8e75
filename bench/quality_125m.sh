#!/usr/bin/env bash
# The OPT-125M comparison of docs/benchmarks/2026-11-30-2xh200.md (the bench: docs/quality.md), on
# the offline corpus (data/corpus: python -m sst_dist.data corpus) with the bundled tokenizer.
#
#   bash bench/quality_125m.sh OUT [GPUS] [RUNS_PER_GPU]         300-step lr sweep of every method,
#                                                               each best continued to 1,000 steps
#   bash bench/quality_125m.sh OUT [GPUS] [RUNS_PER_GPU] long    full, LoRA, SST and SST + GaLore to
#                                                               2,400 steps (one SST round)
set -euo pipefail
out=${1:?usage: bash bench/quality_125m.sh OUT [GPUS] [RUNS_PER_GPU] [long]}
gpus=${2:-1}
per_gpu=${3:-1}
what=${4:-sweep}
cd "$(dirname "$0")/.."
if [ ! -d data/corpus ]; then
  echo "error: data/corpus is missing; build it with 'python -m sst_dist.data corpus' (docs/quality.md)" >&2
  exit 2
fi
common=(--size 125m --device cuda --gpus "$gpus" --runs-per-gpu "$per_gpu" --warmup 100 --eval-every 100
  --eval-tokens 262144 --out "$out" --set data.source=local --set data.path=data/corpus
  --set data.tokenizer=bundled --set checkpoint.keep=1)
case "$what" in
  sweep)
    exec "${PYTHON:-python3}" -m bench.quality "${common[@]}" --steps 300 --best-to 1000 \
      --sweep full:optim.lr=3e-4,6e-4,1.2e-3,2.4e-3 \
      --sweep lora:optim.lowrank_lr=2.5e-4,5e-4,1e-3,2e-3,4e-3 \
      --sweep relora:optim.lowrank_lr=2.5e-4,5e-4,1e-3,2e-3,4e-3 \
      --sweep sst:optim.lowrank_lr=2.5e-4,5e-4,1e-3,2e-3,4e-3 \
      --sweep galore:galore.lr=1.25e-3,2.5e-3,5e-3,1e-2,2e-2 \
      --sweep sst+galore:optim.lowrank_lr=5e-4,1e-3 --sweep sst+galore:galore.lr=1e-2,2e-2 \
      --sweep sst+galore:galore.rank=64,256 ;;
  long)
    exec "${PYTHON:-python3}" -m bench.quality "${common[@]}" --steps 2400 --methods full,lora,sst,sst+galore \
      --set checkpoint.every_steps=1200 --set sst:optim.lowrank_lr=5e-4 --set lora:optim.lowrank_lr=2.5e-4 \
      --set sst+galore:optim.lowrank_lr=5e-4 --set sst+galore:galore.lr=2e-2 --set sst+galore:galore.rank=256 ;;
  *)
    echo "error: the 4th argument is 'long' or nothing, not '$what'" >&2
    exit 2 ;;
esac
