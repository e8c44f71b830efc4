#!/usr/bin/env bash
# What runs on a lent GPU machine (H100/H200): the GPU tests, then benchmarks/gpu_roofline.py.
# The machine has PyTorch, Triton and transformers but no network: wheels of what it lacks
# (llguidance) travel in .whl/ (see docs/gpu.md). Logs and results go to $OUT.
#   TEST_TIMEOUT=240 BENCH_TIMEOUT=330 BENCH_ARGS="--layers 32" bash benchmarks/gpu_device_run.sh
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SOARLLM_HOME=/tmp/soarllm-home
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider ${TEST_ARGS:-} \
    tests/kernels tests/kernels/test_cuda_graph_replay.py tests/engine/test_gpu_engine.py 2>&1 \
    | tee "$OUT/pytest.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/gpu_roofline.py --out "$OUT/gpu_roofline" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -60
fi
