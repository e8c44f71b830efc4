"""`soar serve -tp 2`: killing a worker during a streaming request ends the stream with an error
event, the server exits with status 1 and no process is left behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx

from tests.distributed.test_faults import _gone
from tests.serve.conftest import start_soar_serve

HANG_GUARD_S = 60.0  # a hang guard, not a time limit under test


def _all_gone(pids: list[int]) -> bool:
    """Whether every process in ``pids`` is gone, waiting up to the hang guard (multiprocessing's
    resource tracker exits a moment after the server, when its pipe closes)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not all(_gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids


def test_worker_killed_mid_stream(tiny_gqa_dir, tmp_path):
    srv = start_soar_serve(str(tiny_gqa_dir), "-tp", "2", "--kv-cache-memory", "32MiB",
                           "--served-model-name", "tiny", log_path=tmp_path / "server.log")
    try:
        children = _children(srv.proc.pid)  # the workers and multiprocessing's resource tracker
        workers = [c for c in children
                   if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2, children

        async def stream() -> dict:
            body = {"model": "tiny", "prompt": "def parse(self):", "max_tokens": 400,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            seen = {"chunks": 0, "done": False, "error": None}
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=HANG_GUARD_S) as http, \
                    http.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        seen["done"] = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            seen["error"] = event["error"]
                        elif event["choices"] and event["choices"][0]["text"]:
                            seen["chunks"] += 1
                            if seen["chunks"] == 2:
                                os.kill(workers[1], signal.SIGKILL)
            return seen

        seen = asyncio.run(asyncio.wait_for(stream(), HANG_GUARD_S))
        rc = srv.proc.wait(timeout=HANG_GUARD_S)
    finally:
        srv.stop()
    log = srv.log()[-3000:]
    assert seen["error"] is not None and "rank 1" in seen["error"]["message"], (seen, log)
    assert seen["error"]["type"] == "engine_error", seen
    assert seen["chunks"] < 400, seen
    assert rc == 1, log
    assert _all_gone(children), log


def test_worker_dying_while_idle_stops_the_server(tiny_gqa_dir, tmp_path):
    """No request in flight: the dead worker is still noticed (the executor polls its workers'
    exit status), /health stops answering 200 and the server exits with status 1."""
    srv = start_soar_serve(str(tiny_gqa_dir), "-tp", "2", "--kv-cache-memory", "32MiB",
                           log_path=tmp_path / "server.log")
    try:
        children = _children(srv.proc.pid)
        workers = [c for c in children
                   if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        os.kill(workers[0], signal.SIGKILL)
        rc = srv.proc.wait(timeout=HANG_GUARD_S)
    finally:
        srv.stop()
    log = srv.log()[-3000:]
    assert rc == 1 and "rank 0" in log, log
    assert _all_gone(children), log
