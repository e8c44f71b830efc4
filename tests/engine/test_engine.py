"""Engine behaviour on a tiny random model: scheduling must never change greedy output, and every
KV block must come back to the pool."""

from __future__ import annotations

import random

import pytest

from soarllm import LLM, SamplingParams
from soarllm.errors import ConfigError, ContextLengthError, InvalidRequestError

# The engines hold a few short requests: a small KV pool instead of the CPU default (up to 4 GiB,
# millions of these 2 KiB blocks, each a Python object built at start-up).
KV = "32MiB"

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts(llm, n, lo=3, hi=60, seed=0):
    rng = random.Random(seed)
    vocab = llm.llm_engine.vocab_size
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def _assert_pool_free(llm):
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_running == stats.num_waiting == 0


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
               max_num_seqs=32, block_size=4)


def test_alone_equals_in_a_batch_of_17(llm):
    prompts = _prompts(llm, 17)
    alone = _ids(llm.generate(prompts[:1], GREEDY))
    batched = _ids(llm.generate(prompts, GREEDY))
    assert batched[0] == alone[0]
    for p, out in zip(prompts[1:4], batched[1:4]):
        assert _ids(llm.generate([p], GREEDY))[0] == out
    _assert_pool_free(llm)


def test_chunked_prefill_and_small_budget_do_not_change_output(tiny_llama_dir, llm):
    prompts = _prompts(llm, 6, lo=40, hi=120, seed=1)
    want = _ids(llm.generate(prompts, GREEDY))
    chunked = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
                  block_size=4, max_num_batched_tokens=16,
                  enable_prefix_caching=False)
    assert _ids(chunked.generate(prompts, GREEDY)) == want
    _assert_pool_free(chunked)


def test_preemption_recomputes_without_changing_output(tiny_llama_dir, llm):
    prompts = _prompts(llm, 8, lo=20, hi=40, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = _ids(llm.generate(prompts, params))
    # 30 blocks of 4 tokens: one request fits (max_model_len 100), eight at once do not.
    small = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_gpu_blocks_override=30, max_model_len=100,
                enable_prefix_caching=False)
    assert _ids(small.generate(prompts, params)) == want
    assert small.llm_engine.get_stats().num_preemptions > 0
    _assert_pool_free(small)


def test_prefix_cache_hit_is_counted_and_output_unchanged(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV, block_size=4)
    shared = _prompts(llm, 1, lo=40, hi=40, seed=3)[0]
    a, b = shared + [5, 6, 7], shared + [8, 9]
    cold = _ids(llm.generate([b], GREEDY))
    llm.llm_engine.reset_prefix_cache()
    llm.generate([a], GREEDY)
    before = llm.llm_engine.get_stats().prefix_cache_hits
    out = llm.generate([b], GREEDY)
    assert _ids(out) == cold
    assert out[0].num_cached_tokens == 40
    assert llm.llm_engine.get_stats().prefix_cache_hits - before == 40
    _assert_pool_free(llm)


def test_n_samples_share_prompt_blocks(llm):
    prompt = _prompts(llm, 1, lo=50, hi=50, seed=4)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    _assert_pool_free(llm)


def test_abort_frees_blocks(llm):
    engine = llm.llm_engine
    for i, p in enumerate(_prompts(llm, 5, seed=5)):
        engine.add_request(f"a{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.get_stats().num_free_blocks < engine.get_stats().num_total_blocks
    engine.abort_request([f"a{i}" for i in range(5)])
    assert not engine.has_unfinished_requests()
    _assert_pool_free(llm)


def test_stream_joins_to_full_decode_and_stop_string_cuts_exactly(llm):
    tok = llm.get_tokenizer()
    engine = llm.llm_engine
    prompt = "def parse_args(self, args=None, namespace=None):"
    engine.add_request("s", prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for o in engine.step():
            deltas.append(o.outputs[0].delta_text)
            final = o.outputs[0]
    full = final.text
    assert "".join(deltas) == full == tok.decode(final.token_ids, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    if not stop.strip():
        pytest.skip("generated text has no usable middle substring")
    cut = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))[0]
    c = cut.outputs[0]
    assert c.text == full[: full.index(stop)]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    kept = llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=40, stop=[stop], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_final_only_requests_get_one_output_equal_to_the_streamed_one(llm):
    """output_kind=FINAL_ONLY (what LLM.generate sends): no output until the request finishes,
    then the same text, tokens and finish reason as a request that got one every step."""
    from soarllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    prompt = "import os\nimport sys\n"
    kw = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine.add_request("every", prompt, SamplingParams(**kw))
    engine.add_request("final", prompt,
                       SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **kw))
    seen: dict[str, list] = {"every": [], "final": []}
    while engine.has_unfinished_requests():
        for o in engine.step():
            seen[o.request_id].append(o)
    assert len(seen["every"]) > 1 and len(seen["final"]) == 1 and seen["final"][0].finished
    a, b = seen["every"][-1].outputs[0], seen["final"][0].outputs[0]
    assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
    assert b.text and len(b.token_ids) == 24
    _assert_pool_free(llm)


