"""Speculative decoding in the engine: with any proposer, the output is the output without it.

Greedy: token for token, batched, chunked, preempted and with prefix-cache hits. Seeded sampling:
also token for token, because each verified position samples with the very parameters and noise
it would use without speculation (sample/verifier.py explains why that is lossless).
"""

from __future__ import annotations

import random

import pytest

from soarllm import LLM, SamplingParams
from soarllm.errors import ConfigError, InvalidRequestError
from tests.engine.test_engine import _assert_pool_free as _pool_free
from tests.engine.test_engine import _ids

# The engines hold a few short requests: a small KV pool instead of the CPU default (up to 4 GiB,
# millions of these 2 KiB blocks, each a Python object built at start-up).
KV = "32MiB"

ALWAYS = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}


def _prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves (so that prompt lookup finds matches) and random ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 12))]
        out.append(base * rng.randint(2, 4) if i % 3 else base + base[:3])
    return out


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
               block_size=4, max_num_seqs=32)


@pytest.fixture(scope="module")
def spec(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
               block_size=4, max_num_seqs=32,
               speculative_config=ALWAYS)


GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def test_ngram_greedy_equals_plain_batched(plain, spec):
    prompts = _prompts(plain.llm_engine.vocab_size, 12)
    want = _ids(plain.generate(prompts, GREEDY))
    got = _ids(spec.generate(prompts, GREEDY))
    assert got == want
    stats = spec.llm_engine.speculator.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    _pool_free(spec)


def test_ngram_greedy_equals_plain_chunked_preempted_prefix_hits(tiny_llama_dir, plain):
    prompts = _prompts(plain.llm_engine.vocab_size, 8, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = _ids(plain.generate(prompts, params))
    # 36 blocks of 4 tokens and a 12-token step budget: chunked prefill and preemption both happen
    small = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_gpu_blocks_override=36,
                max_model_len=120, max_num_batched_tokens=12, speculative_config=ALWAYS)
    assert _ids(small.generate(prompts, params)) == want
    assert small.llm_engine.get_stats().num_preemptions > 0
    # the same prompts again: prefix-cache hits
    assert _ids(small.generate(prompts, params)) == want
    assert small.llm_engine.get_stats().prefix_cache_hits > 0
    assert small.llm_engine.speculator.stats.num_accepted_tokens > 0
    _pool_free(small)


def test_prediction_equal_to_the_output_is_accepted_whole(plain, spec):
    prompts = _prompts(plain.llm_engine.vocab_size, 3, seed=2)
    want = _ids(plain.generate(prompts, GREEDY))
    for p, w in zip(prompts, want):
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prediction=w)
        out = spec.generate([p], params)[0].outputs[0]
        assert out.token_ids == w
        assert out.rejected_prediction_tokens == 0
        # the prefill emits the first token; then every step verifies up to 8 drafts and emits
        # one more token of its own
        assert out.accepted_prediction_tokens >= len(w) - 1 - -(-(len(w) - 1) // 9)
    _pool_free(spec)


def test_wrong_or_edited_prediction_changes_nothing(plain, spec):
    prompts = _prompts(plain.llm_engine.vocab_size, 4, seed=3)
    want = _ids(plain.generate(prompts, GREEDY))
    rng = random.Random(0)
    vocab = plain.llm_engine.vocab_size
    for p, w in zip(prompts, want):
        edited = list(w)
        for i in rng.sample(range(5, len(edited)), 4):  # an edit in a few places
            edited[i] = (edited[i] + 1) % vocab
        for name, prediction in (("edited", edited),
                                 ("unrelated", [rng.randrange(vocab) for _ in range(30)]),
                                 ("rotated", w[5:] + w[:5])):
            params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                    prediction=prediction)
            for llm in (plain, spec):  # adaptive, and drafting whenever it can
                out = llm.generate([p], params)[0].outputs[0]
                assert out.token_ids == w, name
            if name == "edited":  # drafts through an edit are rejected, then it re-synchronises
                assert out.rejected_prediction_tokens > 0
                assert out.accepted_prediction_tokens > len(w) // 2
    _pool_free(plain)
    _pool_free(spec)


@pytest.mark.parametrize("extra", [
    {},
    pytest.param({"top_k": 5, "top_p": 0.8}, marks=pytest.mark.slow),
    pytest.param({"min_p": 0.05, "repetition_penalty": 1.3, "presence_penalty": 0.5,
                  "frequency_penalty": 0.3}, marks=pytest.mark.slow),
    {"temperature": 0.5, "min_tokens": 30, "logprobs": 2},
])
def test_seeded_sampling_is_identical_with_speculation(plain, spec, extra):
    prompts = _prompts(plain.llm_engine.vocab_size, 6, seed=4)
    kw = dict(temperature=1.0, max_tokens=40, seed=1234) | extra
    want = plain.generate(prompts, SamplingParams(**kw))
    got = spec.generate(prompts, SamplingParams(**kw))
    assert _ids(got) == _ids(want)
    if "logprobs" in extra:
        for a, b in zip(got, want):
            assert [sorted(x) for x in a.outputs[0].logprobs] == \
                [sorted(x) for x in b.outputs[0].logprobs]
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                for t in la:
                    assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-4)
    # and with a prediction of what a different seed produced
    other = _ids(plain.generate(prompts, SamplingParams(**(kw | {"seed": 99}))))
    for p, w, pred in zip(prompts, _ids(want), other):
        out = plain.generate([p], SamplingParams(**kw, prediction=pred))[0].outputs[0]
        assert out.token_ids == w
    _pool_free(spec)


