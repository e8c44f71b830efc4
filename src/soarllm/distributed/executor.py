"""Executors: how the engine reaches its model runner(s).

The engine hands each step message (``SchedulerOutput``, plain data) to ``executor.execute`` and
never touches a runner itself. ``UniProcExecutor`` runs the one runner in this process; the
multiprocessing and Ray executors (one runner per tensor-parallel rank, step messages broadcast to
all, outputs from rank 0) plug in behind the same methods.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from soarllm.config import EngineArgs
from soarllm.errors import ConfigError
from soarllm.model.runner import ModelRunner, RunnerOutput
from soarllm.profiling import StepPhases
from soarllm.scheduler_output import SchedulerOutput


class UniProcExecutor:
    """One runner, in this process (world size 1)."""

    def __init__(self, args: EngineArgs):
        self.runner = ModelRunner(args)

    # -- what the engine needs to know about the model ----------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.runner.model.vocab_size

    @property
    def row_tile(self) -> tuple[int, int]:
        return self.runner.row_tile

    @property
    def hf_config(self) -> Any:
        return self.runner.hf_config

    @property
    def checkpoint(self) -> Any:
        return self.runner.checkpoint

    # -- KV cache and steps -----------------------------------------------------------------------

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(so)

    def update_states(self, so: SchedulerOutput) -> None:
        """Apply a step message that schedules nothing (finished / preempted ids only)."""
        self.runner.update_states(so)

    def expert_load(self) -> list[list[int]] | None:
        """Tokens routed to each expert, per MoE layer (None: a dense model)."""
        return self.runner.expert_load()

    @property
    def phases(self) -> StepPhases | None:
        return self.runner.phases

    @phases.setter
    def phases(self, value: StepPhases | None) -> None:
        self.runner.phases = value

    def shutdown(self) -> None:
        pass


EXECUTOR_BACKENDS = ("uni", "mp", "ray")


def executor_backend(args: EngineArgs) -> str:
    """The backend ``args`` ask for: ``uni`` at world size 1, ``mp`` above unless told."""
    world = args.tensor_parallel_size
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ConfigError(f"tensor_parallel_size must be a positive integer, got {world!r}")
    cp = args.context_parallel_size
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
        raise ConfigError(f"context_parallel_size must be a positive integer, got {cp!r}")
    backend = args.distributed_executor_backend or ("mp" if world * cp > 1 else "uni")
    if backend not in EXECUTOR_BACKENDS:
        raise ConfigError(f"unknown distributed_executor_backend {backend!r}; use one of "
                          f"{', '.join(EXECUTOR_BACKENDS)}")
    if cp > 1:
        check_context_parallel(args, backend)
    if backend == "uni" and world > 1:
        raise ConfigError(f"the 'uni' executor runs one process, but tensor_parallel_size="
                          f"{world}; use distributed_executor_backend='mp' (or leave it unset)")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(RAY_MISSING)
    return backend


def check_context_parallel(args: EngineArgs, backend: str) -> None:
    """Refuse, before any worker starts, what context parallelism does not combine with yet."""
    cp = args.context_parallel_size
    if backend != "mp":
        raise ConfigError(f"context_parallel_size={cp} runs its ranks as worker processes on "
                          f"this machine: use distributed_executor_backend='mp' (or leave it "
                          f"unset), not {backend!r}")
    if args.speculative_config is not None:
        raise ConfigError(f"speculative decoding is not supported with context_parallel_size="
                          f"{cp}; drop speculative_config or use context_parallel_size=1")
    if (args.attention_backend or "auto").strip().lower() == "triton":
        raise ConfigError(f"context_parallel_size={cp} brings its own attention (ring attention "
                          f"over the reference kernels); use attention_backend='auto' or "
                          f"'reference'")
    if args.resolved_device() != "cpu":
        raise ConfigError(f"context_parallel_size={cp} runs on CPU (gloo) only for now; use "
                          f"device='cpu' or context_parallel_size=1")


RAY_MISSING = ("distributed_executor_backend='ray' needs Ray, which is not installed: "
               "pip install 'soarllm[ray]' (or use distributed_executor_backend='mp' to run the "
               "ranks on this machine)")


def make_executor(args: EngineArgs) -> UniProcExecutor | Any:
    backend = executor_backend(args)
    if backend == "mp":
        from soarllm.distributed.multiproc import MultiprocExecutor

        return MultiprocExecutor(args)
    if backend == "ray":
        from soarllm.distributed.ray_executor import RayExecutor

        return RayExecutor(args)
    return UniProcExecutor(args)
