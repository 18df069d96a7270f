#!/usr/bin/env bash
# Issue 16's measurements in one call of the lent one-GPU machine (carry .whl: megatron-core and
# pytest wheels, see benchmarks/run_gpu_tests.sh), in order of what matters most, each step under
# its own time limit so that a slow step cannot cost the others:
#   1. the compiled kernels against their references: fused router, CUDA-graphed layer (pytest -m gpu)
#   2. benchmarks/moe_layer.py: every row of the layer table beside the floor, kernel-time sums
#   3. benchmarks/ep_step_time.py --nproc 1 --group h: the one-GPU training step, stock vs plugin
#   4. (LIMIT_QWEN > 0) the same for the Qwen3-like model, 4 layers
# There, from the repository root:
#   bash benchmarks/run_layer_speed.sh   (limits in seconds: LIMIT_TESTS LIMIT_LAYER LIMIT_STEP LIMIT_QWEN;
#   ROWS_STEP / ROWS_QWEN: ep_step_time --rows of steps 3 and 4; each row takes about 45 s there)
# Everything lands in $OUT/layer_speed (or runs/layer_speed): logs and JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/wheel_env.sh
source benchmarks/wheel_env.sh
use_wheels megatron.core pytest
out="${OUT:-runs}/layer_speed"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$out/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"

timeout "${LIMIT_TESTS:-150}" python3 -m pytest -p no:cacheprovider -m gpu -rs -q \
  tests/test_gpu_kernels.py tests/test_gpu_cuda_graph.py tests/test_gpu_scmoe_streams.py \
  -k "fused_router or graph or gating or gather_sum or weighted_activation or side_stream or locality_loss" > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" | tee -a "$out/steps.txt"

timeout "${LIMIT_LAYER:-280}" python3 benchmarks/moe_layer.py --iters 30 --warmup 5 --kernels \
  --json "$out/moe_layer.json" > "$out/moe_layer.log" 2>&1
echo "moe_layer rc=$?" | tee -a "$out/steps.txt"

if [ "${LIMIT_STEP:-230}" -gt 0 ]; then   # 3. the 8-layer step (LIMIT_STEP=0 skips it)
  timeout "${LIMIT_STEP:-230}" python3 benchmarks/ep_step_time.py --nproc 1 --group h --warmup 3 --timed 8 \
    --profile-steps 1 --row-timeout 70 --out runs/ep1_step \
    --rows "${ROWS_STEP:-h stock,h device-splits +router kernel,h device-splits +router kernel +full-iteration graph,h c2r +dedup +router kernel}" > "$out/ep_step_time.log" 2>&1
  echo "ep_step_time rc=$?" | tee -a "$out/steps.txt"
  cp runs/ep1_step/ep_step_time.json "$out/" 2>/dev/null
fi
if [ "${LIMIT_QWEN:-0}" -gt 0 ]; then   # 4. the Qwen3-like step, 4 layers (what fits one GPU)
  timeout "$LIMIT_QWEN" python3 benchmarks/ep_step_time.py --nproc 1 --group h --model qwen3-like --layers 4 \
    --warmup 3 --timed 8 --profile-steps 1 --row-timeout 90 --out runs/ep1_qwen \
    --rows "${ROWS_QWEN:-h stock,h device-splits +router kernel,h device-splits +router kernel +full-iteration graph,h c2r +dedup +router kernel}" > "$out/ep_step_time_qwen.log" 2>&1
  echo "ep_step_time qwen3-like rc=$?" | tee -a "$out/steps.txt"
  cp runs/ep1_qwen/ep_step_time.json "$out/ep_step_time_qwen.json" 2>/dev/null
fi
tail -40 "$out/moe_layer.log"
tail -8 "$out/ep_step_time.log"
tail -5 "$out/gpu_tests.log"
# the Markdown tables of docs/performance.md section 3 (stdlib only)
python3 benchmarks/layer_speed_report.py "$out/moe_layer.json" \
  $( [ -f "$out/ep_step_time.json" ] && echo --step "$out/ep_step_time.json" ) > "$out/report.md" 2>&1
tail -30 "$out/report.md"
