#!/usr/bin/env bash
# Local launcher: the plugin's pretrain entry on every GPU of this machine (or N CPU gloo ranks).
#   launch/torchrun_local.sh [--nproc N] [--cpu] <Megatron and plugin flags>
# Sets the NCCL/threads environment Megatron expects; extra flags pass through unchanged.
set -euo pipefail
NPROC=""
if [ "${1:-}" = "--nproc" ]; then NPROC="$2"; shift 2; fi
if [ -z "$NPROC" ]; then
  NPROC=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}   # Megatron's comm/compute overlap needs it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m torch.distributed.run --nproc-per-node "$NPROC" \
  --master-port "${MASTER_PORT:-29500}" -m megatron_moe_ext.training.pretrain_gpt "$@"
