"""Data parallelism: N engine replicas (each may itself be tensor parallel) behind one front end.

``DataParallelEngine`` has the surface the server uses of an ``AsyncLLMEngine`` and routes each
request to one replica (``PrefixRouter``): the replica that holds the longest cached prefix of its
prompt, else the least loaded one. Each replica is a whole engine (scheduler, KV cache, runner on
its own worker processes with the ``mp`` executor, so replicas compute in parallel outside this
process's GIL, the cores split between them with ``worker_threads``); the front end only
tokenizes, routes and streams.

The router's view of each replica's prefix cache is its own record of the block-aligned prompt
prefixes it sent there (hashes chained block by block, as the KV cache manager hashes them), in a
bounded LRU: an approximation of the replica's cache, which may have evicted a block since.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from soarllm.config import EngineArgs
from soarllm.engine.async_engine import GeneratesFromStreams
from soarllm.engine.llm_engine import EngineStats
from soarllm.errors import ConfigError, SoarError
from soarllm.sampling_params import SamplingParams


@dataclasses.dataclass
class RouterStats:
    requests: int = 0
    prefix_routed: int = 0  # sent to the replica holding their longest known prefix
    routed_blocks: int = 0  # prompt blocks the chosen replica was known to hold

    @property
    def hit_rate(self) -> float:
        return self.prefix_routed / self.requests if self.requests else 0.0


class PrefixRouter:
    """Longest known cached prefix first, then the least loaded replica (lowest index on ties)."""

    def __init__(self, num_replicas: int, block_size: int, max_blocks: int = 200_000):
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.blocks: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]
        self.stats = RouterStats()

    def block_hashes(self, token_ids: list[int]) -> list[int]:
        hashes, h = [], 0
        bs = self.block_size
        for i in range(len(token_ids) // bs):
            h = hash((h, tuple(token_ids[i * bs : (i + 1) * bs])))
            hashes.append(h)
        return hashes

    def route(self, token_ids: list[int], loads: list[int], eligible: list[bool]) -> int:
        hashes = self.block_hashes(token_ids)
        best, best_hit = None, 0
        for r, blocks in enumerate(self.blocks):
            if not eligible[r]:
                continue
            hit = 0
            for h in hashes:
                if h not in blocks:
                    break
                hit += 1
            if hit > best_hit:
                best, best_hit = r, hit
        if best is None:
            candidates = [r for r in range(len(loads)) if eligible[r]]
            if not candidates:
                raise ConfigError("no data-parallel replica is running")
            best = min(candidates, key=lambda r: (loads[r], r))
        self.stats.requests += 1
        if best_hit:
            self.stats.prefix_routed += 1
            self.stats.routed_blocks += best_hit
        blocks = self.blocks[best]
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)
        return best


@dataclasses.dataclass
class DataParallelStats(EngineStats):
    """The replicas' engine stats summed (the fields /metrics reads), each replica's and the
    router's counters."""

    replicas: list[Any] = dataclasses.field(default_factory=list)
    router: RouterStats | None = None


def _sum_stats(stats: list[Any], router: RouterStats) -> DataParallelStats | None:
    if any(s is None for s in stats):
        return None
    total = sum(s.num_total_blocks for s in stats)
    free = sum(s.num_free_blocks for s in stats)
    return DataParallelStats(
        num_running=sum(s.num_running for s in stats),
        num_waiting=sum(s.num_waiting for s in stats),
        num_free_blocks=free,
        num_total_blocks=total,
        kv_cache_usage=(sum(s.kv_cache_usage * s.num_total_blocks for s in stats) / total
                        if total else 0.0),
        prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
        num_preemptions=sum(s.num_preemptions for s in stats),
        expert_load=_sum_expert_load([getattr(s, "expert_load", None) for s in stats]),
        replicas=list(stats),
        router=dataclasses.replace(router),
    )


def _sum_expert_load(loads: list[Any]) -> list[list[int]] | None:
    """The replicas' per-layer expert counters added up (None when a replica has none)."""
    if not loads or any(x is None for x in loads):
        return None
    return [[sum(col) for col in zip(*rows)] for rows in zip(*loads)]


