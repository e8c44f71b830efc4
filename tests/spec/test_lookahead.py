"""Lookahead decoding: the row layout against a mask built by hand from the method's definition,
the candidate walk, and the engine with lookahead against the engine without it (greedy and
seeded sampling token for token, batched, chunked, preempted, prefix hits)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from soarllm import LLM, SamplingParams
from soarllm.errors import ConfigError
from soarllm.model.runner import ModelRunner
from soarllm.sample.verifier import follow_candidates
from soarllm.spec.lookahead import LookaheadProposer, lookahead_layout
from tests.engine.test_engine import _assert_pool_free as _pool_free
from tests.engine.test_engine import _ids
from tests.spec.helpers import assert_same_tokens_and_logprobs, assert_same_under_pressure

# The engines hold a few short requests: a small KV pool instead of the CPU default (up to 4 GiB,
# millions of these 2 KiB blocks, each a Python object built at start-up).
KV = "32MiB"

GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
ALWAYS = {"method": "lookahead", "lookahead_window_size": 5, "lookahead_ngram_size": 3,
          "lookahead_guess_set_size": 6, "adaptive": False}


def test_layout_equals_the_hand_built_mask():
    """W = 3, N = 3, G = 2. Rows: 0 the input x; 1-2 candidate 0, 3-4 candidate 1; 5-6 level 0 at
    columns 1-2 (column 0 is x); 7-9 level 1 at columns 0-2."""
    lay = lookahead_layout(3, 3, 2)
    sees = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 3], 4: [0, 3, 4], 5: [0, 5], 6: [0, 5, 6],
            7: [0, 7], 8: [0, 5, 8], 9: [0, 5, 6, 9]}
    want = np.zeros((10, 10), dtype=bool)
    for r, cols in sees.items():
        want[r, cols] = True
    assert (lay.mask == want).all()
    assert lay.positions == [0, 1, 2, 1, 2, 1, 2, 1, 2, 3]
    assert lay.candidates == [[1, 2], [3, 4]]
    assert lay.window_rows == [7, 8, 9]
    # every row sees only rows at smaller positions (or itself): the mask is causal in positions
    pos = np.asarray(lay.positions)
    for r in range(10):
        assert (pos[lay.mask[r]] <= pos[r]).all()


def test_the_first_matching_candidate_is_followed():
    lay = lookahead_layout(2, 3, 3)  # candidates at rows [1, 2], [3, 4], [5, 6]
    row_tokens = [9, 5, 6, 7, 8, 7, 1] + [0] * 10
    # sampled at x: 7 -> candidates 1 and 2 start with 7; candidate 1 is followed: its sample
    # after 7 is 8, which its next token (8) matches, so its sample after that is emitted too
    toks = [7, 0, 0, 8, 3, 8, 4]
    picks, best = follow_candidates(toks, lay.candidates, row_tokens)
    assert best == 1 and [toks[p] for p in picks] == [7, 8, 3]
    picks, best = follow_candidates([4, 0, 0, 0, 0, 0, 0], lay.candidates, row_tokens)
    assert best == -1 and picks == [0]


def test_window_update_makes_ngrams():
    p = LookaheadProposer(window=2, ngram=3, guesses=2)
    req = SimpleNamespace(request_id="r", all_token_ids=[1, 2, 3])
    tokens, lay = p.plan(req)
    st = p._state["r"]
    assert st.pool == {1: [(2, 3)]}  # the prompt's own n-gram, to start with
    st.window = [[1, 20], [30, 40]]  # level 0, level 1
    p.update(req, 1, [50, 60], first=3)
    # column 0: first token 3 (the input), then level 1 (30), then the new token 50
    assert st.pool[3] == [(30, 50)]
    assert st.pool[20] == [(40, 60)]
    assert st.window == [[30, 40], [50, 60]]


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
               block_size=4, max_num_seqs=16)


@pytest.fixture(scope="module")
def spec(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
               block_size=4, max_num_seqs=16,
               speculative_config=ALWAYS)


def _prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(4, 10))] * rng.randint(1, 3)
            for _ in range(n)]


def test_lookahead_greedy_equals_plain_batched(plain, spec, monkeypatch):
    moved = []
    orig = ModelRunner._move_kv
    monkeypatch.setattr(ModelRunner, "_move_kv",
                        lambda self, *a: moved.append(a) or orig(self, *a))
    prompts = _prompts(plain.llm_engine.vocab_size, 10, seed=0)
    want = _ids(plain.generate(prompts, GREEDY))
    assert _ids(spec.generate(prompts, GREEDY)) == want
    st = spec.llm_engine.speculator.stats
    assert st.by_method["lookahead"][2] > 0  # guesses were accepted
    assert moved  # some accepted guesses were not the first candidate: their KV was moved
    _pool_free(spec)


def test_lookahead_chunked_preempted_prefix_hits(tiny_llama_dir, plain):
    prompts = _prompts(plain.llm_engine.vocab_size, 8, seed=1)
    want = _ids(plain.generate(prompts, GREEDY))
    small = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_gpu_blocks_override=48,
                max_model_len=120, max_num_batched_tokens=24, speculative_config=ALWAYS)
    assert_same_under_pressure(small, prompts, GREEDY, want, "lookahead")


def test_seeded_sampling_is_identical_with_lookahead(plain, spec):
    prompts = _prompts(plain.llm_engine.vocab_size, 6, seed=2)
    params = SamplingParams(temperature=0.9, top_k=20, max_tokens=40, seed=11, logprobs=1)
    assert_same_tokens_and_logprobs(spec.generate(prompts, params),
                                    plain.generate(prompts, params))


def test_bad_lookahead_configs(tiny_llama_dir):
    with pytest.raises(ConfigError, match="lookahead_ngram_size"):
        LLM(str(tiny_llama_dir), dtype="float32",
            speculative_config={"method": "lookahead", "lookahead_ngram_size": 1})
    with pytest.raises(ConfigError, match="tensor_parallel_size 1"):
        LLM(str(tiny_llama_dir), dtype="float32", tensor_parallel_size=2,
            speculative_config={"method": "lookahead"})


def test_lookahead_through_a_worker_process(tiny_llama_dir, plain):
    """The step message (with its layouts) and the runner's output cross a process boundary, as
    under `soar serve` on CPU."""
    prompts = _prompts(plain.llm_engine.vocab_size, 4, seed=3)
    want = _ids(plain.generate(prompts, GREEDY))
    mp = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
             block_size=4, distributed_executor_backend="mp",
             speculative_config=ALWAYS)
    try:
        assert _ids(mp.generate(prompts, GREEDY)) == want
        assert mp.llm_engine.speculator.stats.by_method["lookahead"][2] > 0
    finally:
        mp.llm_engine.shutdown()
