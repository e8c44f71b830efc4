"""Draft-model speculation: a second model (or the target's own first layers) guesses, the target
verifies. Oracles: the engine without speculation (greedy and seeded sampling token for token) and a
fresh draft run on the accepted tokens (the draft's KV after rejections)."""

from __future__ import annotations

import random

import pytest

from soarllm import LLM, SamplingParams
from soarllm.config import EngineArgs
from soarllm.engine.request import Request
from soarllm.errors import ConfigError
from soarllm.spec.draft import DraftModelProposer, draft_engine_args
from tests.engine.test_engine import _assert_pool_free as _pool_free
from tests.engine.test_engine import _ids
from tests.spec.helpers import assert_same_tokens_and_logprobs, assert_same_under_pressure
from tests.tiny import make_tiny_model, train_tokenizer

# The engines hold a few short requests: a small KV pool instead of the CPU default (up to 4 GiB,
# millions of these 2 KiB blocks, each a Python object built at start-up).
KV = "32MiB"

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 14))] for _ in range(n)]


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """A 4-layer tiny llama: its self-draft of 1 or 2 layers disagrees with it often."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-4l"), "llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def plain(deep_dir):
    return LLM(str(deep_dir), dtype="float32", kv_cache_memory=KV, block_size=4, max_num_seqs=16)


def _self_draft(layers: int, k: int = 3) -> dict:
    return {"method": "draft_model", "draft_num_layers": layers, "num_speculative_tokens": k,
            "adaptive": False}


@pytest.fixture(scope="module")
def self_draft(deep_dir):
    return LLM(str(deep_dir), dtype="float32", kv_cache_memory=KV, block_size=4, max_num_seqs=16,
               speculative_config=_self_draft(2))


def test_self_draft_greedy_equals_plain_batched(plain, self_draft):
    prompts = _prompts(plain.llm_engine.vocab_size, 10, seed=0)
    want = _ids(plain.generate(prompts, GREEDY))
    assert _ids(self_draft.generate(prompts, GREEDY)) == want
    st = self_draft.llm_engine.speculator.stats
    assert st.by_method["draft_model"][1] > 0  # drafted
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens  # both accepted and rejected drafts
    _pool_free(self_draft)
    assert not self_draft.llm_engine.speculator.proposers["draft_model"].seqs  # draft state freed


def test_a_draft_equal_to_the_target_is_accepted_whole(deep_dir, plain):
    """A separate draft checkpoint (here: the target's own) with the same tokenizer."""
    prompts = _prompts(plain.llm_engine.vocab_size, 4, seed=1)
    want = _ids(plain.generate(prompts, GREEDY))
    spec = LLM(str(deep_dir), dtype="float32", kv_cache_memory=KV,
               block_size=4, speculative_config={
        "method": "draft", "model": str(deep_dir), "num_speculative_tokens": 4, "adaptive": False})
    assert _ids(spec.generate(prompts, GREEDY)) == want
    st = spec.llm_engine.speculator.stats
    assert st.num_draft_tokens > 0 and st.num_accepted_tokens == st.num_draft_tokens


def test_self_draft_chunked_preempted_prefix_hits(deep_dir, plain):
    prompts = [p * 3 for p in _prompts(plain.llm_engine.vocab_size, 8, seed=2)]
    want = _ids(plain.generate(prompts, GREEDY))
    small = LLM(str(deep_dir), dtype="float32", block_size=4, num_gpu_blocks_override=30,
                max_model_len=100, max_num_batched_tokens=12, speculative_config=_self_draft(1, 4))
    assert_same_under_pressure(small, prompts, GREEDY, want)


def test_seeded_sampling_is_identical_with_a_draft(plain, self_draft):
    prompts = _prompts(plain.llm_engine.vocab_size, 6, seed=3)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=32, seed=7, logprobs=1)
    assert_same_tokens_and_logprobs(self_draft.generate(prompts, params),
                                    plain.generate(prompts, params))