class DataParallelEngine(GeneratesFromStreams):
    """``AsyncLLMEngine``'s serving surface over ``replicas`` (AsyncLLMEngines)."""

    def __init__(self, replicas: list[Any], block_size: int):
        if not replicas:
            raise ConfigError("data_parallel_size must be at least 1")
        self.replicas = replicas
        self.router = PrefixRouter(len(replicas), block_size)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, data_parallel_size: int,
                         torch_threads: int | None = None) -> DataParallelEngine:
        from soarllm.engine.async_engine import AsyncLLMEngine
        from soarllm.engine.llm_engine import LLMEngine

        if data_parallel_size < 1:
            raise ConfigError(f"data_parallel_size must be at least 1, got {data_parallel_size}")
        if args.distributed_executor_backend is None:
            # the model of each replica in its own worker process(es): replicas compute in parallel
            args = dataclasses.replace(args, distributed_executor_backend="mp")
        if args.worker_threads is None:  # every replica's workers share the cores
            ranks = (data_parallel_size * args.tensor_parallel_size
                     * args.context_parallel_size)
            args = dataclasses.replace(args, worker_threads=max(1, (os.cpu_count() or 1) // ranks))
        replicas = []
        try:
            for _ in range(data_parallel_size):
                replicas.append(AsyncLLMEngine(LLMEngine(args), torch_threads=torch_threads))
        except BaseException:
            for r in replicas:
                r.engine.shutdown()
            raise
        return cls(replicas, args.block_size)

    # -- what the server reads ---------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.replicas[0].tokenizer

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].max_model_len

    @property
    def model_name(self) -> str:
        return self.replicas[0].model_name

    @property
    def vocab_size(self) -> int:
        return self.replicas[0].vocab_size

    @property
    def max_num_seqs(self) -> int | None:
        values = [r.max_num_seqs for r in self.replicas]
        return None if None in values else sum(values)

    @property
    def stats(self) -> DataParallelStats | None:
        return _sum_stats([r.stats for r in self.replicas], self.router.stats)

    @property
    def num_queued(self) -> int:
        return sum(r.num_queued for r in self.replicas)

    @property
    def num_waiting(self) -> int:
        return sum(r.num_waiting for r in self.replicas)

    @property
    def num_active(self) -> int:
        return sum(r.num_active for r in self.replicas)

    @property
    def is_running(self) -> bool:
        return all(r.is_running for r in self.replicas)

    @property
    def fatal_error(self) -> BaseException | None:
        return next((r.fatal_error for r in self.replicas if r.fatal_error is not None), None)

    @property
    def is_healthy(self) -> bool:
        """Healthy while every replica is: a dead replica is a fault to restart, not to hide."""
        return all(r.is_healthy for r in self.replicas)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        for r in self.replicas:
            r.start()

    def stop_accepting(self) -> None:
        for r in self.replicas:
            r.stop_accepting()

    def fail_all(self, error: SoarError) -> int:
        return sum(r.fail_all(error) for r in self.replicas)

    async def shutdown(self, timeout: float = 0.0) -> None:
        await asyncio.gather(*(r.shutdown(timeout) for r in self.replicas))
        for r in self.replicas:
            r.engine.shutdown()

    # -- requests ----------------------------------------------------------------------------------

    def choose(self, prompt: str | list[int]) -> int:
        """The replica index a prompt goes to (and record its prefix there)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        loads = [r.num_active + r.num_queued for r in self.replicas]
        return self.router.route(ids, loads, [r.is_healthy for r in self.replicas])

    def submit_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       arrival_time: float | None = None, coalesce: bool = True):
        replica = self.replicas[self.choose(prompt)]
        return replica.submit_request(request_id, prompt, params, arrival_time, coalesce)

    async def wait_accepted(self, stream, accepted):
        return await self.replicas[0].wait_accepted(stream, accepted)  # replica-agnostic

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          arrival_time: float | None = None, coalesce: bool = True):
        stream, accepted = self.submit_request(request_id, prompt, params, arrival_time, coalesce)
        return await self.wait_accepted(stream, accepted)

    def abort(self, request_ids: str | Iterable[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for r in self.replicas:  # idempotent: the replicas that do not have an id ignore it
            r.abort(ids)