def test_bad_requests_are_refused_with_a_reason(llm):
    with pytest.raises(ContextLengthError, match="max_tokens"):
        llm.generate("hello", SamplingParams(max_tokens=10_000))
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[1, 2, 10**9]])
    with pytest.raises(InvalidRequestError):
        llm.generate("")
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    _assert_pool_free(llm)


def test_vllm_prompt_dicts_are_the_same_requests(llm):
    # vLLM's TextPrompt / TokensPrompt dicts: the same outputs as the text and the token ids
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    text = "hello world"
    ids = llm.get_tokenizer().encode(text)
    want = [o.outputs[0].token_ids for o in llm.generate([text, ids], params)]
    got = llm.generate([{"prompt": text}, {"prompt_token_ids": ids}], params)
    assert [o.outputs[0].token_ids for o in got] == want
    assert llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids == want[1]
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": text, "multi_modal_data": {}}, params)


def test_kv_cache_too_small_for_one_request(tiny_llama_dir):
    with pytest.raises(ConfigError, match="max_model_len"):
        LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="64KiB")


def test_chat_uses_the_chat_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, ignore_eos=True))
    tok = llm.get_tokenizer()
    assert tok.decode(out[0].prompt_token_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_logprobs_and_prompt_logprobs_are_consistent(llm):
    out = llm.generate("import os", SamplingParams(temperature=0.0, max_tokens=5, logprobs=3,
                                                   prompt_logprobs=2))[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 5
    for tok_id, lp in zip(c.token_ids, c.logprobs):
        assert lp[tok_id].rank == 1  # greedy picks the most likely token
        assert len(lp) == 3
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for tid, lp in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert tid in lp


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    prompt = "class ArgumentParser(_AttributeHolder, _ActionsContainer):"
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(prompt, params)[0].outputs[0].token_ids
    others = _prompts(llm, 8, seed=9)
    mixed = llm.generate([*others[:4], prompt, *others[4:]],
                         [SamplingParams(temperature=1.0, max_tokens=16)] * 4 + [params]
                         + [SamplingParams(temperature=1.0, max_tokens=16)] * 4)
    assert mixed[4].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=16, ignore_eos=True)
    assert llm.generate(prompt, other_seed)[0].outputs[0].token_ids != alone


@pytest.mark.slow  # end to end: a soar chat process
def test_soar_chat_streams_answers(tiny_llama_dir):
    """Two turns of `soar chat`: each streamed reply is transformers' greedy reply to the whole
    conversation so far (its chat template, its argmax), and the next prompt follows it."""
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = subprocess.run(
        [sys.executable, "-m", "soarllm.cli.main", "chat", str(tiny_llama_dir), "--max-tokens", "5",
         "--ignore-eos", "--dtype", "float32"],
        input="hello\nand again\n\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    messages, replies = [], []
    for line in ("hello", "and again"):
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        new = []
        with torch.inference_mode():
            for _ in range(5):
                new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
        replies.append(tok.decode(new, skip_special_tokens=True))
        messages.append({"role": "assistant", "content": replies[-1]})
    # input() writes each "> " prompt to stdout; a reply ends with a newline
    assert proc.stdout == f"> {replies[0]}\n> {replies[1]}\n> "


def test_prompt_logprobs_survive_chunking_and_preemption(tiny_llama_dir, llm):
    prompts = _prompts(llm, 6, lo=30, hi=50, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, prompt_logprobs=1)
    want = llm.generate(prompts, params)
    small = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_gpu_blocks_override=30, max_model_len=100,
                max_num_batched_tokens=16)
    got = small.generate(prompts, params)
    assert small.llm_engine.get_stats().num_preemptions > 0
    for a, b in zip(got, want):
        assert len(a.prompt_logprobs) == len(a.prompt_token_ids)
        for x, y, tid in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]):
            assert x[tid].logprob == pytest.approx(y[tid].logprob, abs=1e-4)
