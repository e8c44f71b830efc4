"""The tensor-parallel group a model is built for: rank, world size and its collectives.

No module-level state: the runner makes one ``TPGroup`` and hands it to the model's constructor,
which hands it to every parallel layer. At world size 1 (``TPGroup.single()``) every collective
returns its input untouched, so a one-process model pays nothing for being parallel-ready.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CommStats:
    """Time spent in collectives on this rank (world size > 1 only)."""

    seconds: float = 0.0
    calls: int = 0


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # the torch.distributed process group (None: the default group)
    comm: CommStats = field(default_factory=CommStats, compare=False)

    @classmethod
    def single(cls) -> TPGroup:
        return cls()

    @property
    def is_driver(self) -> bool:
        """Rank 0 samples and answers the engine; the other ranks only compute."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks (in place where the backend allows)."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        if torch.compiler.is_compiling():  # traceable form: the compiled graph keeps the op
            import torch.distributed._functional_collectives as fc

            return fc.all_reduce(x, "sum", self.group or dist.group.WORLD)
        t0 = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        self.comm.seconds += time.perf_counter() - t0
        self.comm.calls += 1
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim``, in rank order."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        t0 = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        self.comm.seconds += time.perf_counter() - t0
        self.comm.calls += 1
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Rows of ``x`` sent to the ranks in order (``send[r]`` rows to rank r) and the rows
        received from each (``recv[r]`` from rank r), concatenated in rank order."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv,
                               input_split_sizes=send, group=self.group)
        self.comm.seconds += time.perf_counter() - t0
        self.comm.calls += 1
        return out

    def all_gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's rows of ``x`` (``sizes[r]`` on rank r) concatenated in rank order."""
        if self.world_size == 1:
            return x
        most = max(sizes)
        padded = x if len(x) == most else torch.cat([x, x.new_zeros(most - len(x), *x.shape[1:])])
        parts = self.all_gather(padded, dim=0).split(most)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    # -- how a dimension is split ----------------------------------------------------------------

    def split(self, total: int, what: str) -> int:
        """This rank's share of ``total`` (heads, rows, ...), which must divide evenly."""
        if total % self.world_size:
            from soarllm.errors import ConfigError

            raise ConfigError(
                f"tensor_parallel_size={self.world_size} does not divide the model's {what} "
                f"({total}); choose a tensor_parallel_size that divides {total}"
            )
        return total // self.world_size


def kv_head_range(num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(first KV head, KV heads) this rank holds: split when there are at least as many KV heads
    as ranks, else each head replicated on world_size / num_kv_heads consecutive ranks."""
    if num_kv_heads >= tp.world_size:
        n = tp.split(num_kv_heads, "key/value heads")
        return tp.rank * n, n
    if tp.world_size % num_kv_heads:
        from soarllm.errors import ConfigError

        raise ConfigError(
            f"tensor_parallel_size={tp.world_size} is larger than the model's {num_kv_heads} "
            f"key/value heads and not a multiple of it; choose a tensor_parallel_size that "
            f"divides or is a multiple of {num_kv_heads}"
        )
    return tp.rank // (tp.world_size // num_kv_heads), 1


def init_distributed(rank: int, world_size: int, port: int, device: str,
                     master_addr: str = "127.0.0.1", device_index: int | None = None) -> TPGroup:
    """Join the process group (gloo on CPU, NCCL on CUDA) as ``rank``; rank 0 listens on
    ``master_addr:port`` (localhost for the mp executor, rank 0's node for Ray). ``device_index``
    is the CUDA device this rank uses among those it sees (default: its rank)."""
    import datetime

    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(rank if device_index is None else device_index)
    host = f"[{master_addr}]" if ":" in master_addr else master_addr  # an IPv6 address
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(minutes=10))
    return TPGroup(rank=rank, world_size=world_size, group=None)


def parallel_groups(world: TPGroup, tp_size: int, cp_size: int) -> tuple[TPGroup, TPGroup]:
    """(tensor-parallel group, context-parallel group) of this rank when ``world`` (the default
    group, tp_size * cp_size ranks) runs both: global rank = cp_rank * tp_size + tp_rank, so the
    ranks of one context-parallel rank split the weights among themselves, and the ranks of one
    tensor-parallel rank (the same heads) split the tokens and pass their keys around the ring.
    At size 1 a group is ``TPGroup.single()``. Every rank must call this (new_group is
    collective), in the same order."""
    import torch.distributed as dist

    if tp_size * cp_size != world.world_size:
        raise ValueError(f"{tp_size} x {cp_size} ranks != world size {world.world_size}")
    if cp_size == 1:
        return world, TPGroup.single()
    if tp_size == 1:
        return TPGroup.single(), world
    cp_rank, tp_rank = divmod(world.rank, tp_size)
    tp = cp = None
    for c in range(cp_size):  # every rank creates every group, each keeps its own
        g = dist.new_group([c * tp_size + t for t in range(tp_size)])
        if c == cp_rank:
            tp = TPGroup(rank=tp_rank, world_size=tp_size, group=g)
    for t in range(tp_size):
        g = dist.new_group([c * tp_size + t for c in range(cp_size)])
        if t == tp_rank:
            cp = TPGroup(rank=cp_rank, world_size=cp_size, group=g)
    return tp, cp

