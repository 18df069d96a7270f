#!/usr/bin/env bash
# Fine-grained MoE in the shape of Qwen3-30B-A3B (scaled to 16 layers): hidden 2048, 128 experts of
# ffn 768, top-8, SwiGLU, EP=8 on one 8-GPU node. Mock data by default; set DATA_ARGS for real data.
set -euo pipefail
DATA_ARGS=${DATA_ARGS:-"--mock-data --tokenizer-type NullTokenizer --vocab-size 151936"}
launch/torchrun_local.sh --nproc 8 \
  --num-layers 16 --hidden-size 2048 --num-attention-heads 32 --num-query-groups 4 --kv-channels 128 \
  --qk-layernorm --ffn-hidden-size 6144 --seq-length 4096 --max-position-embeddings 4096 \
  --normalization RMSNorm --swiglu --position-embedding-type rope --rotary-base 1000000 \
  --disable-bias-linear --untie-embeddings-and-output-weights \
  --num-experts 128 --moe-router-topk 8 --moe-ffn-hidden-size 768 --moe-grouped-gemm \
  --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3 \
  --moe-router-dtype fp32 --moe-permute-fusion --expert-model-parallel-size 8 --bf16 \
  $DATA_ARGS --micro-batch-size 1 --global-batch-size 64 --train-iters 500 --lr 3e-4 --min-lr 3e-5 \
  --lr-decay-style cosine --lr-warmup-iters 50 --log-interval 10 \
  --moe-router-policy topk --moe-ranks-per-node 8 --moe-ext-run-log runs/qwen3_moe_like.jsonl "$@"