def test_stop_strings_eos_and_max_tokens_cut_inside_accepted_drafts(plain):
    prompts = _prompts(plain.llm_engine.vocab_size, 3, seed=5)
    tok = plain.llm_engine.tokenizer
    full = plain.generate(prompts, GREEDY)
    for p, f in zip(prompts, full):
        ids = f.outputs[0].token_ids
        # a stop token in the middle of the output, and max_tokens shorter than the prediction
        stop_tok = ids[17]
        for kw in ({"stop_token_ids": [stop_tok]}, {"max_tokens": 13}):
            params = SamplingParams(**(dict(temperature=0.0, max_tokens=40, ignore_eos=True) | kw))
            want = plain.generate([p], params)[0].outputs[0]
            got = plain.generate([p], SamplingParams(**(dict(temperature=0.0, max_tokens=40,
                                                             ignore_eos=True, prediction=ids)
                                                        | kw)))[0].outputs[0]
            assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        text = tok.decode(ids[20:23])
        if text.strip():
            params = dict(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[text])
            want = plain.generate([p], SamplingParams(**params))[0].outputs[0]
            got = plain.generate([p], SamplingParams(**params, prediction=ids))[0].outputs[0]
            assert (got.text, got.token_ids) == (want.text, want.token_ids)
    _pool_free(plain)


def test_streaming_deltas_carry_every_accepted_token(plain, spec):
    prompt = _prompts(plain.llm_engine.vocab_size, 1, seed=6)[0]
    want = plain.generate([prompt], GREEDY)[0].outputs[0]
    eng = spec.llm_engine
    eng.add_request("s", prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                               prediction=want.token_ids))
    deltas, texts, steps = [], [], 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            deltas.extend(out.outputs[0].delta_token_ids)
            texts.append(out.outputs[0].delta_text)
        steps += 1
    assert deltas == want.token_ids and "".join(texts) == want.text
    assert steps < len(want.token_ids) // 2  # several tokens per step
    _pool_free(spec)


def test_rejected_draft_blocks_go_back_to_the_pool(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
              block_size=4, enable_prefix_caching=False,
              speculative_config=ALWAYS)
    eng = llm.llm_engine
    prompt = list(range(5, 25))
    eng.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                               num_speculative_tokens=16,
                                               prediction=[7] * 40))
    seen_trim = False
    while eng.has_unfinished_requests():
        eng.step()
        req = next(iter(eng.scheduler.running), None)
        if req is not None:
            blocks = len(eng.kv.block_ids(req.request_id))
            # between steps a request holds no block beyond its known tokens
            assert blocks <= -(-req.num_tokens // 4)
            seen_trim = True
    assert seen_trim
    _pool_free(llm)


def test_bad_speculative_configs_fail_at_start(tiny_llama_dir):
    for cfg, words in [
        ({"method": "medusa"}, "unknown speculative method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"method": "ngram", "k": 3}, "unknown speculative_config key"),
        ({"num_speculative_tokens": 3}, "needs a method"),
        ("{not json", "not valid JSON"),
    ]:
        with pytest.raises(ConfigError, match=words):
            LLM(str(tiny_llama_dir), dtype="float32", speculative_config=cfg)
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
        SamplingParams(num_speculative_tokens=-1)


def test_bench_report_shows_acceptance(spec):
    from soarllm.bench.offline import render_offline, speculation_report

    prompts = _prompts(spec.llm_engine.vocab_size, 4, seed=7)
    spec.generate(prompts, GREEDY)
    stats = spec.llm_engine.speculator.stats
    rep = speculation_report(stats)
    assert rep["num_accepted_tokens"] == sum(stats.accepted_per_position)
    assert rep["num_draft_tokens"] == sum(stats.drafted_per_position)
    # acceptance can only fall with the position: a draft is accepted only after all before it
    per_pos = list(stats.accepted_per_position)
    assert per_pos == sorted(per_pos, reverse=True)
    doc = {"model": "m", "workload": {"name": "w", "input_len": 1, "output_len": 1},
           "throughput": {"num_requests": 1, "request_throughput": 1.0, "output_throughput": 1.0,
                          "total_token_throughput": 1.0},
           "latency_runs": [], "speculative_decoding": rep}
    assert "mean acceptance length" in render_offline(doc)


def test_drafts_never_preempt_another_request():
    from soarllm.config import SchedulerConfig
    from soarllm.engine.kv_cache_manager import KVCacheManager
    from soarllm.engine.request import Request
    from soarllm.engine.scheduler import Scheduler

    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                      max_model_len=64, enable_chunked_prefill=True), kv)
    a = Request("a", list(range(1, 12)), SamplingParams(max_tokens=20), set())
    b = Request("b", list(range(20, 31)), SamplingParams(max_tokens=20), set())
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # both prompts: 11 tokens = 3 blocks each, the whole pool
    sched.update_after_step(out)
    a.append_token(5)
    b.append_token(6)
    a.spec_token_ids = [7, 8, 9, 10, 11, 12]  # would need 2 more blocks
    out = sched.schedule()
    assert sched.num_preemptions == 0 and out.preempted_req_ids == []
    assert out.spec_token_ids == {} and out.num_scheduled_tokens == {"a": 1, "b": 1}
