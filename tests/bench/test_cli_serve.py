"""`soar bench serve` end to end against fake servers: JSON, Markdown, plots, launch and ease."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from soarllm.cli.main import main
from tests.bench.chartok import CharTokenizer
from tests.bench.fake_server import FakeConfig, free_port, running_server

FAKE_SERVER = Path(__file__).with_name("fake_server.py")


@pytest.fixture
def char_tokenizer(monkeypatch):
    import soarllm.bench.tokenizer as tok

    monkeypatch.setattr(tok, "load_tokenizer", lambda name: CharTokenizer())


def test_side_by_side_sweep(tmp_path, char_tokenizer, capsys):
    with running_server(FakeConfig(ttft_s=0.05, tpot_s=0.01)) as (fast, _), \
            running_server(FakeConfig(ttft_s=0.15, tpot_s=0.02)) as (slow, _):
        code = main([
            "bench", "serve", "--endpoint", f"fast={fast}", "--endpoint", f"slow={slow}/v1",
            "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
            "--concurrency", "1,4", "--slo", "ttft=100,tpot=50", "--warmup", "0",
            "--output-dir", str(tmp_path), "--no-progress",
        ])
    assert code == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [ep["label"] for ep in doc["endpoints"]] == ["fast", "slow"]
    assert doc["endpoints"][1]["url"] == slow  # the /v1 suffix is dropped
    for ep in doc["endpoints"]:
        assert ep["model"] == "fake-model"
        assert [run["load"]["label"] for run in ep["runs"]] == ["c=1", "c=4"]
        for run in ep["runs"]:
            assert run["metrics"]["completed"] == 4
            assert len(run["requests"]) == 4 and "itl" in run["requests"][0]
    # SLO attainment is the share of requests whose own TTFT and TPOT meet the SLO, recomputed
    # here from the per-request records. Only lower bounds are certain on a busy machine: the
    # slow server's first token never comes before its 150 ms delay, so it misses 100 ms always.
    for ep in doc["endpoints"]:
        for run in ep["runs"]:
            met = [r["success"] and r["ttft"] <= 0.100
                   and (r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) <= 0.050
                   for r in run["requests"]]
            assert run["metrics"]["slo_attainment"] == pytest.approx(sum(met) / len(met))
    slow_runs = doc["endpoints"][1]["runs"]
    assert all(r["ttft"] >= 0.15 for run in slow_runs for r in run["requests"])
    assert [run["metrics"]["slo_attainment"] for run in slow_runs] == [0.0, 0.0]
    assert doc["endpoints"][1]["capacity"] == {
        "variable": "max_concurrency", "value": None, "attainment": None, "target": 0.9,
        "first_failing": 1.0, "lower_bound": False}
    # The fast server's capacity is the highest swept concurrency meeting 90% with every lower
    # one meeting it too (None when c=1 already misses).
    fast = doc["endpoints"][0]
    passing = [run["metrics"]["slo_attainment"] >= 0.9 for run in fast["runs"]]
    want = None if not passing[0] else (4.0 if passing[1] else 1.0)
    assert fast["capacity"]["variable"] == "max_concurrency"
    assert fast["capacity"]["value"] == want
    report = (tmp_path / "report.md").read_text()
    assert "| fast | c=1 | 4/4 |" in report and "Side by side" in report
    assert "TPOT" in report and "Definitions" in report
    for png in ("latency_throughput.png", "distributions.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "soar bench serve" in capsys.readouterr().out


def test_launch_measures_ease(tmp_path, char_tokenizer):
    port = free_port()
    command = f"{sys.executable} {FAKE_SERVER} --port {port} --startup-delay 0.5"
    code = main([
        "bench", "serve", "--endpoint", f"http://127.0.0.1:{port}", "--launch", command,
        "--num-prompts", "2", "--input-len", "8", "--output-len", "3", "--warmup", "0",
        "--output-dir", str(tmp_path), "--no-progress",
    ])
    assert code == 0
    ease = json.loads((tmp_path / "results.json").read_text())["endpoints"][0]["ease"]
    assert ease["time_to_ready_s"] >= 0.5
    # The probe's first token comes after the server is up plus its TTFT of 50 ms.
    assert ease["time_to_first_token_s"] >= ease["time_to_ready_s"] + 0.05
    assert ease["peak_rss_mb"] > 10 and ease["peak_rss_mb"] >= ease["startup_peak_rss_mb"]
    assert (tmp_path / "server-0.log").exists()


def test_launch_failure_is_reported(tmp_path, char_tokenizer, capsys):
    port = free_port()
    code = main([
        "bench", "serve", "--endpoint", f"http://127.0.0.1:{port}",
        "--launch", f"{sys.executable} -c 'import sys; sys.exit(3)'",
        "--num-prompts", "1", "--output-dir", str(tmp_path), "--no-progress",
    ])
    assert code == 1
    assert "exited with code 3" in capsys.readouterr().err
