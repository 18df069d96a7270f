#!/usr/bin/env bash
# LocMoE studies on the shipped corpus (CPU, 2 gloo ranks, EP=2, ranks-per-node 1 = two "nodes"; docs/locmoe.md).
#   bash examples/study_locmoe_cpu.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=examples/study_common.sh
source examples/study_common.sh "$@"
# mu sweep
for mu in 0 0.03 0.1 0.3 1.0; do
  run "locmoe_mu$mu" --router-policy locmoe --extra --moe-locmoe-mu "$mu" --moe-ranks-per-node 1 \
    --save-routing-trace "runs/study/locmoe_mu$mu/trace"
done
# LocMoE+ (after the sweep)
run locmoe_plus --router-policy locmoe-plus --extra --moe-expert-capacity-factor 1.0 \
  --moe-locmoe-plus-reestimate-interval 50 --moe-ranks-per-node 1

# Node-local selection bias (beyond the paper): the router knows its node, the loss alone cannot use it.
run topk --extra --moe-ranks-per-node 1
for b in 0.05 0.2 0.25 0.3 0.4 0.6 1.0; do
  run "locmoe_bias$b" --router-policy locmoe --extra --moe-locmoe-local-bias "$b" --moe-ranks-per-node 1
done
# ... after W unbiased iterations, with the last iteration's routing trace
for b in 0.3 0.4 0.6 1.0; do
  run "locmoe_bias${b}_warm100" --router-policy locmoe --extra --moe-locmoe-local-bias "$b" \
    --moe-locmoe-local-bias-warmup-steps 100 --moe-ranks-per-node 1 --save-routing-trace "runs/study/locmoe_bias${b}_warm100/trace"
done
# a second seed, with routing traces for comm-volume
run topk_seed2 --extra --moe-ranks-per-node 1 --seed 2 --save-routing-trace runs/study/topk_seed2/trace
run locmoe_bias0.2_seed2 --router-policy locmoe --extra --moe-locmoe-local-bias 0.2 --moe-ranks-per-node 1 \
  --seed 2 --save-routing-trace runs/study/locmoe_bias0.2_seed2/trace
cmd "$MOE_EXT" comm-volume --trace runs/study/topk_seed2/trace --policy topk --ranks-per-node 1 --json
cmd "$MOE_EXT" comm-volume --trace runs/study/locmoe_bias0.2_seed2/trace --policy locmoe \
  --local-bias 0.2 --ranks-per-node 1 --json
# LocMoE+ over training (docs/locmoe_plus_over_training.png)
cmd "$MOE_EXT" plot-metrics runs/study/locmoe_plus/run_log.jsonl runs/study/topk/run_log.jsonl \
  --labels locmoe-plus top-k --keys "valid:lm loss" moe_ext/expert_capacity moe_ext/dropped_token_fraction \
  moe_ext/rows_per_token moe_ext/layer_1/expert_load moe_ext/layer_4/expert_load --output docs/locmoe_plus_over_training.png
