#!/usr/bin/env bash
# The quickstart's model, spelled out: 4 layers, hidden 128, 8 experts top-2, EP=2 on 2 CPU gloo ranks,
# on the shipped corpus (prepared by `megatron-moe-ext prepare-data`). Run from the repository root
# inside the venv. On GPUs: drop --cpu and add --bf16.
set -euo pipefail
OUT=${OUT:-runs/tiny_cpu}
megatron-moe-ext prepare-data --output-dir "$OUT/data" >/dev/null
DATA_ARGS=$(python -c "from megatron_moe_ext.training.data import prepare_data; print(' '.join(prepare_data('$OUT/data').megatron_args()))")
MODEL_ARGS=$(python -c "from megatron_moe_ext.training.presets import tiny_moe_flags; print(' '.join(tiny_moe_flags()))")
launch/torchrun_local.sh --nproc 2 --cpu $MODEL_ARGS $DATA_ARGS \
  --micro-batch-size 4 --global-batch-size 8 --train-iters 200 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine \
  --hidden-dropout 0 --attention-dropout 0 --log-interval 10 --eval-interval 50 --eval-iters 4 \
  --moe-router-policy topk --moe-ranks-per-node 1 --moe-ext-run-log "$OUT/run_log.jsonl" "$@"
