"""One tensor-parallel rank in its own process: a ModelRunner driven over a pipe.

The executor sends pickled ``(method, args)`` messages; the worker runs them on its runner and
answers ``("ok", result)`` or ``("error", exception)``. Only rank 0 sends back a step's
``RunnerOutput``; the other ranks answer ``None`` (they compute, they do not sample). Messages
named in ``NO_REPLY`` are applied without an answer (a failure is reported with the next one).
The worker exits when the executor says ``shutdown``, when its pipe closes, or when its parent
process is gone (a watchdog thread), so a killed engine leaves no worker behind.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import threading
import time
import traceback
from typing import Any

NO_REPLY = frozenset({"update_states"})


class Worker:
    """The rank's runner and the methods every executor calls on it (the mp worker loop below, a
    Ray actor in ray_executor.py). ``local_world_size`` is the number of ranks sharing this
    machine's cores; ``master_addr`` / ``device_index`` as in ``init_distributed``."""

    def __init__(self, args, rank: int, world_size: int, port: int, master_addr: str = "127.0.0.1",
                 local_world_size: int | None = None, device_index: int | None = None):
        import torch

        from soarllm.model.parallel_state import init_distributed, parallel_groups
        from soarllm.model.runner import ModelRunner

        # the cores shared by the ranks (and by data-parallel replicas, which set worker_threads)
        torch.set_num_threads(args.worker_threads
                              or max(1, (os.cpu_count() or 1) // (local_world_size or world_size)))
        self.tp = init_distributed(rank, world_size, port, args.resolved_device(),
                                   master_addr=master_addr, device_index=device_index)
        # the ranks split the weights (tensor parallel), the tokens (context parallel) or both
        tp, cp = parallel_groups(self.tp, args.tensor_parallel_size, args.context_parallel_size)
        self.runner = ModelRunner(args, tp=tp, cp=cp)

    # -- methods the executor calls --------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        r = self.runner
        return {"max_model_len": r.max_model_len, "vocab_size": r.model.vocab_size,
                "row_tile": r.row_tile, "pid": os.getpid(), "host": socket.gethostname()}

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def execute(self, so):
        out = self.runner.execute(so)
        return out if self.tp.is_driver else None

    def update_states(self, so) -> None:
        self.runner.update_states(so)

    def expert_load(self) -> list[list[int]] | None:
        return self.runner.expert_load()

    def dequantized_weight(self, module: str):
        """The float32 weight this rank computes with in ``module`` (a linear layer: [out, in];
        an MoE layer's experts: {stack name: [experts, rows, cols]}), for tests and comparisons
        of quantized shards."""
        return dequantized_weight(self.runner.model.get_submodule(module))

    def parameter_bytes(self, name_contains: str = "") -> int:
        """Bytes of this rank's model parameters (tied ones counted once), only those whose name
        contains ``name_contains`` if given."""
        seen: set[int] = set()
        total = 0
        for name, p in self.runner.model.named_parameters():
            if name_contains not in name or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
        return total

    def kv_cache_bytes(self) -> int:
        """Bytes of this rank's KV cache (every layer)."""
        return sum(c.numel() * c.element_size() for c in self.runner.kv_caches)

    def comm_stats(self, reset: bool = False) -> tuple[float, int]:
        """(seconds, calls) of this rank's collectives, over its tensor- and context-parallel
        groups (one object when only one of them is split)."""
        groups = {id(g.comm): g.comm for g in (self.tp, self.runner.tp, self.runner.cp)}
        stats = (sum(c.seconds for c in groups.values()), sum(c.calls for c in groups.values()))
        if reset:
            for c in groups.values():
                c.seconds, c.calls = 0.0, 0
        return stats


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # the engine is gone: nobody will stop us otherwise
        time.sleep(0.5)


def _error(e: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError carrying its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        text = "".join(traceback.format_exception_only(type(e), e)).strip()
        return RuntimeError(text)


def worker_main(args, rank: int, world_size: int, port: int, conn, parent_pid: int) -> None:
    """Process entry point (spawned, or forked by ``multiproc.prestart_workers``)."""
    # Ctrl-C reaches the engine, which stops us. So does a SIGTERM sent to the whole group
    # (systemd's default KillMode, `pkill -f "soar serve"`, which also matches a forked worker's
    # command line): the engine drains its requests first, then stops us (a polite message, else
    # SIGKILL); if it dies instead, the parent watch below ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="soar-parent-watch").start()
    try:
        worker = Worker(args, rank, world_size, port)
        conn.send_bytes(pickle.dumps(("ok", worker.info())))
    except BaseException as e:
        traceback.print_exc()
        conn.send_bytes(pickle.dumps(("error", _error(e))))
        return
    pending: BaseException | None = None  # a failed NO_REPLY message, reported with the next answer
    while True:
        try:
            method, margs = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if method == "shutdown":
            return
        try:
            result = getattr(worker, method)(*margs)
            reply = ("ok", result)
        except Exception as e:
            if rank == 0 or method in NO_REPLY:
                traceback.print_exc()
            reply = ("error", _error(e))
        if method in NO_REPLY:
            if reply[0] == "error" and pending is None:
                pending = reply[1]
            continue
        if pending is not None:
            reply, pending = ("error", pending), None
        conn.send_bytes(pickle.dumps(reply))


def dequantized_weight(mod):
    """See ``Worker.dequantized_weight`` (also used on a one-rank model)."""
    from soarllm.quant.moe import dequantize_expert

    method = getattr(mod, "quant_method", None)
    if hasattr(method, "dequantized_weight"):
        return method.dequantized_weight(mod).float()
    if hasattr(mod, "gate_up_proj"):  # FusedMoE
        import torch

        out = {}
        for stack in ("gate_up_proj", "down_proj"):
            w = getattr(mod, stack).data
            scale, zero = getattr(mod, f"{stack}_scale", None), getattr(mod, f"{stack}_zero", None)
            out[stack] = (w.float() if scale is None else torch.stack([
                dequantize_expert(w[e], scale[e], None if zero is None else zero[e])
                for e in range(w.shape[0])]))
        return out
    return mod.weight.data.float()
