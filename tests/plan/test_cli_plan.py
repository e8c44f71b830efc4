from __future__ import annotations

import json

from soarllm.cli.main import main


def test_plan_table_plot_and_json(tmp_path, capsys):
    code = main(["plan", "--model", "Llama-3-8B", "--input-len", "512", "--output-len", "128",
                 "--slo-ttft", "1000", "--slo-tpot", "50", "--quant", "w4a16",
                 "--hardware", "h100-sxm,rtx-4090,this", "--output-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| NVIDIA H100 SXM 80GB | 8 | w4a16 |" in out and "this machine" in out
    assert "Quadrant: small model x strict latency" in out
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert {r["hardware"] for r in doc["rows"]} == {"h100-sxm", "rtx-4090", "this"}
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_efficiency_file_applies(tmp_path, capsys):
    eff = tmp_path / "cal.json"
    eff.write_text(json.dumps({"hardware": "h100-sxm", "efficiency": {
        "compute_eff": 0.01, "memory_eff": 0.01, "comm_eff": 0.7, "step_overhead_s": 0.0,
        "seq_overhead_s": 0.0, "overlap": True}}))
    args = ["plan", "--model", "Llama-3-8B", "--hardware", "h100-sxm", "--no-measure"]
    assert main(args) == 0
    fast = capsys.readouterr().out
    assert main([*args, "--efficiency", str(eff)]) == 0
    slow = capsys.readouterr().out
    assert fast != slow and "misses SLO" in slow


def test_plan_layouts_for_a_device_budget(tmp_path, capsys):
    code = main(["plan", "Llama-3-70B", "--devices", "16", "--hardware", "ascend-910b",
                 "--input-len", "1024", "--output-len", "256", "--output-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "TP16 x DP1 (TP across nodes)" in out and "Recommended on Huawei Ascend 910B" in out
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert {(r["tp"], r["dp"]) for r in doc["layouts"]} == {(1, 16), (2, 8), (4, 4), (8, 2),
                                                           (16, 1)}
    assert [h["precision"] for h in doc["hold"]] == ["bf16", "fp8", "int4"]


def test_plan_moe_ep_and_million_token_context(capsys):
    assert main(["plan", "DeepSeek-V3", "--devices", "16", "--hardware", "h100-sxm",
                 "--quant", "fp8", "--input-len", "1000000", "--output-len", "1000",
                 "--context-parallel"]) == 0
    out = capsys.readouterr().out
    assert "EP16" in out and "context parallel" in out and "**fewest devices**" in out
    assert "exceed DeepSeek-V3's max_position_embeddings" in out


def test_plan_bad_device_count_is_a_clear_error(capsys):
    assert main(["plan", "DeepSeek-V3", "--devices", "24", "--ep", "on",
                 "--hardware", "h100-sxm"]) == 1
    assert "--devices 16 or 32" in capsys.readouterr().err
