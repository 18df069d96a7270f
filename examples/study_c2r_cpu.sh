#!/usr/bin/env bash
# C2R quality/communication study on the shipped corpus (CPU, 2 gloo ranks, EP=2).
set -u
cd "$(dirname "$0")/.." && mkdir -p runs/study
run() { name=$1; shift; .venv/bin/megatron-moe-ext quickstart --output-dir runs/study/$name --train-iters 500 "$@" > runs/study/$name.out 2>&1; echo "$name rc=$?" >> runs/study/done.txt; }
run topk --extra --moe-ranks-per-node 1 --save-routing-trace runs/study/topk/trace
run c2r_t1 --router-policy c2r --extra --moe-c2r-top-t 1 --moe-dedup-dispatch --moe-ranks-per-node 1
run c2r_t3 --router-policy c2r --extra --moe-c2r-top-t 3 --moe-dedup-dispatch --moe-ranks-per-node 1
run c2r_t7 --router-policy c2r --extra --moe-c2r-top-t 7 --moe-dedup-dispatch --moe-ranks-per-node 1
run c2r_warm --router-policy c2r --extra --moe-c2r-top-t 3 --moe-c2r-warmup-steps 100 --moe-dedup-dispatch --moe-ranks-per-node 1
run topk_dedup --extra --moe-dedup-dispatch --moe-ranks-per-node 1
