"""Server settings (the `soar serve` flags that are not engine flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

API_KEY_ENV = "SOARLLM_API_KEY"


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
    public_metrics: bool = False  # /metrics without the API key (for scrapers)
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: no CORS headers
    default_max_tokens: int | None = None  # chat requests without max_tokens; None: to the context
    tokenizer_workers: int = 2  # threads that tokenize prompts off the event loop
    chat_template: str | None = None  # replaces the model's chat template (--chat-template)

    def resolved_api_key(self) -> str | None:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return key or None


def engine_threads_for(requested: int | None, device: str) -> int | None:
    """Torch threads for the engine thread; None leaves torch's own setting.

    On CPU the engine leaves one core to the HTTP event loop: when both share every core, the
    event loop's work stalls the engine's parallel regions (measured on 2 cores: serving
    throughput fell to ~70% of offline with 2 torch threads, ~97% with 1). OMP_NUM_THREADS, when
    set, wins; GPUs need no such care.
    """
    if requested is not None:
        return max(1, requested)
    if os.environ.get("OMP_NUM_THREADS") or not device.startswith("cpu"):
        return None
    return max(1, (os.cpu_count() or 1) - 1)
