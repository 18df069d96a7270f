#!/usr/bin/env bash
# Bring Transformer Engine 2.20.2 to the lent GPU machine, whose transfers take 64 MiB at most
# (../shared/device/README.md). On this side: the 276 MB core wheel split with
# `split -b 56M -d -a 1 <wheel> te_core.part` into git-ignored .te_piece1 ... .te_piece5 (the
# last also holds te_core.md5, the meta package, the torch extension built on that machine, and
# pydantic with its dependencies). Then, back to back while the machine stays warm:
#   bash benchmarks/te_on_device.sh stash          (carry .te_pieceN; N = 1..4)
#   bash benchmarks/te_on_device.sh install && ... (carry .te_piece5 and .whl)
# install leaves megatron-core and TE importable from /tmp/site (export PYTHONPATH=/tmp/site:$PWD).
set -euo pipefail
mkdir -p /tmp/te_pieces
case "$1" in
  stash)
    cp .te_piece*/te_core.part* /tmp/te_pieces/ && ls -la /tmp/te_pieces ;;
  install)
    cp .te_piece5/te_core.part* /tmp/te_pieces/
    cat /tmp/te_pieces/te_core.part* > /tmp/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl
    echo "$(cat .te_piece5/te_core.md5)  /tmp/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl" | md5sum -c -
    pip="python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site"
    $pip .whl/*.whl .te_piece5/pydantic*.whl .te_piece5/annotated_types*.whl .te_piece5/typing_*.whl
    $pip --upgrade /tmp/transformer_engine_cu13-*.whl .te_piece5/transformer_engine-2.20.2-py3-none-any.whl
    mkdir -p /tmp/te_ext && (cd /tmp/te_ext && python3 -m zipfile -e "$OLDPWD"/.te_piece5/transformer_engine_torch-*.whl .)
    cp /tmp/te_ext/transformer_engine/wheel_lib/*.so /tmp/site/transformer_engine/wheel_lib/
    PYTHONPATH=/tmp/site python3 -c "import transformer_engine.pytorch as te; print('TE', te.__version__ if hasattr(te, '__version__') else 'ok')" ;;
esac