def test_draft_kv_after_rejections_equals_a_fresh_draft(deep_dir):
    """Feed the proposer a conversation in which the target keeps only part of its guesses: each
    next proposal must equal what a fresh draft proposes from the accepted tokens alone."""
    base = EngineArgs(model=str(deep_dir), dtype="float32", block_size=4)
    args = draft_engine_args(base, None, 1, None)
    kept = DraftModelProposer(args, num_blocks=64, max_model_len=512)
    rng = random.Random(4)
    prompt = [rng.randrange(3, 500) for _ in range(9)]
    req = Request("r", prompt, GREEDY, (), 0.0)
    rejections = 0
    for step in range(12):
        k = rng.randint(1, 4)
        guesses = kept.propose(req, k)
        fresh = DraftModelProposer(args, num_blocks=64, max_model_len=512)
        assert guesses == fresh.propose(req, k), f"step {step}"
        # the target keeps a random prefix of the guesses, then adds a token of its own
        n = rng.randint(0, len(guesses))
        rejections += n < len(guesses)
        for t in guesses[:n] + [rng.randrange(3, 500)]:
            req.append_token(t)
    assert rejections > 3
    kept.forget("r")
    assert kept.pool.num_free_blocks == 64


def test_bad_draft_configs_fail_at_start(deep_dir, tmp_path):
    with pytest.raises(ConfigError, match="not fewer than the target's 4 layers"):
        LLM(str(deep_dir), dtype="float32", speculative_config=_self_draft(4))
    with pytest.raises(ConfigError, match="draft_model needs a draft"):
        LLM(str(deep_dir), dtype="float32", speculative_config={"method": "draft_model"})
    with pytest.raises(ConfigError, match="do not apply to method 'ngram'"):
        LLM(str(deep_dir), dtype="float32",
            speculative_config={"method": "ngram", "model": str(deep_dir)})
    other = make_tiny_model(tmp_path / "other", "llama")
    train_tokenizer(other, vocab_size=400)  # same model files, another vocabulary
    with pytest.raises(ConfigError, match="another tokenizer"):
        LLM(str(deep_dir), dtype="float32",
            speculative_config={"method": "draft_model", "model": str(other)})


def test_the_draft_is_skipped_when_it_cannot_pay():
    """Measured: plain steps cost in proportion to their tokens (a large batch) and the draft
    model's run costs a step of its own: no acceptance rate makes drafting pay, so the speculator
    does not even run the draft; on a small batch whose steps cost the same for more tokens it does."""
    from soarllm.spec.config import SpeculativeConfig
    from soarllm.spec.speculator import Speculator

    cfg = SpeculativeConfig(method="draft_model", draft_num_layers=1)
    sp = Speculator(cfg, 512, explore_every=10**9)
    reqs = [(Request(f"r{i}", [1, 2, 3], GREEDY, (), 0.0), 4) for i in range(32)]
    for n in (32, 64, 96, 160):
        sp.observe_step(n, 0.001 * n)
    sp._observe_draft_time(("draft_model", 32), 0.03)
    assert not sp._worth_drafting("draft_model", reqs, 32)
    flat = Speculator(cfg, 512, explore_every=10**9)
    for n in (1, 2, 4, 8):
        flat.observe_step(n, 0.02)
    flat._observe_draft_time(("draft_model", 1), 0.004)
    flat._step = {"base": 1, "methods": set(), "accepted": 0, "t0": 0.0, "ran": True}
    flat._close_step(now=0.02)  # a plain step measured as a whole
    assert flat._worth_drafting("draft_model", reqs[:1], 1)


