"""Servers for the serving tests, all bound to 127.0.0.1.

- ``fake_server``: the real app and AsyncLLMEngine over FakeEngine, served by uvicorn on a thread
  of the test process (fast; the engine is inspectable).
- ``tiny_server``: a real ``soar serve`` process over a tiny random Llama checkpoint (defined in
  tests/conftest.py: one server for the session, shared with tests/structured).
- ``model_server``: a real ``soar serve`` process over the pulled default model (tests marked
  ``model``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from soarllm.distributed.multiproc import free_port
from soarllm.engine.async_engine import AsyncLLMEngine
from soarllm.serve.app import build_app
from soarllm.serve.config import ServerConfig
from tests.serve.fake_engine import FakeEngine

API_KEY = "test-key-123"
REPO = Path(__file__).resolve().parents[2]



@dataclass
class ThreadServer:
    base_url: str
    engine: AsyncLLMEngine
    fake: FakeEngine
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_thread_server(fake: FakeEngine, config: ServerConfig) -> ThreadServer:
    engine = AsyncLLMEngine(fake)
    app = build_app(engine, config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
        lifespan="on", timeout_graceful_shutdown=2,
    ))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return ThreadServer(f"http://127.0.0.1:{port}", engine, fake, server, thread)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ThreadServer]:
    """Fake engine behind the real app, with an API key (clients send API_KEY)."""
    srv = start_thread_server(
        FakeEngine(step_time=0.001, max_model_len=8192),
        ServerConfig(api_key=API_KEY, served_model_names=["fake-model", "fake-alias"],
                     access_log=False),
    )
    yield srv
    srv.stop()


# -- `soar serve` subprocesses ------------------------------------------------------------------


@dataclass
class ProcessServer:
    base_url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_soar_serve(model: str, *args: str, log_path: Path, env: dict | None = None,
                     startup_timeout: float = 300, new_session: bool = False) -> ProcessServer:
    """``new_session``: the server leads a process group of its own (as under a service manager),
    so a test can signal the group."""
    port = free_port()
    # float32: the tests compare outputs token for token with references computed elsewhere
    cmd = [sys.executable, "-m", "soarllm.cli.main", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", *args]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=new_session)
    srv = ProcessServer(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.time() + startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"soar serve exited ({proc.returncode}):\n{srv.log()[-4000:]}")
        try:
            if httpx.get(srv.base_url + "/health", timeout=2).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            srv.stop()
            raise RuntimeError(f"soar serve did not become healthy:\n{srv.log()[-4000:]}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def model_server(default_model_path, tmp_path_factory) -> Iterator[ProcessServer]:
    log = tmp_path_factory.mktemp("model-serve") / "server.log"
    srv = start_soar_serve("smollm2-135m-instruct", "--max-model-len", "2048",
                           "--no-access-log", log_path=log)
    yield srv
    srv.stop()
