"""Schemathesis against a live ``soar serve`` over the tiny random model, from the schema the server
itself publishes at /openapi.json (issue #8).

Every operation gets schemathesis' coverage phase (each bound and its neighbours, each enum value,
each required field left out) and a bounded number of fuzzed examples, with data that fits the
schema and data that breaks it. The checks:

- never a 5xx (``not_a_server_error``), and no traceback or error line in the server's log (a
  stream answers 200 before it runs, so a failure inside one shows only there);
- every answer, errors included, has a documented status, content type and body shape;
- whatever the schema forbids is refused with a 4xx (``negative_data_rejection``);
- whatever the schema allows is accepted, or refused only for a rule that ties fields together
  (tests/serve/fuzz_hooks.py), so schema-driven clients and the server agree.

The server runs with a short context (64 tokens): it bounds every request the fuzzer can send, so
the whole run takes a minute or two on two cores. It is the ``schemathesis`` command line that
runs (its pytest plugin cannot load a schema from a fixture under this pytest).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("schemathesis")

from tests.serve.conftest import API_KEY, start_soar_serve  # noqa: E402

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 25  # fuzzed examples per operation (the coverage phase adds its own cases)
SEED = int(os.environ.get("SOAR_FUZZ_SEED", "20240808"))  # fixed: the same cases every run
MAX_MODEL_LEN = 64
HOOKS = Path(__file__).with_name("fuzz_hooks.py")
CHECKS = (
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_schema_conformance", "negative_data_rejection", "schema_valid_request_accepted",
)


@pytest.fixture(scope="module")
def live_server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz-live") / "server.log"
    srv = start_soar_serve(
        str(tiny_model_dir), "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "64",
        "--api-key", API_KEY, "--served-model-name", "tiny", "--no-access-log",
        "--max-request-bytes", str(1 << 20), log_path=log,
    )
    yield srv
    srv.stop()


AUTH = {"Authorization": f"Bearer {API_KEY}"}


# Found by this fuzzing, on the real engine (the fuzz test below, run after these, also checks
# that they left no traceback in the server's log).
@pytest.mark.parametrize("path, body, status, param", [
    # a stop token id beyond the vocabulary, masked while min_tokens holds: was an IndexError
    # in the sampler that failed the request with a 500
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 2,
                         "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    # a top_k beyond int64: was an OverflowError in the runner (500)
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2, "top_k": 10**23}},
     422, "top_k"),
    # TGI's default max_new_tokens (100) in a 64-token context: was refused; now capped
    ("/generate", {"inputs": "hi"}, 200, None),
])
def test_inputs_the_fuzzer_found(live_server, path, body, status, param):
    r = httpx.post(live_server.base_url + path, json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    if param is not None:
        error = r.json()["error"]
        assert param in (error["message"] if isinstance(error, dict) else error), r.text


def _operations(schema: dict) -> int:
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return sum(1 for item in schema["paths"].values() for m in item if m in methods)


def test_schemathesis_against_the_live_server(live_server, tmp_path):
    auth = f"Authorization: Bearer {API_KEY}"
    published = httpx.get(live_server.base_url + "/openapi.json", headers=AUTH, timeout=30)
    assert published.status_code == 200
    num_operations = _operations(published.json())
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", live_server.base_url + "/openapi.json",
        "--header", auth, "--checks", ",".join(CHECKS),
        "--phases", "examples,coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED), "--workers", "1", "--generation-allow-x00", "true",
        "--generation-database", "none", "--request-timeout", "60",
        "--output-sanitize", "false", "--no-color",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-12000:]
    assert f"Tested: {num_operations}" in out, out[-4000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 10 * num_operations, \
        out[-4000:]
    log = live_server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-8000:]
    # the server still serves after all that
    ok = httpx.post(live_server.base_url + "/v1/completions", headers=AUTH,
                    json={"prompt": "hello", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text