def test_a_draft_that_does_not_deliver_rests():
    """The estimate says the draft pays (flat step times, cheap draft), but whole engine steps
    that used it delivered fewer tokens per second than plain steps: it rests. Before any plain
    step was measured for this batch size, a plain step comes first."""
    from soarllm.spec.config import SpeculativeConfig
    from soarllm.spec.speculator import Speculator

    sp = Speculator(SpeculativeConfig(method="draft_model", draft_num_layers=1), 512,
                    explore_every=10**9)
    sp.stats.by_method["draft_model"] = [32, 128, 64]  # its acceptance is measured (one half)
    reqs = [(Request("r", [1, 2, 3], GREEDY, (), 0.0), 4)]
    for n in (1, 2, 4, 8):
        sp.observe_step(n, 0.02)
    sp._observe_draft_time(("draft_model", 1), 0.004)
    assert not sp._worth_drafting("draft_model", reqs, 1)  # no plain step measured yet

    def step(methods, accepted, seconds):
        sp._step = {"base": 1, "methods": set(methods), "accepted": accepted, "t0": 0.0,
                    "ran": True}
        sp._close_step(now=seconds)

    step((), 0, 0.04)  # plain: 25 tokens/s
    assert sp._worth_drafting("draft_model", reqs, 1)  # now the draft may show what it does
    step(("draft_model",), 3, 0.12)  # 4 tokens in 0.12 s: 33 tokens/s
    assert sp._worth_drafting("draft_model", reqs, 1)
    for _ in range(3):
        step(("draft_model",), 1, 0.1)  # 2 tokens in 0.1 s: 20 tokens/s
    assert not sp._worth_drafting("draft_model", reqs, 1)


def test_a_draft_learns_its_acceptance_only_where_it_could_pay():
    """Before any of its drafts were verified, the prior acceptance alone would rest a good
    draft forever: it drafts where drafts accepted whole would pay (a small batch, steps that
    cost the same for more tokens), not where even those would not (every token costs its
    share and the draft's run comes on top)."""
    from soarllm.spec.config import SpeculativeConfig
    from soarllm.spec.speculator import Speculator

    def speculator(step_seconds, draft_seconds, batch):
        sp = Speculator(SpeculativeConfig(method="draft_model", draft_num_layers=1), 512,
                        explore_every=10**9)
        for n in (1, 2, 4, 8, 16, 32, 64, 128, 160):
            sp.observe_step(n, step_seconds(n))
        sp._observe_draft_time(("draft_model", batch), draft_seconds)
        return sp

    one = [(Request("r", [1, 2, 3], GREEDY, (), 0.0), 4)]
    # plain 40 ms; 5 tokens 44 ms + 30 ms of drafting: 5 / 74 ms beats 1 / 40 ms
    sp = speculator(lambda n: 0.039 + 0.001 * n, 0.03, 1)
    sp._acceptance["draft_model"] = 0.2  # a pessimistic prior: alone it would say no
    assert sp._worth_drafting("draft_model", one, 1)
    sp.stats.by_method["draft_model"] = [20, 80, 16]  # measured: 0.2, and the prior agrees
    sp._req.clear()
    assert not sp._worth_drafting("draft_model", one, 1)
    many = [(Request(f"r{i}", [1, 2, 3], GREEDY, (), 0.0), 4) for i in range(32)]
    assert not speculator(lambda n: 0.001 * n, 0.03, 32)._worth_drafting("draft_model", many, 32)


def test_a_long_catch_up_is_spread_over_calls(deep_dir):
    """With a catch-up budget of 4 tokens per call, a 20-token prompt is computed over several
    calls (no guesses meanwhile); then the guesses equal those of a draft that took it at once."""
    args = draft_engine_args(EngineArgs(model=str(deep_dir), dtype="float32", block_size=4),
                             None, 1, None)
    slow = DraftModelProposer(args, num_blocks=64, max_model_len=512)
    slow.catch_up_tokens = 4
    rng = random.Random(5)
    req = Request("r", [rng.randrange(3, 500) for _ in range(20)], GREEDY, (), 0.0)
    calls = 0
    while not (guesses := slow.propose(req, 3)):
        calls += 1
        assert calls < 10
    assert calls >= 4
    assert guesses == DraftModelProposer(args, num_blocks=64, max_model_len=512).propose(req, 3)


def test_the_draft_runs_in_one_process_whatever_the_target_splits():
    # the draft is one rank: no tensor / expert parallelism, no all-to-all dispatch of its own
    target = EngineArgs(model="x", tensor_parallel_size=2, enable_expert_parallel=True,
                        expert_dispatch="all_to_all", distributed_executor_backend="mp")
    args = draft_engine_args(target, None, 1, None)
    assert (args.tensor_parallel_size, args.enable_expert_parallel, args.expert_dispatch,
            args.distributed_executor_backend) == (1, False, "all_reduce", None)
