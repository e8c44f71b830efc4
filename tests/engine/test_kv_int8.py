"""The int8 KV cache in the engine: nearly the same predictions as the model-dtype cache (teacher-
forced, so one early flip cannot hide everything after it), about twice the tokens for the same
memory, prefix reuse intact, and a clear refusal of storage types it does not have."""

from __future__ import annotations

import random

import numpy as np
import pytest

from soarllm import LLM, SamplingParams
from soarllm.errors import ConfigError
from tests.engine.test_engine import _assert_pool_free, _ids

# The engines hold a few short requests: a small KV pool instead of the CPU default (up to 4 GiB,
# millions of these 2 KiB blocks, each a Python object built at start-up).
KV = "32MiB"

D = 16  # tests/tiny.py: hidden 64 / 4 heads


def _prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(30, 80))] for _ in range(n)]


@pytest.fixture(scope="module")
def pair(tiny_llama_dir):
    kw = dict(dtype="float32", block_size=4, enforce_eager=True, kv_cache_memory="8MiB")
    return LLM(str(tiny_llama_dir), **kw), LLM(str(tiny_llama_dir), kv_cache_dtype="int8", **kw)


def test_teacher_forced_predictions_match_the_full_precision_cache(pair):
    full, int8 = pair
    prompts = _prompts(full.llm_engine.vocab_size, 6, seed=0)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    top_agree, diffs = [], []
    outs = zip(prompts, full.generate(prompts, params), int8.generate(prompts, params))
    for prompt, a, b in outs:
        for tok, la, lb in zip(prompt[1:], a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            top_a = next(t for t, lp in la.items() if lp.rank == 1)
            top_b = next(t for t, lp in lb.items() if lp.rank == 1)
            top_agree.append(top_a == top_b)
            diffs.append(abs(la[tok].logprob - lb[tok].logprob))
    assert np.mean(top_agree) >= 0.95
    assert np.mean(diffs) < 0.05 and max(diffs) < 0.5


def test_greedy_continuations_mostly_unchanged(pair):
    full, int8 = pair
    prompts = _prompts(full.llm_engine.vocab_size, 8, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    agree = []  # tokens before the first difference, per prompt
    for a, b in zip(_ids(full.generate(prompts, params)), _ids(int8.generate(prompts, params))):
        agree.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
    print("tokens before the first difference:", agree)
    assert np.mean(agree) >= 0.75 * params.max_tokens
    _assert_pool_free(int8)


def test_same_memory_holds_about_twice_the_tokens(pair):
    full, int8 = pair
    n_full = full.llm_engine.get_stats().num_total_blocks
    n_int8 = int8.llm_engine.get_stats().num_total_blocks
    # float32 keeps 4 * D bytes per token and head, int8 D values and a 4-byte scale
    assert n_int8 == pytest.approx(n_full * (4 * D) / (D + 4), rel=0.01)


def test_prefix_hit_on_an_int8_cache_gives_the_cold_output(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
              block_size=4, enforce_eager=True,
              kv_cache_dtype="int8")
    shared = sum(_prompts(llm.llm_engine.vocab_size, 2, seed=2), [])[:40]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    cold = _ids(llm.generate([shared + [8, 9]], params))
    llm.llm_engine.reset_prefix_cache()
    llm.generate([shared + [5, 6, 7]], params)
    out = llm.generate([shared + [8, 9]], params)
    assert out[0].num_cached_tokens == 40
    assert _ids(out) == cold
    _assert_pool_free(llm)


def test_unknown_kv_cache_dtype_is_refused_with_the_choices(tiny_llama_dir):
    with pytest.raises(ConfigError, match="int8"):
        LLM(str(tiny_llama_dir), kv_cache_dtype="fp8", enforce_eager=True)


@pytest.mark.model
def test_default_model_perplexity_with_an_int8_cache_within_one_percent(default_model_path):
    # The budget is 0.5-1%. A GEMM that only sums in another order moves this model's
    # perplexity on 1-2k tokens by ~0.3% by itself (measured: the int8 cache at +0.04% / -0.22%
    # with one int4 kernel, +0.71% / +0.64% with another of the same rounding), so the check
    # runs on 2048 tokens against the upper end of the budget.
    from soarllm.eval.backends import LocalBackend
    from soarllm.eval.corpus import corpus_text
    from soarllm.eval.perplexity import perplexity

    kw = dict(dtype="bfloat16", enforce_eager=True, kv_cache_memory="256MiB")
    full = LocalBackend(str(default_model_path), **kw)
    int8 = LocalBackend(str(default_model_path), kv_cache_dtype="int8", **kw)
    ids = full.tokenizer().encode(corpus_text("stdlib", max_chars=20000))[:2048]
    assert len(ids) == 2048
    p_full = perplexity(full, ids, window=512, stride=256).perplexity
    p_int8 = perplexity(int8, ids, window=512, stride=256).perplexity
    assert p_int8 == pytest.approx(p_full, rel=0.01)
    assert p_int8 != p_full  # the int8 cache is really in use
