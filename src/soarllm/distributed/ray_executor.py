"""RayExecutor: one Ray actor per tensor-parallel rank, on one machine or across a Ray cluster.

The same contract as ``MultiprocExecutor``: each step message is put in Ray's object store once,
every rank's actor runs it on its ``Worker`` (worker.py, the code the mp workers run) and rank 0's
``RunnerOutput`` comes back. One placement-group bundle per rank (a CPU, or a GPU on CUDA) keeps
the ranks' resources reserved: all on one node when a node has room (STRICT_PACK), else on as few
nodes as possible (PACK); more ranks than the cluster holds is refused at once, and a reservation
that other jobs block fails after ``SOARLLM_RAY_PLACEMENT_TIMEOUT_S``. The driver numbers the
actors node by node, its own node first, and rank 0's node IP and a free port there are the
torch.distributed rendezvous (MASTER_ADDR / MASTER_PORT): nothing to set by hand.

Every actor also runs a ``sentinel`` task, in a concurrency group of its own, that ends only when
the actor dies: waiting for a step waits on the sentinels too, so a dead rank is noticed at once
(``WorkerDiedError``, fatal to the engine, as with mp), and ``dead_error`` polls them without
blocking. ``shutdown`` (also at garbage collection) kills the actors and removes the placement
group; Ray kills them by itself when the engine process exits, since they belong to it.

``ray.init()`` joins the cluster RAY_ADDRESS names, or the one ``ray start`` runs on this
machine, else starts a local one (left running for other engines of this process; Ray stops it
at exit).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import Counter
from typing import Any

from soarllm.config import EngineArgs
from soarllm.distributed.executor import RAY_MISSING
from soarllm.distributed.multiproc import (
    COLLECTIVE_GRACE_S,
    RankedExecutor,
    WorkerDiedError,
    check_tensor_parallel,
)
from soarllm.distributed.worker import NO_REPLY
from soarllm.errors import ConfigError
from soarllm.model.loader import load_checkpoint
from soarllm.profiling import StepPhases

logger = logging.getLogger(__name__)

# How long to wait for the cluster to grant the ranks' resources when it has them, but other jobs
# hold them (SOARLLM_RAY_PLACEMENT_TIMEOUT_S overrides).
PLACEMENT_TIMEOUT_S = 60.0

# Variables the actors inherit from the engine process (the rest comes from each node's
# `ray start` environment, e.g. GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, which differ by host).
FORWARDED_ENV_PREFIXES = ("SOARLLM_",)


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError(RAY_MISSING) from e
    return ray


class RayWorker:
    """The actor of one rank: a ``Worker`` built once the driver has numbered the ranks."""

    def __init__(self) -> None:
        self.worker = None
        self._stop = threading.Event()

    def node(self) -> tuple[str, str]:
        """(node id, node IP) of the node this actor landed on."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self) -> int:
        from soarllm.distributed.multiproc import free_port

        return free_port("")  # rank 0's rendezvous port, reached from the other nodes

    def start(self, args: EngineArgs, rank: int, world_size: int, master_addr: str, port: int,
              local_world_size: int) -> dict[str, Any]:
        from soarllm.distributed.worker import Worker

        # Ray shows each actor only the GPU of its bundle (CUDA_VISIBLE_DEVICES): device 0
        self.worker = Worker(args, rank, world_size, port, master_addr=master_addr,
                             local_world_size=local_world_size, device_index=0)
        return self.worker.info()

    def call(self, method: str, args: tuple) -> Any:
        return getattr(self.worker, method)(*args)

    def sentinel(self) -> None:
        """Never returns while the actor lives: its failure is the actor's death notice."""
        self._stop.wait()


