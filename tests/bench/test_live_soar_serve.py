"""soar bench serve end to end against a live `soar serve` (a tiny random model), launched by the
benchmark itself so the ease figures are measured too."""

from __future__ import annotations

import json
import sys

import pytest

from soarllm.cli.main import main
from tests.bench.fake_server import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-serve"), "llama")


def test_bench_against_live_soar_serve(tiny_model_dir, tmp_path):
    port = free_port()
    serve = (f"{sys.executable} -m soarllm.cli.main serve {tiny_model_dir} --port {port} "
             f"--max-model-len 256 --kv-cache-memory 64MiB --no-access-log")
    code = main([
        "bench", "serve", "--endpoint", f"soar=http://127.0.0.1:{port}", "--launch", serve,
        "--tokenizer", str(tiny_model_dir), "--num-prompts", "4", "--input-len", "32",
        "--output-len", "8", "--concurrency", "1,4", "--slo", "ttft=60000,tpot=60000",
        "--output-dir", str(tmp_path), "--no-progress",
    ])
    assert code == 0, (tmp_path / "server-0.log").read_text()[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    (ep,) = doc["endpoints"]
    assert ep["ease"]["time_to_first_token_s"] >= ep["ease"]["time_to_ready_s"] > 0
    assert ep["ease"]["peak_rss_mb"] > 50
    for run in ep["runs"]:
        m = run["metrics"]
        assert m["completed"] == 4 and m["failed"] == 0
        # ignore_eos: every request generates exactly max_tokens, as the server's usage says.
        assert all(r["output_tokens"] == 8 and r["output_tokens_source"] == "usage"
                   for r in run["requests"])
        assert all(30 <= r["prompt_len"] <= 34 for r in run["requests"])
        assert run["token_check"]["requests_compared"] == 4
        assert m["ttft_ms"]["mean"] > 0 and m["tpot_ms"]["mean"] > 0
        # attainment: the share of requests whose own TTFT and TPOT meet the SLO (60 s each)
        met = [r["ttft"] <= 60 and (r["latency"] - r["ttft"]) / 7 <= 60 for r in run["requests"]]
        assert m["slo_attainment"] == pytest.approx(sum(met) / 4)
    # capacity: the highest swept concurrency meeting 90% with every lower one meeting it too
    passing = [run["metrics"]["slo_attainment"] >= 0.9 for run in ep["runs"]]
    want = None if not passing[0] else (4 if passing[1] else 1)
    assert ep["capacity"]["value"] == want
    assert ep["capacity"]["lower_bound"] == all(passing)
