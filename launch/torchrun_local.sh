#!/usr/bin/env bash
# Local launcher: the plugin's pretrain entry on every GPU of this machine (or N CPU gloo ranks).
#
#   launch/torchrun_local.sh [--dry-run] [--nproc N] [--cpu] <Megatron and plugin flags>
#
#   --dry-run   print the command it would run and exit 0
#   --nproc N   ranks to start (default: $NPROC, else the GPUs nvidia-smi lists, else torch's count, else 1)
#   --cpu       passed on to the entry: CPU compatibility layer, gloo (needs --nproc)
# Every other flag passes through unchanged to `python -m megatron_moe_ext.training.pretrain_gpt`.
#
# Environment variables (optional):
#   NPROC                        ranks, as --nproc
#   PYTHON                       python that runs torchrun (default: python3; inside the venv, its python)
#   MASTER_PORT                  rendezvous port on localhost (default 29500; change it for a second run)
#   CUDA_DEVICE_MAX_CONNECTIONS  default 1 (Megatron's comm/compute overlap needs it)
#   OMP_NUM_THREADS              default 1 (ranks x threads should not exceed the cores)
# On one node torchrun sets LOCAL_WORLD_SIZE, which the plugin reads when --moe-ranks-per-node is not given.
set -euo pipefail
DRY_RUN=0
NPROC=${NPROC:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --nproc) NPROC="$2"; shift 2 ;;
    *) break ;;
  esac
done
PYTHON=${PYTHON:-python3}
if [ -z "$NPROC" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); then :; else
    NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  fi
  if [ "$NPROC" -lt 1 ]; then NPROC=1; fi
fi
case "$NPROC" in
  ''|*[!0-9]*) echo "torchrun_local.sh: error: --nproc must be a whole number, got '$NPROC'." >&2; exit 2 ;;
esac
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29500}"
  -m megatron_moe_ext.training.pretrain_gpt "$@")
if [ "$DRY_RUN" = 1 ]; then
  echo "# torchrun_local.sh --dry-run: $NPROC rank(s) on this machine"
  printf 'export CUDA_DEVICE_MAX_CONNECTIONS=%q\nexport OMP_NUM_THREADS=%q\n' "$CUDA_DEVICE_MAX_CONNECTIONS" "$OMP_NUM_THREADS"
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
exec "${cmd[@]}"