def reserve_placement_group(ray, world_size: int, device: str, timeout_s: float):
    """One bundle per rank, placed on one node if one node holds them all."""
    from ray.util.placement_group import placement_group, remove_placement_group

    resource = "GPU" if device.startswith("cuda") else "CPU"
    per_node = [int(n["Resources"].get(resource, 0)) for n in ray.nodes() if n["Alive"]]
    if sum(per_node) < world_size:
        raise ConfigError(
            f"tensor_parallel_size={world_size} needs {world_size} {resource}s (one per rank) but "
            f"the Ray cluster has {sum(per_node)} on {len(per_node)} node(s); lower "
            f"tensor_parallel_size, or add nodes (`ray start --address HEAD_IP:6379` on each)")
    strategy = "STRICT_PACK" if max(per_node) >= world_size else "PACK"
    pg = placement_group([{resource: 1}] * world_size, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise ConfigError(
            f"the Ray cluster did not grant {world_size} {resource}s ({strategy}) within "
            f"{timeout_s:.0f} s: other jobs hold them (see `ray status`); free them, lower "
            f"tensor_parallel_size, or wait longer with SOARLLM_RAY_PLACEMENT_TIMEOUT_S")
    return pg, strategy


class RayExecutor(RankedExecutor):
    """``tensor_parallel_size`` Ray actors, rank 0's answers returned."""

    death_hint = "; `ray status` for lost nodes"
    die_timeout_s = 5.0  # shutdown kills the actors first: the wait is for their exit

    def __init__(self, args: EngineArgs):
        ray = import_ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self.args = args
        self.world_size = args.tensor_parallel_size
        device = args.resolved_device()
        # The engine process reads the config and tokenizer; every node reads the weights from
        # the same path (or hub id) itself.
        self.checkpoint = load_checkpoint(args.model, args.load_format, args.hf_overrides)
        self.hf_config = self.checkpoint.config
        check_tensor_parallel(self.hf_config, self.world_size, device, local=False,
                              enable_expert_parallel=args.enable_expert_parallel)
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS, else this machine's `ray start` cluster, else a local one
        timeout = float(os.environ.get("SOARLLM_RAY_PLACEMENT_TIMEOUT_S", PLACEMENT_TIMEOUT_S))
        self.placement_group, strategy = reserve_placement_group(ray, self.world_size, device,
                                                                 timeout)
        self._dead: WorkerDiedError | None = None
        self._phases: StepPhases | None = None
        self._unanswered: list[list[Any]] = []  # NO_REPLY calls, checked with the next answer
        self.actors: list[Any] = []
        self._sentinels: list[Any] = []
        self._local_pids: list[int] = []  # actors on this node: shutdown waits for them to exit
        self._finalizer = weakref.finalize(self, _kill_actors, ray, self.actors, self._sentinels,
                                           self._local_pids, self.placement_group)
        cuda = device.startswith("cuda")
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        actor_cls = ray.remote(concurrency_groups={"sentinel": 1})(RayWorker)
        self.worker_hosts: list[str] = ["?"] * self.world_size
        self.worker_pids: list[int | None] = [None] * self.world_size
        try:
            actors = [
                actor_cls.options(
                    num_cpus=0 if cuda else 1, num_gpus=1 if cuda else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group, placement_group_bundle_index=i),
                    runtime_env={"env_vars": env}).remote()
                for i in range(self.world_size)]
            self.actors.extend(actors)
            self._sentinels.extend(a.sentinel.options(concurrency_group="sentinel").remote()
                                   for a in actors)
            nodes = self._gather([a.node.remote() for a in actors], None)
            # ranks numbered node by node, the engine's node first: rank 0 sits with the engine
            # where it can, and the ranks of one node are neighbours
            here = ray.get_runtime_context().get_node_id()
            order = sorted(range(self.world_size),
                           key=lambda i: (nodes[i][0] != here, nodes[i][1], nodes[i][0]))
            self.actors[:] = [actors[i] for i in order]
            self._sentinels[:] = [self._sentinels[i] for i in order]
            nodes = [nodes[i] for i in order]
            master_addr = nodes[0][1]
            port = self._gather([self.actors[0].free_port.remote()], None, ranks=[0])[0]
            per_node = Counter(node_id for node_id, _ in nodes)
            infos = self._gather([
                a.start.remote(args, rank, self.world_size, master_addr, port,
                               per_node[nodes[rank][0]])
                for rank, a in enumerate(self.actors)], None)
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = infos[0]["max_model_len"]
        self.vocab_size = infos[0]["vocab_size"]
        self.row_tile = tuple(infos[0]["row_tile"])
        self.worker_pids = [i["pid"] for i in infos]
        self.worker_hosts = [i["host"] for i in infos]
        self._local_pids.extend(i["pid"] for i, n in zip(infos, nodes) if n[0] == here)
        logger.info("ray executor: %d ranks on %d node(s) (%s), rendezvous at %s:%d",
                    self.world_size, len(per_node), strategy, master_addr, port)

    # -- messages --------------------------------------------------------------------------------

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Run ``method`` on every worker; their answers in rank order."""
        if self._dead is not None:
            raise self._dead
        ref = self._ray.put(args)  # serialized once; each node fetches it once
        refs = [a.call.remote(method, ref) for a in self.actors]
        if method in NO_REPLY:
            self._unanswered.append(refs)
            return []
        while self._unanswered:  # a failed NO_REPLY call is reported with this answer
            self._gather(self._unanswered.pop(0), method)
        return self._gather(refs, method)

    def _gather(self, refs: list[Any], method: str | None,
                ranks: list[int] | None = None) -> list[Any]:
        """Every rank's answer; raises at once when an actor dies."""
        from ray.exceptions import RayTaskError

        ray = self._ray
        pending = dict(zip(ranks or range(len(refs)), refs))
        sentinel_rank = {s: r for r, s in enumerate(self._sentinels)}
        answers: dict[int, tuple[str, Any]] = {}
        deadline = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending.values()) + self._sentinels, num_returns=1,
                                timeout=timeout)
            if not ready:
                failed = sorted(r for r, a in answers.items() if a[0] == "error")
                if method is None:  # start-up: the failed rank's own error says what to change
                    self.shutdown()
                    raise answers[failed[0]][1]
                self._die(f"worker rank(s) {failed} failed ({answers[failed[0]][1]!r}) while "
                          f"rank(s) {sorted(pending)} waited in a collective for "
                          f"{COLLECTIVE_GRACE_S:.0f} s")
            ref = ready[0]
            rank = sentinel_rank.get(ref)
            if rank is not None:
                if rank in pending and ray.wait([pending[rank]], timeout=0)[0]:
                    ref = pending[rank]  # it answered before dying: read the answer first
                else:
                    self._die(f"worker rank {rank}{self._where(rank)} died")
            rank = next(r for r, x in pending.items() if x == ref)
            try:
                answers[rank] = ("ok", ray.get(ref))
            except RayTaskError as e:  # the method raised: its own exception
                answers[rank] = ("error", getattr(e, "cause", None) or e)
            except ray.exceptions.RayError as e:  # the actor (or its node) is gone
                self._die(f"worker rank {rank}{self._where(rank)} died "
                          f"({str(e).splitlines()[0]})")
            del pending[rank]
            if answers[rank][0] == "error" and deadline is None:
                deadline = time.monotonic() + COLLECTIVE_GRACE_S
        return self._results(answers, method)

    def _where(self, rank: int) -> str:
        pid = self.worker_pids[rank]
        return f" (pid {pid} on {self.worker_hosts[rank]})" if pid is not None else ""

    # -- the executor seam -----------------------------------------------------------------------

    @property
    def dead_error(self) -> WorkerDiedError | None:
        """Why the executor cannot run steps any more, None while it can. Safe to read from any
        thread: it polls the actors' sentinels without waiting."""
        if self._dead is not None:
            return self._dead
        try:
            ready, _ = self._ray.wait(self._sentinels, num_returns=1, timeout=0)
        except Exception as e:  # noqa: BLE001 - Ray itself is gone (ray.shutdown)
            return WorkerDiedError(f"the Ray connection is gone ({e}); restart the engine")
        if not ready:
            return None
        rank = self._sentinels.index(ready[0])
        return WorkerDiedError(f"tensor-parallel worker rank {rank}{self._where(rank)} died; "
                               f"the engine cannot continue: restart it")

    def shutdown(self, timeout: float = 5.0) -> None:
        """Kill every actor and free the placement group (idempotent); later calls raise
        WorkerDiedError."""
        if self._dead is None:
            self._dead = WorkerDiedError("the engine's Ray workers were shut down "
                                         "(engine.shutdown); create a new engine")
        if self._finalizer.detach() is not None:
            _kill_actors(self._ray, self.actors, self._sentinels, self._local_pids,
                         self.placement_group, timeout)


def _kill_actors(ray, actors: list[Any], sentinels: list[Any], local_pids: list[int],
                 placement_group, timeout: float = 5.0) -> None:
    """Kill every actor, wait (up to ``timeout``) until Ray reports them dead and those on this
    node have exited (so their memory, GPU memory included, is free for the next engine), free
    their placement group."""
    if not ray.is_initialized():  # Ray's own exit hook came first: it stopped them
        return
    from ray.util.placement_group import remove_placement_group

    deadline = time.monotonic() + timeout
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
    try:
        ray.wait(sentinels, num_returns=len(sentinels), timeout=timeout)
        remove_placement_group(placement_group)
    except Exception:  # noqa: BLE001 - already removed
        pass
    while any(_running(pid) for pid in local_pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (reaped later by its raylet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
