"""KV cache offload to host memory: requests whose KV is larger than the device's memory.

With ``kv_offload`` the runner keeps every layer's paged KV cache in host memory (pinned on CUDA,
sized by ``kv_cache_memory`` against the host's RAM) and the device holds only what one layer of
one step reads. Per step, :meth:`KVOffload.plan` collects the blocks the step's attention rows
read or write (each row's first ceil(seq_len / block_size) blocks) and renumbers the step's block
tables and slots into a staging buffer of just those blocks; per layer, :meth:`KVOffload.fetch`
copies that layer's blocks into the staging buffer on the device, attention runs over it as over
any paged cache, and :meth:`KVOffload.store` copies the blocks the step wrote back to the host.

Device memory for KV is then one layer's blocks of one step instead of every layer's whole cache,
so a request of N tokens needs 1 / num_layers of its KV on the device (a 1M-token Llama-3-8B
request: ~4 GiB of its ~122 GiB). The price is moving the step's KV over the host link once per
layer per step (both ways for the blocks written): a capacity option, not a fast path. Nothing is
overlapped yet (each layer's copy runs before its attention on the same stream), the compiled CPU
step and CUDA graphs are off, and context parallelism is refused with it. The scheduler, prefix
cache and block tables are unchanged: block ids are host block ids everywhere except inside the
attention call.
"""

from __future__ import annotations

import numpy as np
import torch


class KVOffload:
    """The host-resident caches of one runner and the staging of the current step."""

    def __init__(self, host_caches: list[torch.Tensor], block_size: int, device: str):
        self.host = host_caches
        self.block_size = block_size
        self.device = device
        self._ids = torch.zeros(0, dtype=torch.int64)  # host block of each staged block
        self._written = torch.zeros(0, dtype=torch.int64)  # host blocks this step writes ...
        self._written_staged = torch.zeros(0, dtype=torch.int64)  # ... and where they are staged
        self._pinned: torch.Tensor | None = None  # CUDA: host gather buffer, pinned
        self.staged_blocks = 0  # blocks staged this step (one layer's worth on the device)
        self.peak_staged_blocks = 0

    def plan(self, block_tables: np.ndarray, seq_lens: np.ndarray,
             slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The step's block tables [rows, blocks] and slots, renumbered into the staging buffer
        (entries past a row's blocks point at staged block 0 and are never read)."""
        bs = self.block_size
        used = -(-seq_lens // bs)
        cols = np.arange(block_tables.shape[1])
        read = block_tables[cols[None, :] < used[:, None]]
        valid = slots >= 0
        written = np.unique(slots[valid] // bs)
        ids = np.unique(np.concatenate([read, written]))
        lut = np.zeros(self.host[0].shape[1], dtype=np.int64)  # host block -> staged block
        lut[ids] = np.arange(len(ids))
        staged_tables = lut[block_tables]
        staged_slots = np.where(valid, lut[np.where(valid, slots, 0) // bs] * bs + slots % bs,
                                slots)
        self._ids = torch.from_numpy(ids)
        self._written = torch.from_numpy(written)
        self._written_staged = torch.from_numpy(lut[written])
        self.staged_blocks = len(ids)
        self.peak_staged_blocks = max(self.peak_staged_blocks, len(ids))
        return staged_tables, staged_slots

    def fetch(self, host: torch.Tensor) -> torch.Tensor:
        """This layer's staged blocks on the device: [planes, staged, block_size, H, D]."""
        if self.device == "cpu":
            return host.index_select(1, self._ids)
        shape = (host.shape[0], len(self._ids), *host.shape[2:])
        buf = self._pinned
        if buf is None or buf.dtype != host.dtype or buf.numel() < np.prod(shape):
            self._pinned = buf = torch.empty(int(np.prod(shape)), dtype=host.dtype,
                                             pin_memory=True)
        staged = buf[: int(np.prod(shape))].view(shape)
        torch.index_select(host, 1, self._ids, out=staged)
        return staged.to(self.device)  # blocking: the next layer reuses the gather buffer

    def store(self, host: torch.Tensor, staged: torch.Tensor) -> None:
        """Copy back the blocks this step wrote (its new keys and values)."""
        if not len(self._written):
            return
        blocks = staged.index_select(1, self._written_staged.to(staged.device))
        host.index_copy_(1, self._written, blocks.to("cpu"))  # blocking: the host copy is final  # blocking: the host copy is final
