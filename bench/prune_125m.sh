#!/usr/bin/env bash
# The OPT-125M pruning table (docs/benchmarks/2026-11-30-h200.md): SST trained 1,000 steps on the
# offline corpus (data/corpus: python -m sst_dist.data corpus) with the bundled tokenizer, then
# python -m bench.prune on that run's held-out split.
#
#   bash bench/prune_125m.sh RUN_DIR [--set KEY=VALUE ...]      (table: RUN_DIR/prune/prune.md)
#
# Further arguments go to the trainer after the script's own. Re-running resumes the training from
# its last checkpoint (a finished run is not trained again). With EXPORT=DIR in the environment the
# run is also exported there as a dense transformers folder (about 0.5 GB in fp32).
set -euo pipefail
run=${1:?usage: bash bench/prune_125m.sh RUN_DIR [--set KEY=VALUE ...]}
shift
export_dir=${EXPORT:-}
cd "$(dirname "$0")/.."
if [ ! -d data/corpus ]; then
  echo "error: data/corpus is missing; build it with 'python -m sst_dist.data corpus' (docs/quality.md)" >&2
  exit 2
fi
py=${PYTHON:-python3}
"$py" launch/pretrain.py --recipe recipes/opt-125m-sst.yaml --output-dir "$run" \
  --set data.source=local --set data.path=data/corpus --set data.tokenizer=bundled \
  --set train.max_steps=1000 --set optim.warmup_steps=100 \
  --set checkpoint.keep=1 --set wandb.mode=disabled "$@"
if [ -n "$export_dir" ]; then
  "$py" -m sst_dist.export --output-dir "$run" --out "$export_dir"
fi
"$py" -m bench.prune --output-dir "$run" --fractions 1,0.9,0.75,0.5,0.25 --out "$run/prune"
