#!/usr/bin/env bash
# The GPU kernel tests (tests/test_gpu_kernels.py, marker `gpu`) on the lent GPU machine. Nothing
# can be downloaded there (../shared/device/README.md), so megatron-core, and pytest if the machine
# lacks it, travel as wheels in the git-ignored .whl/ folder. On this side, once (about 4 MB):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2 pytest pluggy iniconfig packaging pygments
# There, from the repository root (carry .whl):
#   bash benchmarks/run_gpu_tests.sh [more pytest arguments]
# It installs the wheels into runs/wheel-site (benchmarks/wheel_env.sh) unless megatron-core and pytest import already, runs
# `pytest -m gpu -rs tests/test_gpu_kernels.py tests/test_gpu_cuda_graph.py tests/test_gpu_scmoe_streams.py`, and copies the log to $OUT when that is set.
# Exit status: pytest's (0 only if every test passed or skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/wheel_env.sh
source benchmarks/wheel_env.sh
use_wheels megatron.core pytest
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', '| capability', torch.cuda.get_device_capability() if torch.cuda.is_available() else '-')"
mkdir -p runs
log=runs/gpu_tests.log
set +e
python3 -m pytest -p no:cacheprovider -m gpu -rs -v tests/test_gpu_kernels.py tests/test_gpu_cuda_graph.py tests/test_gpu_scmoe_streams.py "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
[ -n "${OUT:-}" ] && cp "$log" "$OUT/gpu_tests.log"
exit "$rc"
