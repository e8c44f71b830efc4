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
    fast_att = doc["endpoints"][0]["runs"][0]["metrics"]["slo_attainment"]
    slow_att = doc["endpoints"][1]["runs"][0]["metrics"]["slo_attainment"]
    assert fast_att == 1.0 and slow_att == 0.0  # slow's TTFT (>= 150 ms) misses 100 ms
    assert doc["endpoints"][0]["capacity"]["variable"] == "max_concurrency"
    assert doc["endpoints"][1]["capacity"]["value"] is None
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
