"""Suffix ("memory") speculation: guesses from earlier requests' outputs. Oracle: the engine
without speculation (greedy token for token); the memory shows in the acceptance counters."""

from __future__ import annotations

import random

import pytest

from soarllm import LLM, SamplingParams
from soarllm.engine.request import Request
from soarllm.errors import ConfigError
from soarllm.spec.suffix import SuffixProposer
from tests.engine.test_engine import _assert_pool_free as _pool_free
from tests.engine.test_engine import _ids

# The engines hold a few short requests: a small KV pool instead of the CPU default (up to 4 GiB,
# millions of these 2 KiB blocks, each a Python object built at start-up).
KV = "32MiB"

GREEDY = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


def _finished(prompt: list[int], output: list[int]) -> Request:
    req = Request("done", prompt, GREEDY, (), 0.0)
    for t in output:
        req.append_token(t)
    return req


def test_a_learned_continuation_is_proposed_to_a_new_request():
    sp = SuffixProposer(n_min=2, n_max=4)
    sp.learn(_finished([1, 2, 3, 4], [10, 11, 12, 13, 14]))
    # a new request whose own text never saw 3 4 -> 10 ... but ends like the old prompt did
    new = Request("new", [50, 51, 3, 4], GREEDY, (), 0.0)
    assert sp.propose(new, 3) == [10, 11, 12]
    # its own text comes first: here 3 4 was followed by 7 earlier in the request itself
    own = Request("own", [3, 4, 7, 9, 3, 4], GREEDY, (), 0.0)
    assert sp.propose(own, 2) == [7, 9]
    # a context followed by many different tokens is no evidence: nothing is proposed
    for i in range(5):
        sp.learn(_finished([60, 61], [20 + i]))
    assert sp.propose(Request("x", [90, 60, 61], GREEDY, (), 0.0), 2) == []


def test_the_table_is_bounded():
    sp = SuffixProposer(n_min=2, n_max=3, max_entries=50)
    rng = random.Random(0)
    for _ in range(20):
        sp.learn(_finished([rng.randrange(500) for _ in range(5)],
                           [rng.randrange(500) for _ in range(20)]))
    assert len(sp.table) <= 50


def test_suffix_greedy_equals_plain_and_remembers(tiny_llama_dir):
    plain = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV, block_size=4)
    spec = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
               block_size=4, speculative_config={
        "method": "suffix", "num_speculative_tokens": 4, "adaptive": False,
        "prompt_lookup_min": 2})
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(4, 10))] for _ in range(6)]
    want = _ids(plain.generate(prompts, GREEDY))
    assert _ids(spec.generate(prompts, GREEDY)) == want
    st = spec.llm_engine.speculator.stats
    first = st.by_method.get("suffix", [0, 0, 0])[2]
    # the same prompts again: the outputs are in memory now, and they are what comes
    assert _ids(spec.generate(prompts, GREEDY)) == want
    again = st.by_method["suffix"][2] - first
    assert again > 2 * first and again > 6 * 20
    _pool_free(spec)


def test_bad_suffix_config(tiny_llama_dir):
    with pytest.raises(ConfigError, match="suffix_decoding_min_token_prob"):
        LLM(str(tiny_llama_dir), dtype="float32", speculative_config={
            "method": "suffix", "suffix_decoding_min_token_prob": 0})
