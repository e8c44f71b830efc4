"""Tensor parallelism over Ray actors (a local two-CPU Ray cluster, gloo): the same tokens as
transformers and as one process, a killed actor ends the engine instead of hanging it, and
settings the cluster cannot meet are refused with the fix."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
import torch

from soarllm import LLM, SamplingParams
from soarllm.config import EngineArgs
from soarllm.distributed.executor import executor_backend
from soarllm.distributed.multiproc import WorkerDiedError
from soarllm.engine.llm_engine import LLMEngine
from soarllm.errors import ConfigError
from tests.distributed.test_faults import HANG_GUARD_S, _gone
from tests.distributed.test_tensor_parallel import N_TOKENS, PROMPTS, _hf_greedy

ray = pytest.importorskip("ray")  # in the test extra: CI runs these


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster of 2 CPUs (one per rank), shut down after the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _args(model_dir, tp: int = 2) -> EngineArgs:
    return EngineArgs(model=str(model_dir), dtype="float32", kv_cache_memory="32MiB",
                      tensor_parallel_size=tp, distributed_executor_backend="ray")


def test_ray_tp2_equals_transformers_and_one_process(ray_cluster, tiny_mqa_dir):
    """Greedy tokens and log-probabilities equal transformers'; a seeded sampled request gives
    the tokens of a one-process engine (only rank 0 samples, with the same seeds). The model has
    biases, one replicated KV head, a tied head and an odd vocabulary."""
    llm = LLM(str(tiny_mqa_dir), dtype="float32", kv_cache_memory="32MiB",
              tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        assert len(set(llm.llm_engine.executor.worker_pids)) == 2
        tok = llm.get_tokenizer()
        prompt_ids = [tok.encode(p) for p in PROMPTS]
        greedy = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=1)
        outs = [o.outputs[0] for o in llm.generate([list(p) for p in prompt_ids], greedy)]
        sampled = SamplingParams(temperature=0.8, seed=7, max_tokens=N_TOKENS, ignore_eos=True)
        ray_sampled = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sampled)]
    finally:
        llm.llm_engine.shutdown()
    ref_tokens, ref_logprobs = _hf_greedy(tiny_mqa_dir, prompt_ids)
    assert [o.token_ids for o in outs] == ref_tokens
    for o, ref in zip(outs, ref_logprobs):
        ours = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)],
                            dtype=torch.float64)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    uni = LLM(str(tiny_mqa_dir), dtype="float32", kv_cache_memory="32MiB")
    assert [o.outputs[0].token_ids for o in uni.generate(PROMPTS, sampled)] == ray_sampled


def test_killed_actor_ends_the_engine_and_frees_the_cluster(ray_cluster, tiny_gqa_dir):
    """The serving path. Rank 1 killed mid-generation, while rank 0 waits for it in an
    all-reduce: the open stream ends with EngineDeadError (HTTP 503) naming the rank, the engine
    reports unhealthy and refuses new requests, no actor is left and the placement group is
    removed (its CPUs free for a new engine)."""
    from ray.util.placement_group import placement_group_table

    from soarllm.engine.async_engine import AsyncLLMEngine
    from soarllm.engine.failures import EngineDeadError

    engine = LLMEngine(_args(tiny_gqa_dir))
    pids = list(engine.executor.worker_pids)
    async_engine = AsyncLLMEngine(engine)

    async def run() -> BaseException | None:
        async_engine.start()
        assert async_engine.is_healthy
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        try:
            i = 0
            async for _ in async_engine.generate("r", "def parse(self):", params):
                i += 1
                if i == 2:
                    os.kill(pids[1], signal.SIGKILL)
        except EngineDeadError as e:
            return e
        return None

    try:
        error = asyncio.run(asyncio.wait_for(run(), HANG_GUARD_S))
        assert isinstance(error, EngineDeadError), error
        assert "rank 1" in str(error) and "restart" in str(error)
        assert not async_engine.is_healthy
        assert isinstance(engine.executor.dead_error, WorkerDiedError)

        async def add_again() -> None:
            await async_engine.add_request("s", "x", SamplingParams(max_tokens=2))

        with pytest.raises(EngineDeadError):
            asyncio.run(add_again())
        assert all(_gone(pid) for pid in pids)
        assert placement_group_table(engine.executor.placement_group)["state"] == "REMOVED"
    finally:
        engine.shutdown()  # idempotent


def test_more_ranks_than_the_cluster_holds_is_refused(ray_cluster, tiny_gqa_dir):
    with pytest.raises(ConfigError, match="needs 4 CPUs .* has 2 on 1 node"):
        LLMEngine(_args(tiny_gqa_dir, tp=4))


def test_error_in_the_actors_is_raised_as_is_and_frees_the_cluster(ray_cluster, tiny_gqa_dir,
                                                                  tmp_path):
    """A refusal raised by every rank at start-up reaches the caller as the rank raised it (not
    wrapped in Ray's error), and nothing is left reserved."""
    from ray.util.placement_group import placement_group_table

    from soarllm.cli.main import main as soar

    packed = tmp_path / "w4a16-g64-24"  # two ranks would cut a 2:4 layer inside a group
    assert soar(["quantize", str(tiny_gqa_dir), "--scheme", "w4a16", "--method", "rtn",
                 "--group-size", "64", "--sparsity", "2:4", "--out", str(packed)]) == 0
    args = _args(packed)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 leaves each rank 32") as raised:
        LLMEngine(args)
    assert not isinstance(raised.value, ray.exceptions.RayError)
    assert {pg["state"] for pg in placement_group_table().values()} == {"REMOVED"}


def test_busy_cluster_times_out_with_the_fix(ray_cluster, tiny_gqa_dir, monkeypatch):
    """Another job holds the CPUs: the engine gives up after the timeout instead of waiting."""
    from ray.util.placement_group import placement_group, remove_placement_group

    other = placement_group([{"CPU": 1}])
    ray.get(other.ready(), timeout=60)
    monkeypatch.setenv("SOARLLM_RAY_PLACEMENT_TIMEOUT_S", "1")
    try:
        with pytest.raises(ConfigError, match="did not grant 2 CPUs .* `ray status`"):
            LLMEngine(_args(tiny_gqa_dir))
    finally:
        remove_placement_group(other)


def test_ray_backend_choice(monkeypatch):
    from soarllm.cli.engine_args import engine_args_from
    from soarllm.cli.main import build_parser

    ns = build_parser().parse_args(["serve", "m", "-tp", "4",
                                    "--distributed-executor-backend", "ray"])
    assert executor_backend(engine_args_from(ns)) == "ray"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"pip install 'soarllm\[ray\]'"):
        executor_backend(EngineArgs(tensor_parallel_size=2, distributed_executor_backend="ray"))
