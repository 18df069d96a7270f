#!/usr/bin/env bash
# LocMoE mu sweep on the shipped corpus (CPU, 2 gloo ranks, EP=2, ranks-per-node 1 = two "nodes").
set -u
cd "$(dirname "$0")/.." && mkdir -p runs/study
run() { name=$1; shift; .venv/bin/megatron-moe-ext quickstart --output-dir runs/study/$name --train-iters 500 "$@" > runs/study/$name.out 2>&1; echo "$name rc=$?" >> runs/study/done.txt; }
for mu in 0 0.03 0.1 0.3 1.0; do
  run locmoe_mu$mu --router-policy locmoe --extra --moe-locmoe-mu $mu --moe-ranks-per-node 1 --save-routing-trace runs/study/locmoe_mu$mu/trace
done

# LocMoE+ (after the sweep)
.venv/bin/megatron-moe-ext quickstart --output-dir runs/study/locmoe_plus --train-iters 500 --router-policy locmoe-plus --extra --moe-expert-capacity-factor 1.0 --moe-locmoe-plus-reestimate-interval 50 --moe-ranks-per-node 1 > runs/study/locmoe_plus.out 2>&1

# Node-local selection bias (beyond the paper): the router knows its node, the loss alone cannot use it.
for b in 0.05 0.2 0.4 0.6 1.0; do
  run locmoe_bias$b --router-policy locmoe --extra --moe-locmoe-local-bias $b --moe-ranks-per-node 1
done
