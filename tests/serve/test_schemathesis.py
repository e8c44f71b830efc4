"""Property-based fuzzing of every route from the app's own OpenAPI schema (over the fake engine;
tests/serve/test_fuzz_live.py does the same against a live ``soar serve``), with data that fits
the schema and data that breaks it: never a 5xx, every answer (errors included) has a documented
status, content type and shape, whatever the schema forbids is refused with a 4xx, and whatever
it allows is accepted unless a rule ties fields together (tests/serve/fuzz_hooks.py)."""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

import jsonschema_rs  # noqa: E402  (schemathesis' own validator)
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from soarllm.engine.async_engine import AsyncLLMEngine  # noqa: E402
from soarllm.sampling_params import (  # noqa: E402
    MAX_ABS_PENALTY,
    MAX_LOGPROBS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
)
from soarllm.serve.app import build_app  # noqa: E402
from soarllm.serve.config import ServerConfig  # noqa: E402
from tests.serve.conftest import API_KEY, start_thread_server  # noqa: E402
from tests.serve.fake_engine import FakeEngine  # noqa: E402
from tests.serve.fuzz_hooks import schema_valid_request_accepted  # noqa: E402

MAX_EXAMPLES = 12  # per operation and generation mode


def _config() -> ServerConfig:
    return ServerConfig(api_key=API_KEY, served_model_names=["fake-model"], access_log=False,
                        max_body_bytes=1 << 26)  # fuzzed negative bodies must meet the
    # validators, not the body-size limit (a 413 is not in the rejections schemathesis expects)


def _fake() -> FakeEngine:
    # short context and no step delay: a fuzzed request can never run long
    return FakeEngine(max_model_len=64, step_time=0.0, max_num_seqs=512)


schema = schemathesis.openapi.from_dict(build_app(AsyncLLMEngine(_fake()), _config()).openapi())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                allow_x00=True)


@pytest.fixture(scope="module")
def fuzz_server():
    srv = start_thread_server(_fake(), _config())
    yield srv
    srv.stop()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzz_server):
    response = case.call(base_url=fuzz_server.base_url,
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    case.validate_response(response, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance, negative_data_rejection, schema_valid_request_accepted,
    ])


# -- the schema's verdict is the server's, at every bound ---------------------------------------

V = _fake().vocab_size  # the fake tokenizer's, which the engine and the tokenizer share
L = _fake().max_model_len
C = {"prompt": [5], "max_tokens": 1}  # one prompt token: max_tokens can reach L - 1 exactly
M = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
G = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}


def _with(base: dict, **fields) -> dict:
    return {**base, **fields}


def _tgi(**parameters) -> dict:
    return {**G, "parameters": {**G["parameters"], **parameters}}


BOUNDARY_BODIES = [
    *(("/v1/completions", _with(C, temperature=t))
      for t in (0, MAX_TEMPERATURE, MAX_TEMPERATURE + 0.5, -0.1)),
    *(("/v1/completions", _with(C, top_p=p)) for p in (0, 1, 1.01)),
    *(("/v1/completions", _with(C, n=n)) for n in (MAX_N, MAX_N + 1, 0)),
    *(("/v1/completions", _with(C, top_k=k)) for k in (-1, -2, MAX_TOP_K, MAX_TOP_K + 1)),
    *(("/v1/completions", _with(C, min_p=p)) for p in (1, 1.1)),
    *(("/v1/completions", _with(C, repetition_penalty=r))
      for r in (MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY + 0.5, 0)),
    *(("/v1/completions", _with(C, presence_penalty=p))
      for p in (-MAX_ABS_PENALTY, MAX_ABS_PENALTY, MAX_ABS_PENALTY + 0.5)),
    *(("/v1/completions", _with(C, logprobs=k)) for k in (MAX_LOGPROBS, MAX_LOGPROBS + 1)),
    *(("/v1/completions", _with(C, stop=s)) for s in (
        ["a"] * MAX_STOP_STRINGS, ["a"] * (MAX_STOP_STRINGS + 1), [""], "", "a")),
    *(("/v1/completions", _with(C, seed=s)) for s in (-2**63, 2**63 - 1, 2**63, -2**63 - 1)),
    *(("/v1/completions", _with(C, max_tokens=m)) for m in (L - 1, L, 2.0, 2.5)),
    *(("/v1/completions", _with(C, prompt=p)) for p in (
        [V - 1], [V], [-1], [], "", [[5], [6]], [[5], []], "x" * 10, ["a", ""])),
    *(("/v1/completions", _with(C, stop_token_ids=s)) for s in ([V - 1], [V], [-1])),
    *(("/v1/completions", _with(C, logit_bias=b)) for b in ({}, None, {"5": 1.0})),
    ("/v1/completions", _with(C, prompt="a", suffix="b")),
    *(("/v1/chat/completions", _with(M, messages=m)) for m in (
        [], [{"role": "tool", "content": "x"}], [{"role": "user", "content": []}],
        [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "assistant", "content": "a", "tool_calls": []}],
        [{"role": "assistant", "content": "a", "tool_calls": [{"id": "1"}]}])),
    *(("/v1/chat/completions", _with(M, **{name: value})) for name, value in (
        ("tools", []), ("tools", [{"type": "function"}]), ("tool_choice", "none"),
        ("tool_choice", "required"), ("response_format", {"type": "text"}),
        ("response_format", {"type": "json_object"}), ("modalities", ["text"]),
        ("modalities", ["audio"]), ("store", False), ("store", True),
        ("service_tier", "default"), ("service_tier", "flex"), ("function_call", "none"),
        ("audio", None), ("audio", {}), ("max_completion_tokens", 0), ("logprobs", True))),
    *(("/generate", _tgi(**{name: value})) for name, value in (
        ("top_k", MAX_TOP_K), ("top_k", MAX_TOP_K + 1), ("seed", 2**64 - 1), ("seed", 2**64),
        ("temperature", MAX_TEMPERATURE), ("temperature", 0), ("top_p", 0.5), ("top_p", 1.0),
        ("stop", [""]), ("stop", ["a"]), ("typical_p", None), ("typical_p", 0.5),
        ("best_of", 1), ("best_of", 2), ("watermark", False), ("watermark", True),
        ("max_new_tokens", None), ("top_n_tokens", MAX_LOGPROBS + 1))),
    ("/generate", {**G, "inputs": ""}),
    ("/generate", {**G, "stream": True}),
    ("/generate_stream", {**G, "stream": True}),
    *(("/tokenize", body) for body in (
        {"prompt": "a"}, {"messages": M["messages"]}, {"prompt": "a", "messages": M["messages"]},
        {}, {"prompt": None}, {"messages": []})),
    *(("/detokenize", {"tokens": t}) for t in ([V - 1], [V], [-1], [])),
]


@pytest.fixture(scope="module")
def published(fuzz_server):
    r = httpx.get(fuzz_server.base_url + "/openapi.json",
                  headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
    return r.json()


@pytest.mark.parametrize("path, body", BOUNDARY_BODIES)
def test_the_schema_says_what_the_server_enforces(fuzz_server, published, path, body):
    """jsonschema_rs (the validator schemathesis uses), reading the published schema, and the
    server agree on every bound; what they refuse is a 4xx."""
    ref = published["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    validator = jsonschema_rs.Draft202012Validator(
        {**ref["schema"], "components": published["components"]})
    r = httpx.post(fuzz_server.base_url + path, json=body, timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code < 500, r.text
    assert (r.status_code < 400) == validator.is_valid(body), (r.status_code, r.text)
