"""Server settings: the CLI flags, the API key from the environment, engine threads."""

from __future__ import annotations

from fastapi.testclient import TestClient

from soarllm.cli.main import build_parser
from soarllm.cli.serve import server_config_from
from soarllm.config import EngineArgs
from soarllm.engine.async_engine import AsyncLLMEngine
from soarllm.serve.app import build_app
from soarllm.serve.config import (
    API_KEY_ENV,
    ServerConfig,
    engine_threads_for,
    model_process_threads,
    runs_model_in_worker,
)
from tests.serve.fake_engine import FakeEngine


def test_cli_flags_become_a_server_config():
    args = build_parser().parse_args([
        "serve", "some-model", "--port", "9001", "--api-key", "k", "--max-waiting", "7",
        "--served-model-name", "a", "b", "--shutdown-timeout", "2.5", "--engine-threads", "3",
        "--no-access-log",
    ])
    assert args.model == "some-model" and args.func is not None
    cfg = server_config_from(args)
    assert (cfg.host, cfg.port, cfg.api_key, cfg.max_waiting) == ("127.0.0.1", 9001, "k", 7)
    assert cfg.served_model_names == ["a", "b"] and cfg.shutdown_timeout_s == 2.5
    assert cfg.engine_threads == 3 and cfg.access_log is False
    default = server_config_from(build_parser().parse_args(["serve"]))
    assert default.host == "127.0.0.1" and default.port == 8000 and default.api_key is None


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServerConfig().resolved_api_key() == "from-env"
    assert ServerConfig(api_key="flag").resolved_api_key() == "flag"
    app = build_app(AsyncLLMEngine(FakeEngine()), ServerConfig(access_log=False))
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 401
        ok = c.get("/v1/models", headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert c.get("/health").status_code == 200
    monkeypatch.delenv(API_KEY_ENV)
    assert ServerConfig().resolved_api_key() is None


def test_engine_threads_leave_a_core_to_the_event_loop(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert engine_threads_for(None, "cpu") == 7
    assert engine_threads_for(None, "cuda") is None
    assert engine_threads_for(2, "cpu") == 2
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert engine_threads_for(None, "cpu") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert engine_threads_for(None, "cpu") is None


def test_model_runs_in_a_worker_process_on_cpu_unless_told(monkeypatch):
    args = EngineArgs(model="m")
    assert runs_model_in_worker(args, 1, "cpu")
    assert not runs_model_in_worker(args, 1, "cuda")
    assert not runs_model_in_worker(args, 2, "cpu")  # data-parallel replicas are processes already
    assert not runs_model_in_worker(EngineArgs(model="m", distributed_executor_backend="uni"), 1,
                                    "cpu")
    assert not runs_model_in_worker(EngineArgs(model="m", tensor_parallel_size=2), 1, "cpu")
    # context-parallel ranks are worker processes already, sharing the cores
    assert not runs_model_in_worker(EngineArgs(model="m", context_parallel_size=2), 1, "cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert model_process_threads(None) == 8  # every core: the HTTP process is idle in the step
    assert model_process_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert model_process_threads(None) == 4
