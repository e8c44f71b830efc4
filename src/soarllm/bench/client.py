"""One streamed request to an OpenAI-compatible server, timed on the client's clock.

Every timestamp is ``time.perf_counter()`` on the client. A *token chunk* is a server-sent event
whose first choice carries generated text (``choices[0].text`` for completions,
``choices[0].delta.content`` for chat); events that carry only a role, a finish reason or the
final usage are not tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from soarllm.bench.workloads import SampleRequest


@dataclass
class Endpoint:
    url: str  # server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    label: str = ""
    api: str = "completions"  # "completions" | "chat"
    model: str | None = None  # None: the first id of GET /v1/models
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True  # vLLM's extension; servers that do not know it ignore it
    eos_token_id: int | None = None  # set: also bias this token away (servers without ignore_eos)
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/").removesuffix("/v1")
        self.label = self.label or self.url

    @property
    def request_url(self) -> str:
        return f"{self.url}/v1/{'chat/completions' if self.api == 'chat' else 'completions'}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestResult:
    """What one request measured. Times are in seconds."""

    success: bool = False
    start_time: float = 0.0  # perf_counter when the request was sent
    ttft: float = 0.0  # send -> first token chunk
    itl: list[float] = field(default_factory=list)  # gaps between consecutive token chunks
    latency: float = 0.0  # send -> end of the response stream (E2EL)
    prompt_len: int = 0  # usage.prompt_tokens when reported, else our tokenizer's count
    output_tokens: int = 0  # usage.completion_tokens, else our tokenizer's count, else chunks
    output_tokens_source: str = "chunks"  # "usage" | "tokenizer" | "chunks"
    usage_output_tokens: int | None = None
    local_output_tokens: int | None = None  # our tokenizer's count of generated_text
    num_chunks: int = 0
    generated_text: str = ""
    error: str = ""
    kind: str = ""
    queue_time: float = 0.0  # time waiting for a concurrency slot before being sent

    @property
    def tpot(self) -> float:
        """Time per output token after the first: (E2EL - TTFT) / (output tokens - 1); 0 if <= 1."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def build_payload(endpoint: Endpoint, request: SampleRequest, model: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": endpoint.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint.api == "chat":
        messages = request.prompt
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        payload["messages"] = messages
    else:
        if not isinstance(request.prompt, str):
            raise ValueError("a /v1/completions request needs a text prompt, not messages")
        payload["prompt"] = request.prompt
    if endpoint.ignore_eos:
        payload["ignore_eos"] = True
        if endpoint.eos_token_id is not None:
            payload["logit_bias"] = {str(endpoint.eos_token_id): -100}
    payload.update(endpoint.extra_body)
    return payload


def _chunk_text(event: dict[str, Any], api: str) -> str | None:
    choices = event.get("choices")
    if not choices:
        return None
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") if api == "chat" else choice.get("text")
    return text or None


async def send_request(
    client: httpx.AsyncClient, endpoint: Endpoint, request: SampleRequest, model: str
) -> RequestResult:
    """Send one streamed request and time it. Never raises: failures come back as results."""
    result = RequestResult(prompt_len=request.prompt_len, kind=request.kind)
    payload = build_payload(endpoint, request, model)
    pieces: list[str] = []
    start = time.perf_counter()
    result.start_time = start
    last_token = start
    try:
        async with client.stream(
            "POST", endpoint.request_url, json=payload, headers=endpoint.headers
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")[:500]
                result.error = f"HTTP {response.status_code}: {body}"
                return result
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (pings), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event and not event.get("choices"):
                    result.error = json.dumps(event["error"])[:500]
                    return result
                now = time.perf_counter()
                text = _chunk_text(event, endpoint.api)
                if text is not None:
                    if result.num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last_token)
                    last_token = now
                    result.num_chunks += 1
                    pieces.append(text)
                usage = event.get("usage")
                if usage:
                    if usage.get("completion_tokens") is not None:
                        result.usage_output_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        result.prompt_len = int(usage["prompt_tokens"])
        result.latency = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        result.error = f"{e.__class__.__name__}: {e}"
        return result
    result.generated_text = "".join(pieces)
    if result.num_chunks == 0:
        result.error = "the stream ended without a single token chunk"
        return result
    result.success = True
    if result.usage_output_tokens is not None:
        result.output_tokens, result.output_tokens_source = result.usage_output_tokens, "usage"
    else:
        result.output_tokens, result.output_tokens_source = result.num_chunks, "chunks"
    return result


async def first_model(client: httpx.AsyncClient, endpoint: Endpoint) -> str:
    """The model id to send: the endpoint's own, or the first one the server lists."""
    if endpoint.model:
        return endpoint.model
    response = await client.get(f"{endpoint.url}/v1/models", headers=endpoint.headers)
    response.raise_for_status()
    data = response.json().get("data") or []
    if not data:
        raise RuntimeError(f"{endpoint.url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])
