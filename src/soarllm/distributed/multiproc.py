"""MultiprocExecutor: one worker process per tensor-parallel rank, driven over pipes.

Each step message is pickled once and the same bytes are written to every worker's pipe; rank 0
answers with the ``RunnerOutput`` (it alone samples), the other ranks with an acknowledgement.
While waiting the executor also watches every worker's process sentinel, so a worker that dies
(killed, out of memory, crashed) is noticed at once: the executor stops the others and raises
``WorkerDiedError``, which the engine treats as fatal (it ends the requests in flight and reports
itself unhealthy) instead of hanging. A rank that fails while the others wait for it in a
collective is noticed the same way after ``COLLECTIVE_GRACE_S``. A request-level error raised by
every rank alike (before any collective) is re-raised as it is, so the engine's per-request
failure containment still works.

``shutdown`` (also run when the executor is garbage-collected and at interpreter exit) stops every
worker: a polite message, then SIGTERM, then SIGKILL. Workers also exit on their own when the
engine process disappears.
"""

from __future__ import annotations

import atexit
import logging
import pickle
import time
import weakref
from multiprocessing.connection import wait
from typing import Any

from soarllm.config import EngineArgs
from soarllm.distributed.worker import NO_REPLY, worker_main
from soarllm.errors import ConfigError, SoarError
from soarllm.profiling import StepPhases
from soarllm.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

# How long the other ranks may keep silent after one rank failed a step: they are stuck in a
# collective the failed rank never joined.
COLLECTIVE_GRACE_S = 5.0


class WorkerDiedError(SoarError):
    """A worker process died or hung; the engine cannot go on (HTTP 503). Fatal to the engine."""

    status_code = 503
    error_type = "engine_error"
    fatal = True


def check_tensor_parallel(config, world_size: int, device: str, local: bool = True,
                          enable_expert_parallel: bool = False) -> None:
    """Refuse, before any worker starts, a world size the model or the machine cannot take.
    ``local=False``: the ranks may run on other machines (Ray), whose GPUs are counted there."""
    from soarllm.model.models.moe import check_expert_parallel
    from soarllm.model.parallel_state import TPGroup, kv_head_range
    from soarllm.model.registry import resolve_model_class

    if world_size < 1:
        raise ConfigError(f"tensor_parallel_size must be at least 1, got {world_size}")
    if local and device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count()
        if world_size > n:
            raise ConfigError(
                f"tensor_parallel_size={world_size} needs {world_size} GPUs but {n} are visible; "
                f"lower tensor_parallel_size to at most {n} (or set CUDA_VISIBLE_DEVICES)")
    model_cls = resolve_model_class(config)
    if world_size > 1 and not getattr(model_cls, "supports_tensor_parallel", False):
        raise ConfigError(f"{model_cls.__name__} does not support tensor parallelism yet; "
                          f"run it with tensor_parallel_size=1")
    text = getattr(config, "text_config", None) or config
    tp = TPGroup(rank=0, world_size=world_size)
    tp.split(text.num_attention_heads, "attention heads")
    kv_head_range(getattr(text, "num_key_value_heads", None) or text.num_attention_heads, tp)
    # experts, expert and MLP widths (a MoE family says which of its widths split)
    check_expert_parallel(model_cls, text, world_size, enable_expert_parallel)
    if getattr(model_cls, "moe_dims", None) is None and getattr(text, "intermediate_size", None):
        tp.split(text.intermediate_size, "intermediate size (MLP width)")


