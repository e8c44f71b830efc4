"""Several API keys and per-key usage, on a real ``soar serve`` of the tiny model.

The oracle is what the official ``openai`` client reports: the ``usage`` of each response. The
per-key counters at GET /v1/usage and in /metrics (parsed by prometheus_client's own parser) must
add up to those, each key seeing only its own line unless it is an admin key, and no report
ever shows a key's secret.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from soarllm.errors import ConfigError
from soarllm.serve.config import ServerConfig
from tests.serve.conftest import REPO, free_port, start_soar_serve, start_thread_server
from tests.serve.fake_engine import FakeEngine

SECRETS = {"alice": "sk-alice-0001", "bob": "sk-bob:with-colon-0002"}
PLAIN_KEY = "sk-plain-0003"
ADMIN_KEY = "sk-admin-0004"


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("usage")
    keys_file = tmp / "keys.txt"
    keys_file.write_text("# name:key, one a line\n\n"
                         + "".join(f"{n}:{k}\n" for n, k in SECRETS.items()))
    srv = start_soar_serve(
        str(tiny_model_dir), "--served-model-name", "tiny", "--no-access-log",
        "--api-key", PLAIN_KEY, "--api-keys-file", str(keys_file), "--admin-api-key", ADMIN_KEY,
        log_path=tmp / "server.log")
    yield srv
    srv.stop()


def _client(srv, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=key, max_retries=0)


def _usage(srv, key: str) -> dict:
    r = httpx.get(srv.base_url + "/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


def _key_metrics(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("soar:api_key_") and "limit" not in s.labels:
                out[(s.name, s.labels["key_name"])] = s.value
    return out


def test_counters_add_up_to_the_usage_the_responses_report(keyed_server):
    alice = _client(keyed_server, SECRETS["alice"])
    reported = []
    chat = alice.chat.completions.create(
        model="tiny", max_tokens=5, messages=[{"role": "user", "content": "def add(a, b):"}])
    reported.append(chat.usage)
    batch = alice.completions.create(model="tiny", prompt=["import json", "class A:"], n=2,
                                     max_tokens=4, temperature=0.8, seed=1)
    reported.append(batch.usage)
    stream = alice.chat.completions.create(
        model="tiny", max_tokens=6, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "for i in range(3):"}])
    reported.append([c for c in stream if c.usage is not None][-1].usage)
    bob = _client(keyed_server, SECRETS["bob"])
    bob_usage = bob.completions.create(model="tiny", prompt="x = 1", max_tokens=3).usage

    own = _usage(keyed_server, SECRETS["alice"])
    (line,) = own["data"]  # a key sees its own line only
    assert line["key_name"] == "alice"
    assert line["requests"] == len(reported)
    assert line["prompt_tokens"] == sum(u.prompt_tokens for u in reported)
    assert line["completion_tokens"] == sum(u.completion_tokens for u in reported)
    assert line["total_tokens"] == sum(u.total_tokens for u in reported)
    assert line["rate_limited"] == {"requests": 0, "tokens": 0}
    assert own["limits"] == {"requests_per_minute": None, "tokens_per_minute": None}

    everyone = {d["key_name"]: d for d in _usage(keyed_server, ADMIN_KEY)["data"]}
    assert set(everyone) == {"key-1", "alice", "bob", "admin-1"}
    assert everyone["alice"] == line
    assert (everyone["bob"]["requests"], everyone["bob"]["prompt_tokens"],
            everyone["bob"]["completion_tokens"]) == (1, bob_usage.prompt_tokens,
                                                      bob_usage.completion_tokens)
    assert everyone["key-1"]["requests"] == 0

    metrics = httpx.get(keyed_server.base_url + "/metrics",
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    by_key = _key_metrics(metrics)
    for name, usage in everyone.items():
        assert by_key[("soar:api_key_requests_total", name)] == usage["requests"]
        assert by_key[("soar:api_key_prompt_tokens_total", name)] == usage["prompt_tokens"]
        assert by_key[("soar:api_key_generation_tokens_total", name)] \
            == usage["completion_tokens"]
    for secret in [*SECRETS.values(), PLAIN_KEY, ADMIN_KEY]:
        assert secret not in metrics
        assert secret not in str(everyone)


def test_every_key_opens_the_api_and_others_do_not(keyed_server):
    for key in [*SECRETS.values(), PLAIN_KEY, ADMIN_KEY]:
        assert _client(keyed_server, key).models.list().data[0].id == "tiny"
    with pytest.raises(openai.AuthenticationError):
        _client(keyed_server, "sk-alice").models.list()  # a prefix of a key is no key
    r = httpx.get(keyed_server.base_url + "/v1/usage")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_keys_file_format_and_mistakes(tmp_path):
    good = tmp_path / "keys.txt"
    good.write_text("# comment\nteam-a:s3cret\n\nbare-key\n")
    keys = ServerConfig(api_key="", api_keys_file=str(good)).api_keys()
    assert [(k.name, k.secret) for k in keys] == [("team-a", "s3cret"),
                                                 ("keys.txt-line-4", "bare-key")]
    assert "s3cret" not in repr(keys)
    bad = tmp_path / "bad.txt"
    bad.write_text("team-a:\n")
    with pytest.raises(ConfigError, match="line 1"):
        ServerConfig(api_key="", api_keys_file=str(bad)).api_keys()
    twice = tmp_path / "twice.txt"
    twice.write_text("a:one\nb:one\n")
    with pytest.raises(ConfigError, match="same secret"):
        ServerConfig(api_key="", api_keys_file=str(twice)).api_keys()
    with pytest.raises(ConfigError, match="cannot read"):
        ServerConfig(api_key="", api_keys_file=str(tmp_path / "missing")).api_keys()


def test_a_bad_keys_file_stops_soar_serve_before_the_model_loads(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "soarllm.cli.main", "serve", "no-such-model",
         "--port", str(free_port()), "--api-keys-file", str(tmp_path / "missing.txt")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "--api-keys-file" in run.stderr and "cannot read it" in run.stderr
    assert "usage:" not in run.stderr and "no-such-model" not in run.stderr


def test_without_keys_everything_is_charged_to_anonymous():
    srv = start_thread_server(FakeEngine(), ServerConfig(api_key="", access_log=False))
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model=srv.engine.model_name, prompt="a b c", max_tokens=3)
        report = httpx.get(srv.base_url + "/v1/usage").json()
        assert [d["key_name"] for d in report["data"]] == ["anonymous"]
        (line,) = report["data"]
        assert (line["requests"], line["prompt_tokens"], line["completion_tokens"]) == (
            1, r.usage.prompt_tokens, r.usage.completion_tokens)
    finally:
        srv.stop()
