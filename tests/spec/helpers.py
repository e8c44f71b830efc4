"""Checks the speculation tests share: a method's outputs against the engine without it."""

from __future__ import annotations

from tests.engine.test_engine import _assert_pool_free, _ids


def assert_same_tokens_and_logprobs(got, want) -> None:
    """Token for token, and the same candidate tokens in every position's logprobs."""
    assert _ids(got) == _ids(want)
    for a, b in zip(got, want):
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()


def assert_same_under_pressure(llm, prompts, params, want, method: str | None = None) -> None:
    """``llm`` (a small KV pool and step budget) generates ``want`` with chunked prefill and
    preemption, then again with prefix-cache hits, accepting some drafts; its pool ends empty."""
    assert _ids(llm.generate(prompts, params)) == want
    assert llm.llm_engine.get_stats().num_preemptions > 0
    assert _ids(llm.generate(prompts, params)) == want  # again: prefix-cache hits
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0
    stats = llm.llm_engine.speculator.stats
    assert (stats.by_method[method][2] if method else stats.num_accepted_tokens) > 0
    _assert_pool_free(llm)
