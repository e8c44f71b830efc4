#!/usr/bin/env bash
# What runs on a lent GPU machine (H100/H200): the GPU tests, then benchmarks/gpu_roofline.py.
# The machine has PyTorch, Triton and transformers but no network: wheels of what it lacks
# (llguidance) travel in .whl/ (see docs/gpu.md). Logs and results go to $OUT.
#   TEST_TIMEOUT=240 BENCH_TIMEOUT=330 BENCH_ARGS="--layers 32" bash benchmarks/gpu_device_run.sh
# TESTS picks the test paths run first; W4_SWEEP=1 then times the W4A16 kernels per batch bucket
# (benchmarks/triton_quant_gemm.py --dot-sweep) and runs the benchmark with the winners
# (SOARLLM_W4A16_TUNING); LATE_TESTS run last, with what time is left.
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
    ${TESTS:-tests/kernels tests/kernels/test_cuda_graph_replay.py tests/engine/test_gpu_engine.py} \
    2>&1 | tee "$OUT/pytest.log" | tail -15
fi
if [ "${W4_SWEEP:-0}" = 1 ]; then
  timeout "${SWEEP_TIMEOUT:-240}" python3 benchmarks/triton_quant_gemm.py --dot-sweep \
    --out "$OUT/w4_dot_sweep" --tuning-out "$OUT/w4a16_tuning.json" 2>&1 \
    | tee "$OUT/w4_sweep.log" | grep -E '"bucket"|Error|error|wrong' | tail -20
  if [ -s "$OUT/w4a16_tuning.json" ]; then export SOARLLM_W4A16_TUNING="$OUT/w4a16_tuning.json"; fi
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/gpu_roofline.py --out "$OUT/gpu_roofline" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -60
fi
if [ -n "${LATE_TESTS:-}" ]; then
  timeout "${LATE_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider $LATE_TESTS 2>&1 \
    | tee "$OUT/pytest_late.log" | tail -15
fi
