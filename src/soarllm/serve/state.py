"""What every route needs, held on ``app.state.soar`` (one per app, no module-level state)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from soarllm.engine.async_engine import AsyncLLMEngine
from soarllm.errors import ModelNotFoundError
from soarllm.serve.config import ServerConfig
from soarllm.serve.metrics import ServerMetrics
from soarllm.serve.rate_limit import RateLimiter
from soarllm.serve.tokenization import TokenizerWorkers
from soarllm.serve.usage import UsageLedger


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    config: ServerConfig
    metrics: ServerMetrics
    model_names: list[str]
    tokenizers: TokenizerWorkers
    started: float = field(default_factory=time.time)
    usage: UsageLedger = field(default_factory=UsageLedger)  # per API key
    limiter: RateLimiter = field(default_factory=RateLimiter)  # per-key rpm / tpm

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def default_model(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str | None) -> str:
        """The served name a request asked for; unknown names are a 404 that lists the known."""
        if name is None or name == "":
            return self.default_model
        if name in self.model_names:
            return name
        raise ModelNotFoundError(
            f"the model {name!r} does not exist on this server; use one of "
            f"{', '.join(repr(n) for n in self.model_names)} (see GET /v1/models)",
            param="model",
        )


def get_state(request: Request) -> ServerState:
    return request.app.state.soar
