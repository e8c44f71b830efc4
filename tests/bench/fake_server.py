"""A fake OpenAI-compatible streaming server with known delays: the oracle for bench metrics.

Each request streams ``max_tokens`` one-token chunks: the first after ``ttft_s``, each next one
``tpot_s`` after the previous. Chat streams first send a role-only chunk at once (which is not a
token). Usage is reported when ``stream_options.include_usage`` asks for it (and ``usage`` is on).
Run as a script (``python tests/bench/fake_server.py --port P --startup-delay S``) for launch tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from soarllm.distributed.multiproc import free_port


@dataclass
class FakeConfig:
    ttft_s: float = 0.1
    tpot_s: float = 0.02
    usage: bool = True
    model: str = "fake-model"


@dataclass
class FakeState:
    in_flight: int = 0
    peak_in_flight: int = 0
    arrivals: list[float] = field(default_factory=list)
    payloads: list[dict] = field(default_factory=list)


def make_app(config: FakeConfig, state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model, "object": "model"}]}

    async def stream(body: dict, chat: bool):
        state.in_flight += 1
        state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
        try:
            n = int(body.get("max_tokens") or 16)

            def event(obj: dict) -> str:
                return f"data: {json.dumps(obj)}\n\n"

            def choice(text: str, finish: str | None = None) -> dict:
                if chat:
                    return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
                return {"index": 0, "text": text, "finish_reason": finish}

            if chat:
                yield event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            for i in range(n):
                await asyncio.sleep(config.ttft_s if i == 0 else config.tpot_s)
                yield event({"choices": [choice(f" t{i}")]})
            yield event({"choices": [choice("", "length")]})
            if config.usage and (body.get("stream_options") or {}).get("include_usage"):
                yield event({"choices": [], "usage": {
                    "prompt_tokens": 7, "completion_tokens": n, "total_tokens": n + 7}})
            yield "data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    async def handle(request: Request, chat: bool):
        body = await request.json()
        state.arrivals.append(time.perf_counter())
        state.payloads.append(body)
        if body.get("max_tokens") == -1:
            return JSONResponse({"error": {"message": "bad"}}, status_code=400)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app



@contextlib.contextmanager
def running_server(config: FakeConfig) -> Iterator[tuple[str, FakeState]]:
    """Serve the fake app on 127.0.0.1 in a background thread; yields (url, state)."""
    state = FakeState()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        make_app(config, state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--ttft", type=float, default=0.05)
    parser.add_argument("--tpot", type=float, default=0.01)
    args = parser.parse_args()
    time.sleep(args.startup_delay)
    cfg = FakeConfig(ttft_s=args.ttft, tpot_s=args.tpot)
    uvicorn.run(make_app(cfg, FakeState()), host="127.0.0.1", port=args.port, log_level="warning")
