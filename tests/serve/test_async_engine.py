"""AsyncLLMEngine over the fake engine: streaming, abort, failures, shutdown, no busy waiting."""

from __future__ import annotations

import asyncio
import threading

import pytest

from soarllm.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    RequestFailedError,
    merge_outputs,
)
from soarllm.errors import ContextLengthError, InvalidRequestError, OverloadedError
from soarllm.outputs import CompletionOutput, RequestOutput
from soarllm.sampling_params import SamplingParams
from tests.serve.fake_engine import FakeEngine

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def _started(fake: FakeEngine | None = None) -> AsyncLLMEngine:
    engine = AsyncLLMEngine(fake or FakeEngine(step_time=0.001))
    engine.start()
    return engine


def _ids(engine: AsyncLLMEngine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def test_streams_deltas_that_join_to_the_final_text():
    async def main():
        engine = await _started()
        stream = await engine.add_request("a", _ids(engine, "hi"), GREEDY, coalesce=False)
        outputs = [o async for o in stream]
        await engine.shutdown()
        return outputs

    outputs = run(main())
    assert len(outputs) == 12 and outputs[-1].finished
    assert "".join(o.outputs[0].delta_text for o in outputs) == outputs[-1].outputs[0].text
    assert outputs[-1].outputs[0].text == " w0 w1 w2 w3"


def test_engine_runs_only_on_its_own_thread_and_sleeps_when_idle():
    async def main():
        fake = FakeEngine(step_time=0.0)
        engine = await _started(fake)
        async for _ in engine.generate("a", _ids(engine, "hi"), GREEDY):
            pass
        steps = fake.num_steps
        await asyncio.sleep(0.3)  # idle: the thread must block, not step
        idle_steps = fake.num_steps - steps
        await engine.shutdown()
        return fake, idle_steps

    fake, idle_steps = run(main())
    assert idle_steps == 0
    assert len(fake.thread_ids) == 1 and threading.get_ident() not in fake.thread_ids


def test_validation_errors_reach_the_caller_and_nothing_leaks():
    async def main():
        engine = await _started(FakeEngine(max_model_len=64))
        with pytest.raises(ContextLengthError):
            await engine.add_request("long", _ids(engine, "x" * 60), GREEDY)
        with pytest.raises(InvalidRequestError):
            await engine.add_request("bad", [10**9], GREEDY)
        # the ids are free again and the engine still works
        out = [o async for o in engine.generate("long", _ids(engine, "ok"), GREEDY)]
        await engine.shutdown()
        return engine, out

    engine, out = run(main())
    assert out[-1].finished and engine.num_active == 0


def test_closing_a_stream_aborts_and_frees_blocks():
    async def main():
        fake = FakeEngine(step_time=0.002)
        engine = await _started(fake)
        params = SamplingParams(temperature=0.0, max_tokens=400)
        stream = await engine.add_request("long", _ids(engine, "hello"), params)
        await stream.__anext__()
        assert fake.free_blocks < fake.num_blocks
        stream.close()
        for _ in range(100):
            if not fake.requests:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return fake, engine

    fake, engine = run(main())
    assert not fake.requests and fake.free_blocks == fake.num_blocks
    assert engine.num_active == 0


def test_cancelled_consumer_aborts_its_request():
    async def main():
        fake = FakeEngine(step_time=0.002)
        engine = await _started(fake)
        params = SamplingParams(temperature=0.0, max_tokens=400)

        async def consume():
            async for _ in engine.generate("c", _ids(engine, "hello"), params):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not fake.requests:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return fake

    fake = run(main())
    assert not fake.requests and fake.free_blocks == fake.num_blocks


def test_a_failing_step_fails_in_flight_requests_and_the_engine_goes_on():
    async def main():
        engine = await _started(FakeEngine(step_time=0.002))
        with pytest.raises(RequestFailedError):
            async for _ in engine.generate("boom", _ids(engine, "FAIL_STEP now"), GREEDY):
                pass
        out = [o async for o in engine.generate("after", _ids(engine, "fine"), GREEDY)]
        healthy = engine.is_healthy
        await engine.shutdown()
        return out, healthy

    out, healthy = run(main())
    assert out[-1].finished and healthy


def test_many_concurrent_requests_all_complete_with_their_own_output():
    async def main():
        fake = FakeEngine(step_time=0.001, max_num_seqs=16)
        engine = await _started(fake)

        async def one(i: int) -> str:
            params = SamplingParams(temperature=0.0, max_tokens=4 + i % 7)
            text = ""
            async for o in engine.generate(f"r{i}", _ids(engine, f"p{i}"), params):
                text += o.outputs[0].delta_text
            return text

        texts = await asyncio.gather(*(one(i) for i in range(60)))
        await engine.shutdown()
        return fake, texts

    fake, texts = run(main())
    pattern = "".join(f" w{i}" for i in range(20))
    assert texts == [pattern[: 4 + i % 7] for i in range(60)]
    assert fake.free_blocks == fake.num_blocks


def test_shutdown_aborts_what_is_left_and_refuses_new_requests():
    async def main():
        fake = FakeEngine(step_time=0.002)
        engine = await _started(fake)
        stream = await engine.add_request("s", _ids(engine, "x"),
                                          SamplingParams(temperature=0.0, max_tokens=400))
        await stream.__anext__()
        await engine.shutdown(timeout=0.05)
        with pytest.raises(RequestFailedError):
            async for _ in stream:
                pass
        with pytest.raises(OverloadedError):
            await engine.add_request("late", _ids(engine, "x"), GREEDY)
        return fake, engine

    fake, engine = run(main())
    assert not fake.requests and fake.free_blocks == fake.num_blocks
    assert not engine.is_running


def test_not_started_engine_refuses_requests():
    async def main():
        engine = AsyncLLMEngine(FakeEngine())
        with pytest.raises(EngineDeadError):
            await engine.add_request("x", [10], GREEDY)

    run(main())


def test_merge_outputs_concatenates_deltas_per_choice():
    def out(deltas: list[str], finished=False) -> RequestOutput:
        return RequestOutput(
            "r", None, [1],
            [CompletionOutput(i, d, [i], delta_text=d, delta_token_ids=[i])
             for i, d in enumerate(deltas)],
            finished,
        )

    merged = merge_outputs(out(["a", ""]), out(["b", "c"], finished=True))
    assert [c.delta_text for c in merged.outputs] == ["ab", "c"]
    assert [c.delta_token_ids for c in merged.outputs] == [[0, 0], [1, 1]]
    assert merged.finished
