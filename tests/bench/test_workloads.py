from __future__ import annotations

import json

import pytest

from soarllm.bench.workloads import WorkloadConfig, build_workload
from soarllm.errors import InvalidRequestError


def test_random_lengths_are_in_tokens(bpe_tokenizer):
    reqs = build_workload(WorkloadConfig("random", num_prompts=5, input_len=40, output_len=9),
                          bpe_tokenizer)
    assert len(reqs) == 5
    for r in reqs:
        assert isinstance(r.prompt, str)
        assert r.output_len == 9
        assert r.prompt_len == len(bpe_tokenizer.encode(r.prompt, add_special_tokens=False))
        assert 36 <= r.prompt_len <= 40  # the re-encoding round trip may merge a few tokens
    again = build_workload(WorkloadConfig("random", num_prompts=5, input_len=40, output_len=9),
                           bpe_tokenizer)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]  # seeded


def test_random_range_ratio(bpe_tokenizer):
    reqs = build_workload(
        WorkloadConfig("random", num_prompts=20, input_len=20, output_len=10, range_ratio=0.5),
        bpe_tokenizer)
    outs = {r.output_len for r in reqs}
    assert min(outs) >= 5 and max(outs) <= 15 and len(outs) > 1


def test_code_workload_mixes_completion_and_editing(bpe_tokenizer):
    reqs = build_workload(WorkloadConfig("code", num_prompts=4, input_len=120, output_len=16),
                          bpe_tokenizer)
    kinds = [r.kind for r in reqs]
    assert kinds.count("code-complete") == 2 and kinds.count("code-edit") == 2
    for r in reqs:
        assert r.prompt_len <= 130
    edit = next(r for r in reqs if r.kind == "code-edit")
    assert "def " in edit.prompt and "type hints" in edit.prompt
    chat = build_workload(WorkloadConfig("code", num_prompts=2, input_len=80, api="chat"),
                          bpe_tokenizer)
    assert all(isinstance(r.prompt, list) and r.prompt[0]["role"] == "user" for r in chat)


def test_chat_is_multi_turn_with_shared_history(bpe_tokenizer):
    reqs = build_workload(WorkloadConfig("chat", num_prompts=6, output_len=20, turns=3,
                                         api="chat"), bpe_tokenizer)
    assert [r.kind for r in reqs] == ["chat-turn1"] * 2 + ["chat-turn2"] * 2 + ["chat-turn3"] * 2
    first, third = reqs[0].prompt, reqs[4].prompt
    assert len(first) == 1 and len(third) == 5  # user, assistant, user, assistant, user
    assert third[0] == first[0]
    assert [m["role"] for m in third] == ["user", "assistant", "user", "assistant", "user"]
    assert reqs[4].prompt_len > reqs[0].prompt_len
    text = build_workload(WorkloadConfig("chat", num_prompts=2, turns=2), bpe_tokenizer)
    assert isinstance(text[0].prompt, str) and text[0].prompt.endswith("assistant\n")


def test_jsonl(tmp_path, bpe_tokenizer):
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "def f(x):", "output_len": 5},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7},
        {"prompt": "x"},
    ]))
    reqs = build_workload(WorkloadConfig("jsonl", num_prompts=10, output_len=3, path=str(path)),
                          bpe_tokenizer)
    assert [r.output_len for r in reqs] == [5, 7, 3]
    assert isinstance(reqs[1].prompt, str)  # rendered with the chat template for completions
    path.write_text('{"nope": 1}\n')
    with pytest.raises(InvalidRequestError, match="prompt"):
        build_workload(WorkloadConfig("jsonl", path=str(path)), bpe_tokenizer)


def test_unknown_workload(bpe_tokenizer):
    with pytest.raises(InvalidRequestError, match="unknown workload"):
        build_workload(WorkloadConfig("sharegpt"), bpe_tokenizer)
