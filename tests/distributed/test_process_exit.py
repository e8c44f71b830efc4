"""The engine process going away (SIGTERM, SIGKILL, Ctrl-C) leaves no worker process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed.test_faults import _gone

# Hang guard only: workers notice a vanished parent within about a second.
HANG_GUARD_S = 20.0

# Ctrl-C as in a terminal: a shell's background job (`cmd &`, nohup) starts with SIGINT ignored,
# and Python then keeps ignoring it; the engine process gets Python's own handler back first.
SCRIPT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from soarllm.config import EngineArgs
from soarllm.engine.llm_engine import LLMEngine
engine = LLMEngine(EngineArgs(model=sys.argv[1], dtype="float32", kv_cache_memory="32MiB",
                              tensor_parallel_size=2, distributed_executor_backend=sys.argv[2]))
print(" ".join(map(str, engine.executor.worker_pids)), flush=True)
time.sleep(600)
"""


# SIGTERM without a handler ends the process like SIGKILL (the workers' parent watch); Ctrl-C
# (SIGINT) unwinds it (the executor's exit hook)
# (the Ray backend: the actors of a local cluster the engine started, which Ray ends with its driver)
@pytest.mark.parametrize("backend", ["mp", "ray"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_engine_process_exit_stops_its_workers(tiny_gqa_dir, sig, backend):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_gqa_dir), backend],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "SOARLLM_ENFORCE_EAGER": "1"})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and not any(_gone(p) for p in pids)
        proc.send_signal(sig)
        proc.wait(timeout=HANG_GUARD_S)
        deadline = time.monotonic() + HANG_GUARD_S
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in pids), "a worker outlived its engine process"
    finally:
        proc.kill()
        proc.wait()