class RankedExecutor:
    """The executor seam over worker ranks (processes here, Ray actors in ray_executor.py): each
    call goes to every rank through ``collective_rpc`` and rank 0's answer is the result.
    Subclasses provide ``collective_rpc``, ``dead_error`` and ``shutdown``."""

    _phases: StepPhases | None = None

    def collective_rpc(self, method: str, *args) -> list:
        raise NotImplementedError

    @property
    def dead_error(self) -> WorkerDiedError | None:
        raise NotImplementedError

    def shutdown(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    # where else to look for the cause of a dead rank (Ray: lost nodes)
    death_hint = ""
    # how long a dying executor waits for the survivors, which may be stuck in a collective
    die_timeout_s = 0.5

    def _die(self, what: str) -> None:
        self._dead = WorkerDiedError(
            f"tensor-parallel {what}; the engine cannot continue: restart it (check the "
            f"worker's log for the cause, e.g. out of memory{self.death_hint})")
        logger.error("%s", self._dead)
        self.shutdown(timeout=self.die_timeout_s)
        raise self._dead

    def _results(self, answers: dict[int, tuple[str, Any]], method: str | None) -> list:
        """Every rank's ("ok" | "error", value) -> the values in rank order, or the error: a
        start-up error as it is (it says what to change), one that only some ranks raised as
        fatal (their states drifted apart)."""
        errors = [a[1] for _, a in sorted(answers.items()) if a[0] == "error"]
        if errors:
            if method is None:
                raise errors[0]
            if len(errors) < len(answers):
                self._die(f"{len(errors)} of {len(answers)} workers failed in {method}: "
                          f"{errors[0]!r}")
            raise errors[0]
        return [answers[r][1] for r in sorted(answers)]

    def determine_num_blocks(self) -> int:
        return min(self.collective_rpc("determine_num_blocks"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_kv_cache", num_blocks)

    def execute(self, so: SchedulerOutput):
        t0 = time.perf_counter()
        out = self.collective_rpc("execute", so)[0]
        if self._phases is not None:  # the workers' phases are not sent back: one figure
            self._phases.add("forward", time.perf_counter() - t0)
            self._phases.tokens += so.total_num_scheduled_tokens
        return out

    def expert_load(self) -> list[list[int]] | None:
        """Tokens routed to each expert, per MoE layer: rank 0's (every rank routes the whole
        batch alike)."""
        return self.collective_rpc("expert_load")[0]

    def update_states(self, so: SchedulerOutput) -> None:
        self.collective_rpc("update_states", so)

    @property
    def phases(self) -> StepPhases | None:
        return self._phases

    @phases.setter
    def phases(self, value: StepPhases | None) -> None:
        self._phases = value

    @property
    def is_alive(self) -> bool:
        return self.dead_error is None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` ("" for every interface) right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _spawn(args: EngineArgs, world_size: int, method: str = "spawn") -> tuple[list, list]:
    """Start one worker process per rank; (processes, the engine's ends of their pipes). Nothing
    here imports torch. ``method`` is multiprocessing's start method: "spawn" (a fresh
    interpreter) unless the caller knows a fork is safe (``prestart_workers``)."""
    import multiprocessing
    import os

    ctx = multiprocessing.get_context(method)
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=True)
        p = ctx.Process(target=worker_main, name=f"soar-worker-{rank}",
                        args=(args, rank, world_size, port, child_end, os.getpid()))
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    return procs, conns


# Workers started before their executor exists: (engine args, processes, pipes)
_prestarted: tuple[EngineArgs, list, list] | None = None


def prestart_workers(args: EngineArgs) -> bool:
    """Start the worker processes that ``MultiprocExecutor(args)`` will adopt, so that they load
    the model while this process goes on (``soar serve`` imports its HTTP stack and builds the
    engine and tokenizer meanwhile). Only where the model is ready to load (nothing to pull, no
    GGUF to convert: the engine does that once, first); returns whether they were started.
    Workers never adopted are stopped at exit (and stop by themselves when this process dies).

    In a process that has not imported torch yet (``soar serve``), this imports torch and the
    model's code and config class here, then forks the workers: they start with all of it
    imported (a spawned worker imports it again, 3-5 s of CPU on a 2-core machine, beside this
    process doing the same) and share those pages with this process until either writes them.
    The fork is safe because nothing has run a parallel region or started a thread pool yet:
    torch was not even imported. Anywhere else (a library user, the tests) they are spawned."""
    global _prestarted
    import sys

    from soarllm.hub import ready_to_load

    stop_prestarted()
    if not ready_to_load(args.model, args.load_format):
        return False
    world = args.tensor_parallel_size * args.context_parallel_size
    method = "spawn"
    if "torch" not in sys.modules and _fork_ok(args):
        _import_for_workers(args)
        method = "fork"
    _prestarted = (args, *_spawn(args, world, method))
    atexit.register(stop_prestarted)
    return True


def _fork_ok(args: EngineArgs) -> bool:
    import multiprocessing
    import threading

    return ("fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
            and args.resolved_device() == "cpu")


def _import_for_workers(args: EngineArgs) -> None:
    """What every worker imports before it loads weights: torch, the runner and the model's config
    class (read from the checkpoint's config, nothing else)."""
    import soarllm.model.runner  # noqa: F401  (torch, the layers, the kernels' Python side)
    from soarllm.model.loader import load_checkpoint

    load_checkpoint(args.model, args.load_format, args.hf_overrides)  # reads no weight


def _take_prestarted(args: EngineArgs) -> tuple[list, list] | None:
    """The prestarted workers when they were started for exactly ``args`` (else they stop)."""
    global _prestarted
    if _prestarted is None:
        return None
    started, procs, conns = _prestarted
    _prestarted = None
    if started != args:
        _stop_workers(procs, conns, timeout=0.5)
        return None
    return procs, conns


def stop_prestarted() -> None:
    global _prestarted
    if _prestarted is not None:
        _stop_workers(*_prestarted[1:], timeout=0.5)
        _prestarted = None


class MultiprocExecutor(RankedExecutor):
    """``tensor_parallel_size`` worker processes, rank 0's answers returned."""

    def __init__(self, args: EngineArgs):
        self.args = args
        # one process per rank: tensor-parallel or context-parallel (one of them is 1)
        self.world_size = args.tensor_parallel_size * args.context_parallel_size
        device = args.resolved_device()
        # The engine process reads the config and tokenizer; a GGUF file is converted once here,
        # before the workers open it.
        from soarllm.model.loader import load_checkpoint

        try:
            self.checkpoint = load_checkpoint(args.model, args.load_format, args.hf_overrides)
            self.hf_config = self.checkpoint.config
            check_tensor_parallel(self.hf_config, args.tensor_parallel_size, device,
                                  enable_expert_parallel=args.enable_expert_parallel)
        except BaseException:
            stop_prestarted()
            raise
        # workers started early for these arguments (prestart_workers), else new ones
        self.procs, self.conns = _take_prestarted(args) or _spawn(args, self.world_size)
        self._dead: WorkerDiedError | None = None
        self._phases: StepPhases | None = None
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.conns)
        try:
            infos = self._gather(None)
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = infos[0]["max_model_len"]
        self.vocab_size = infos[0]["vocab_size"]
        self.row_tile = tuple(infos[0]["row_tile"])
        self.worker_pids = [i["pid"] for i in infos]

    # -- messages --------------------------------------------------------------------------------

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Run ``method`` on every worker; their answers in rank order."""
        self._broadcast(pickle.dumps((method, args)))
        if method in NO_REPLY:
            return []
        return self._gather(method)

    def _broadcast(self, payload: bytes) -> None:
        if self._dead is not None:
            raise self._dead
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(payload)
            except (BrokenPipeError, OSError):
                self._die(f"worker rank {rank} closed its pipe"
                          f"{self._exit_note(rank)}")

    def _gather(self, method: str | None) -> list[Any]:
        """Every rank's answer; raises at once when a worker dies."""
        pending = dict(enumerate(self.conns))
        answers: dict[int, tuple[str, Any]] = {}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs)}
        deadline = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(list(pending.values()) + list(sentinels), timeout)
            if not ready:
                failed = sorted(r for r, a in answers.items() if a[0] == "error")
                if method is None:  # start-up: the failed rank's own error says what to change
                    self.shutdown(timeout=0.5)
                    raise answers[failed[0]][1]
                self._die(f"worker rank(s) {failed} failed ({answers[failed[0]][1]!r}) while "
                          f"rank(s) {sorted(pending)} waited in a collective for "
                          f"{COLLECTIVE_GRACE_S:.0f} s")
            for obj in ready:
                if obj in sentinels:
                    rank = sentinels[obj]
                    if rank in pending and pending[rank].poll():
                        continue  # it answered before dying: read the answer first
                    self._die(f"worker rank {rank} (pid {self.procs[rank].pid}) died"
                              f"{self._exit_note(rank)}")
                rank = next(r for r, c in pending.items() if c is obj)
                try:
                    answers[rank] = pickle.loads(obj.recv_bytes())
                except (EOFError, OSError):
                    self._die(f"worker rank {rank} (pid {self.procs[rank].pid}) died"
                              f"{self._exit_note(rank)}")
                del pending[rank]
                if answers[rank][0] == "error" and deadline is None:
                    deadline = time.monotonic() + COLLECTIVE_GRACE_S
        return self._results(answers, method)

    def _exit_note(self, rank: int) -> str:
        p = self.procs[rank]
        p.join(timeout=0.5)
        code = p.exitcode
        if code is None:
            return ""
        return f" (exit code {code}{', killed by signal ' + str(-code) if code < 0 else ''})"

    # -- the executor seam -----------------------------------------------------------------------

    @property
    def dead_error(self) -> WorkerDiedError | None:
        """Why the executor cannot run steps any more, None while it can. Safe to read from any
        thread: it only polls the workers' exit status."""
        if self._dead is not None:
            return self._dead
        for rank, p in enumerate(self.procs):
            code = p.exitcode
            if code is not None:
                signal_note = f", killed by signal {-code}" if code < 0 else ""
                return WorkerDiedError(
                    f"tensor-parallel worker rank {rank} (pid {p.pid}) died (exit code "
                    f"{code}{signal_note}); the engine cannot continue: restart it")
        return None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker (idempotent); later calls raise WorkerDiedError."""
        if self._dead is None:
            self._dead = WorkerDiedError("the engine's worker processes were shut down "
                                         "(engine.shutdown); create a new engine")
        if self._finalizer.detach() is not None:
            _stop_workers(self.procs, self.conns, timeout)


def _stop_workers(procs, conns, timeout: float = 5.0) -> None:
    """Ask, then SIGTERM, then SIGKILL; reap every process."""
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(("shutdown", ())))
        except Exception:
            pass
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=2.0)
    for conn in conns:
        try:
            conn.close()
        except Exception:
            pass
