#!/usr/bin/env bash
# The quickstart's model, spelled out: 4 layers, hidden 128, 8 experts top-2, EP=2 on 2 CPU gloo ranks,
# on the shipped corpus (prepared by `megatron-moe-ext prepare-data`). Run from the repository root
# inside the venv (source .venv/bin/activate). On GPUs: drop --cpu and add --bf16.
#   bash examples/tiny_cpu.sh [--dry-run] [more flags]
# Variables: OUT  output folder (default runs/tiny_cpu)
set -euo pipefail
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tiny_cpu}
words() { read -r -d '' -a WORDS <<< "$1" || true; }
if [ "$DRY_RUN" = 1 ]; then
  printf 'megatron-moe-ext prepare-data --output-dir %q\n' "$OUT/data"
else
  megatron-moe-ext prepare-data --output-dir "$OUT/data" >/dev/null
fi
if [ -f "$OUT/data/manifest.json" ]; then
  words "$(python -c "import sys; from megatron_moe_ext.training.data import prepare_data; print(' '.join(prepare_data(sys.argv[1], verbose=False).megatron_args()))" "$OUT/data")"
  DATA=("${WORDS[@]}")
else
  DATA=("<data flags of $OUT/data, from prepare-data>")   # a dry run before the data exists
fi
words "$(python -c "from megatron_moe_ext.training.presets import tiny_moe_flags; print(' '.join(tiny_moe_flags()))")"
MODEL=("${WORDS[@]}")
launcher=(launch/torchrun_local.sh)
if [ "$DRY_RUN" = 1 ]; then launcher+=(--dry-run); fi
"${launcher[@]}" --nproc 2 --cpu "${MODEL[@]}" "${DATA[@]}" \
  --micro-batch-size 4 --global-batch-size 8 --train-iters 200 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine \
  --hidden-dropout 0 --attention-dropout 0 --log-interval 10 --eval-interval 50 --eval-iters 4 \
  --moe-router-policy topk --moe-ranks-per-node 1 --moe-ext-run-log "$OUT/run_log.jsonl" "$@"
