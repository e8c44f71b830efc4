"""Property-based fuzzing of every route from the app's own OpenAPI schema, with data that fits
the schema and data that breaks it: never a 5xx, every answer (errors included) has a documented
status, content type and shape, and whatever the schema forbids is refused with a 4xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

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
from soarllm.serve.app import build_app  # noqa: E402
from soarllm.serve.config import ServerConfig  # noqa: E402
from tests.serve.conftest import API_KEY, start_thread_server  # noqa: E402
from tests.serve.fake_engine import FakeEngine  # noqa: E402

MAX_EXAMPLES = 12  # per operation and generation mode


def _config() -> ServerConfig:
    return ServerConfig(api_key=API_KEY, served_model_names=["fake-model"], access_log=False,
                        max_body_bytes=1 << 20)


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
        response_schema_conformance, negative_data_rejection,
    ])
