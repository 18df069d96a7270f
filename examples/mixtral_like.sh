#!/usr/bin/env bash
# Coarse-grained MoE in the shape of Mixtral-8x7B (scaled to 8 layers): hidden 4096, 8 experts of ffn
# 14336, top-2, SwiGLU, EP=8 on one 8-GPU node. Mock data by default; set DATA_ARGS for real data.
set -euo pipefail
DATA_ARGS=${DATA_ARGS:-"--mock-data --tokenizer-type NullTokenizer --vocab-size 32000"}
launch/torchrun_local.sh --nproc 8 \
  --num-layers 8 --hidden-size 4096 --num-attention-heads 32 --num-query-groups 8 \
  --ffn-hidden-size 14336 --seq-length 4096 --max-position-embeddings 4096 \
  --normalization RMSNorm --swiglu --position-embedding-type rope --rotary-base 1000000 \
  --disable-bias-linear --untie-embeddings-and-output-weights \
  --num-experts 8 --moe-router-topk 2 --moe-grouped-gemm \
  --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 \
  --moe-router-dtype fp32 --moe-permute-fusion --expert-model-parallel-size 8 --bf16 \
  $DATA_ARGS --micro-batch-size 1 --global-batch-size 64 --train-iters 500 --lr 1e-4 --min-lr 1e-5 \
  --lr-decay-style cosine --lr-warmup-iters 50 --log-interval 10 \
  --moe-router-policy topk --moe-ranks-per-node 8 --moe-ext-run-log runs/mixtral_like.jsonl "$@"
