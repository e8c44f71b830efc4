"""Failure containment in LLMEngine.step, on a tiny random Llama: a forward that raises for one
request (its prompt holds a marker token) fails that request only, and every other request's
greedy output still equals Hugging Face transformers' greedy output on the same weights; a forward
that fails for everyone fails the step's requests with an error naming it, the engine goes on,
and persistent failure makes the async engine unhealthy."""

from __future__ import annotations

import asyncio

import pytest
import torch

from soarllm import LLM, SamplingParams
from soarllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from soarllm.engine.failures import RequestFailedError

N_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), do_sample=False, max_new_tokens=N_TOKENS,
                             min_new_tokens=N_TOKENS)
    return out[0, len(ids):].tolist()


def _prompts(llm) -> dict[str, list[int]]:
    tok = llm.get_tokenizer()
    texts = {"a": "def parse_args(argv):", "b": "import collections\n\nclass",
             "c": "    return json.dumps(obj, indent=2)"}
    return {k: tok.encode(v) for k, v in texts.items()}


def _marker(llm, references: dict[str, list[int]], prompts: dict[str, list[int]]) -> int:
    """A token id that no prompt and no reference output contains."""
    used = {t for ids in [*references.values(), *prompts.values()] for t in ids}
    return next(t for t in range(len(llm.get_tokenizer()) - 1, 0, -1) if t not in used)


def _break_forward(monkeypatch, llm, when):
    """Make the model step (the decoder stack the runner calls) raise when ``when(input_ids)``
    holds."""
    runner = llm.llm_engine.executor.runner
    original = runner.backbone

    def forward(input_ids, *args, **kwargs):
        if when(input_ids):
            raise RuntimeError("injected forward failure")
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(runner, "backbone", forward)


def _run(engine, requests: dict[str, list[int]]):
    for rid, ids in requests.items():
        engine.add_request(rid, ids, GREEDY)
    outputs, failures = {}, {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        failures.update(engine.take_failures())
    return outputs, failures


def _all_blocks_free(engine) -> bool:
    stats = engine.get_stats()
    return stats.num_free_blocks == stats.num_total_blocks


def test_a_request_that_breaks_the_forward_fails_alone(llm, hf, monkeypatch):
    engine = llm.llm_engine
    prompts = _prompts(llm)
    references = {k: _hf_greedy(hf, ids) for k, ids in prompts.items()}
    marker = _marker(llm, references, prompts)
    clean, failures = _run(engine, prompts)
    assert not failures and clean == references  # the oracle holds without a fault
    _break_forward(monkeypatch, llm, lambda ids: bool((ids == marker).any()))
    poisoned = {"a": prompts["a"], "poison": prompts["b"][:3] + [marker] + prompts["b"][3:],
                "b": prompts["b"], "c": prompts["c"]}
    outputs, failures = _run(engine, poisoned)
    assert set(failures) == {"poison"} and set(outputs) == {"a", "b", "c"}
    assert isinstance(failures["poison"], RequestFailedError)
    assert "injected forward failure" in failures["poison"].message
    assert "other requests were not affected" in failures["poison"].message
    assert outputs == references
    assert _all_blocks_free(engine) and engine.num_consecutive_failed_steps == 0


def test_a_request_sharing_a_failed_requests_new_prefix_blocks_is_recomputed(llm, hf,
                                                                              monkeypatch):
    """Both arrive in one step; the survivor finds the failed request's prompt blocks in the
    prefix cache before their KV is written. It must be recomputed, not read that KV."""
    engine = llm.llm_engine
    engine.reset_prefix_cache()
    tok = llm.get_tokenizer()
    shared = tok.encode("class ArgumentParser(_AttributeHolder, _ActionsContainer):\n"
                        "    def __init__(self, prog=None, usage=None, description=None,")
    assert len(shared) >= 3 * llm.llm_engine.cache_config.block_size
    survivor = shared + tok.encode(" epilog")
    reference = _hf_greedy(hf, survivor)
    marker = _marker(llm, {"s": reference}, {"s": survivor})
    _break_forward(monkeypatch, llm, lambda ids: bool((ids == marker).any()))
    outputs, failures = _run(engine, {"poison": shared + [marker], "survivor": survivor})
    assert set(failures) == {"poison"}
    assert outputs == {"survivor": reference}
    assert _all_blocks_free(engine)


def test_a_broken_forward_fails_the_step_and_the_engine_goes_on(llm, hf, monkeypatch):
    engine = llm.llm_engine
    prompts = _prompts(llm)
    broken = {"on": True}
    _break_forward(monkeypatch, llm, lambda ids: broken["on"])
    for attempt in range(1, 4):
        outputs, failures = _run(engine, {f"{k}{attempt}": v for k, v in prompts.items()})
        assert not outputs and len(failures) == 3
        message = next(iter(failures.values())).message
        assert "forward pass" in message and "injected forward failure" in message
        assert engine.num_consecutive_failed_steps == attempt
        assert _all_blocks_free(engine)

    async def refused_by_the_async_engine() -> bool:
        engine_async = AsyncLLMEngine(engine)
        engine_async.start()
        healthy = engine_async.is_healthy
        with pytest.raises(EngineDeadError):
            await engine_async.add_request("x", prompts["a"], GREEDY)
        await engine_async.shutdown()
        return healthy

    # 3 failed steps in a row: unhealthy (/health answers 503), new requests refused
    assert not asyncio.run(asyncio.wait_for(refused_by_the_async_engine(), 120))
    broken["on"] = False
    outputs, failures = _run(engine, {"again": prompts["c"]})
    assert not failures and outputs == {"again": _hf_greedy(hf, prompts["c"])}
    assert engine.num_consecutive_failed_steps == 0


def test_lone_bad_requests_do_not_make_the_engine_unhealthy(llm, monkeypatch):
    """A request that fails alone in its step may be the request's own fault: three of them in a
    row must not count as a broken engine (or one client could take the server down)."""
    engine = llm.llm_engine
    prompts = _prompts(llm)
    marker = prompts["a"][0]
    _break_forward(monkeypatch, llm, lambda ids: bool((ids == marker).any()))
    for attempt in range(3):
        outputs, failures = _run(engine, {f"bad{attempt}": prompts["a"]})
        assert set(failures) == {f"bad{attempt}"} and not outputs
    assert engine.num_consecutive_failed_steps == 0
    assert _all_blocks_free(engine)
