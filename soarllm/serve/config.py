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

    def resolved_api_key(self) -> str | None:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return key or None
