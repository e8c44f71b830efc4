"""Server settings (the `soar serve` flags that are not engine flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from soarllm.errors import ConfigError

API_KEY_ENV = "SOARLLM_API_KEY"


@dataclass(frozen=True)
class ApiKey:
    """One key clients may send. Reports and metrics show ``name``, never ``secret``."""

    name: str
    secret: str = field(repr=False)
    admin: bool = False  # may read every key's usage at GET /v1/usage


def read_api_keys_file(path: str) -> list[ApiKey]:
    """One key a line: ``NAME:KEY`` (the name is what reports show) or a bare ``KEY`` (named
    ``PATH-line-N``); blank lines and lines starting with ``#`` are skipped. A bare key that holds
    a ``:`` must be written ``NAME:KEY``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--api-keys-file {path}: cannot read it ({e.strerror}); give a "
                          "readable file with one key (or NAME:KEY) a line") from None
    keys = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep:
            name, secret = f"{Path(path).name}-line-{number}", line
        name, secret = name.strip(), secret.strip()
        if not name or not secret:
            raise ConfigError(f"--api-keys-file {path}, line {number}: write NAME:KEY with a "
                              "non-empty name and key, or a bare KEY")
        keys.append(ApiKey(name, secret))
    return keys


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: read SOARLLM_API_KEY; "" or unset: no auth
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model name
    max_waiting: int | None = None  # requests waiting in the engine before new ones get 503
    retry_after_s: int = 1
    shutdown_timeout_s: float = 30.0
    max_body_bytes: int = 16 * 2**20
    log_level: str = "info"
    access_log: bool = True
    engine_threads: int | None = None  # torch intra-op threads of the engine; None: automatic
    data_parallel_size: int = 1  # engine replicas behind this server (engine/data_parallel.py)
    public_metrics: bool = False  # /metrics without the API key (for scrapers)
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: no CORS headers
    default_max_tokens: int | None = None  # chat requests without max_tokens; None: to the context
    tokenizer_workers: int = 2  # threads that tokenize prompts off the event loop
    chat_template: str | None = None  # replaces the model's chat template (--chat-template)
    # the model's tool-call syntax (serve/tool_parsers); None: found from the chat template
    tool_call_parser: str | None = None
    more_api_keys: list[str] = field(default_factory=list)  # further --api-key values
    api_keys_file: str | None = None  # NAME:KEY lines (--api-keys-file)
    admin_api_keys: list[str] = field(default_factory=list)  # keys that see all usage
    rate_limit_rpm: int | None = None  # requests per minute per key; None: no limit
    rate_limit_tpm: int | None = None  # tokens per minute per key; None: no limit

    def resolved_api_key(self) -> str | None:
        """A key the server needs (the first), or None when it needs none."""
        keys = self.api_keys()
        return keys[0].secret if keys else None

    def api_keys(self) -> list[ApiKey]:
        """Every key clients may send: --api-key values (or $SOARLLM_API_KEY) named key-1,
        key-2, ...; the --api-keys-file's; --admin-api-key values named admin-1, ..."""
        first = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        plain = [k for k in [first or "", *self.more_api_keys] if k]
        keys = [ApiKey(f"key-{i}", k) for i, k in enumerate(plain, 1)]
        if self.api_keys_file:
            keys += read_api_keys_file(self.api_keys_file)
        keys += [ApiKey(f"admin-{i}", k, admin=True)
                 for i, k in enumerate(self.admin_api_keys, 1)]
        names = [k.name for k in keys]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"API key name(s) {', '.join(twice)} are given twice; give every "
                              "key its own name (--api-keys-file NAME:KEY)")
        secrets = [k.secret for k in keys]
        if len(set(secrets)) != len(secrets):
            same = [k.name for k in keys if secrets.count(k.secret) > 1]
            raise ConfigError(f"the keys named {', '.join(same)} are the same secret; give "
                              "each name its own key")
        return keys


def engine_threads_for(requested: int | None, device: str) -> int | None:
    """Torch threads for an engine that runs the model in the server's own process; None leaves
    torch's own setting.

    On CPU such an engine leaves one core to the HTTP event loop: when both share every core, the
    event loop's work stalls the engine's parallel regions (measured on 2 cores: serving
    throughput fell to ~70% of offline with 2 torch threads, ~97% with 1). OMP_NUM_THREADS, when
    set, wins; GPUs need no such care.
    """
    if requested is not None:
        return max(1, requested)
    if os.environ.get("OMP_NUM_THREADS") or not device.startswith("cpu"):
        return None
    return max(1, (os.cpu_count() or 1) - 1)


def model_process_threads(requested: int | None) -> int:
    """Torch threads of the worker process that runs the model when the server keeps it out of
    its own process: every core (--engine-threads, then OMP_NUM_THREADS, win)."""
    if requested is not None:
        return max(1, requested)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, int(env)) if env.isdigit() else max(1, os.cpu_count() or 1)


def runs_model_in_worker(engine_args, data_parallel_size: int, device: str) -> bool:
    """Whether ``soar serve`` runs the model in a worker process (the mp executor at
    tensor_parallel_size 1) rather than in its own: on CPU, unless an executor backend was asked
    for. The forward pass then no longer shares a GIL and the cores' parallel regions with the
    HTTP event loop, the scheduler and detokenization (vLLM v1 splits its engine core from the
    API server for the same reason). Measured on 2 cores, default model, 16 requests 128/128:
    37.2 vs 30.3 tok/s at one stream, 144 vs 95 tok/s at eight (benchmarks/cpu_vs_llamacpp.py
    has the side-by-side with llama-server)."""
    return (device.startswith("cpu") and data_parallel_size == 1
            and engine_args.distributed_executor_backend is None
            and engine_args.tensor_parallel_size == 1
            and engine_args.context_parallel_size == 1)
