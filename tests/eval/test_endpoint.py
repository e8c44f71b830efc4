"""soar eval over an endpoint: a live `soar serve` of the same tiny model gives the same
perplexity as the local engine (prompt logprobs through echo + logprobs)."""

from __future__ import annotations

import json
import sys

import pytest

from soarllm.bench.client import Endpoint
from soarllm.bench.launch import LaunchedServer
from soarllm.cli.main import main
from tests.bench.fake_server import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_server(tiny_model_dir):
    port = free_port()
    command = (f"{sys.executable} -m soarllm.cli.main serve {tiny_model_dir} --port {port} "
               f"--max-model-len 512 --kv-cache-memory 64MiB --no-access-log")
    with LaunchedServer(command, Endpoint(f"http://127.0.0.1:{port}")):
        yield f"http://127.0.0.1:{port}"


def test_ppl_endpoint_equals_local(tiny_model_dir, live_server, tmp_path):
    common = ["--corpus", "prose", "--max-tokens", "150", "--window", "64", "--stride", "32"]
    assert main(["eval", "ppl", str(tiny_model_dir), "--max-model-len", "256", *common,
                 "--output-json", str(tmp_path / "local.json")]) == 0
    assert main(["eval", "ppl", "--endpoint", live_server, "--tokenizer", str(tiny_model_dir),
                 *common, "--output-json", str(tmp_path / "remote.json")]) == 0
    local = json.loads((tmp_path / "local.json").read_text())["results"][0]
    remote = json.loads((tmp_path / "remote.json").read_text())["results"][0]
    assert local["scored_tokens"] == remote["scored_tokens"] == 149
    assert remote["perplexity"] == pytest.approx(local["perplexity"], rel=1e-3)
    assert 1 < local["perplexity"] < 10 * 512  # a random model: near its vocabulary size


def test_humaneval_endpoint_runs(live_server, tiny_model_dir, tmp_path):
    out = tmp_path / "he.json"
    assert main(["eval", "humaneval", "--endpoint", live_server, "--tokenizer",
                 str(tiny_model_dir), "--limit", "2", "--max-new-tokens", "8",
                 "--output-json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["num_problems"] == 2 and "pass@1" in doc["pass_at"]
    assert [p["task_id"] for p in doc["problems"]] == ["HumanEval/0", "HumanEval/1"]
