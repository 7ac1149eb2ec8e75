#!/usr/bin/env bash
# The OPT-125M comparison across seeds, and SST's ablations, on the offline corpus (data/corpus:
# python -m sst_dist.data corpus) with the bundled tokenizer: 1,000 steps each, 4 runs side by side
# on each GPU (about 31 GiB each).
#
#   bash bench/quality_125m_seeds.sh OUT [GPUS] [all|methods|ablations|report] [--set KEY=VALUE ...]
#
# methods:   full, LoRA, SST and GaLore at seeds 0, 1, 2; ReLoRA* and SST + GaLore at seeds 0, 1
#            (each at its best lr at 1,000 steps in docs/quality.md: GaLore's is 5e-3, not the
#            recipe's 1e-2; SST + GaLore's SST part is 5e-4, not the recipe's 1e-3)
# ablations: SST at seeds 1, 2 over T3 (sst.steps_per_iteration 50/100/400), rank (128), its lr
#            (optim.lowrank_lr 5e-4/2e-3) and the reset (optim.reset moments), one knob at a time,
#            the others at the recipe's values (T3 200, rank 64, lr 1e-3, exact reset): those are
#            the plain SST runs of 'methods', at the same seeds, which the report sets them beside
# report:    quality.csv / quality.md / plots over every run in OUT (each against LoRA and
#            full-rank of its own seed), also written at the end of 'all'
#
# Every part writes into OUT (a run's method, sweep value and seed name its folder), so parts can
# run on different machines and be copied together before 'report'. Re-running resumes what is
# unfinished. Each run keeps one checkpoint (1-2 GB; 30 runs in all): add
# --set checkpoint.save=false where the disk is short (a stopped run then starts over).
set -euo pipefail
out=${1:?usage: bash bench/quality_125m_seeds.sh OUT [GPUS] [all|methods|ablations|report] [--set KEY=VALUE ...]}
gpus=${2:-1}
what=${3:-all}
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
if [ ! -d data/corpus ]; then
  echo "error: data/corpus is missing; build it with 'python -m sst_dist.data corpus' (docs/quality.md)" >&2
  exit 2
fi
py=${PYTHON:-python3}
common=(--size 125m --steps 1000 --device cuda --gpus "$gpus" --runs-per-gpu 4 --warmup 100 --eval-every 100
  --eval-tokens 262144 --out "$out" --set data.source=local --set data.path=data/corpus
  --set data.tokenizer=bundled --set checkpoint.keep=1 "$@")
failed=0

bench() {
  local rc=0
  "$py" -m bench.quality "${common[@]}" "$@" || rc=$?
  if [ "$rc" -eq 130 ]; then
    exit 130  # interrupted: the same command resumes
  fi
  if [ "$rc" -ne 0 ]; then
    failed=1
  fi
}

methods() {
  bench --methods full,lora,sst,galore --seeds 0,1,2 --set galore:galore.lr=5e-3
  bench --methods relora,sst+galore --seeds 0,1 --set sst+galore:optim.lowrank_lr=5e-4
}

ablations() {  # one bench, so 4 runs are always on each GPU; rank 128 and T3 400 first (12-07
  # pilots to step 700), then T3 100 and 50 (12-07, to step 1,000), the lr (to step 800), the moment reset (12-03)
  bench --methods sst --seeds 1,2 --one-at-a-time --sweep sst:rank=128 --sweep sst:sst.steps_per_iteration=400,100,50 \
    --sweep sst:optim.lowrank_lr=2e-3,5e-4 --sweep sst:optim.reset=moments
}

case "$what" in
  methods) methods ;;
  ablations) ablations ;;
  all) methods; ablations ;;
  report) ;;
  *)
    echo "error: the 3rd argument is all, methods, ablations or report, not '$what'" >&2
    exit 2 ;;
esac
"$py" -m bench.quality --plot-only --out "$out"
exit "$failed"
