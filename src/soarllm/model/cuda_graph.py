"""CUDA graphs for decode steps: the decoder stack captured once per padded batch size, replayed.

A decode step of a large model on a GPU is a few milliseconds of kernels, launched one by one from
Python: hundreds of launches whose CPU cost is of the same order. Captured into a CUDA graph, the
whole stack is one launch. Graphs are captured at start (after compilation and warm-up, with a
progress bar) for batch sizes 1, 2, 4, 8, 16, 24, 32, 48, 64 and so on up to the engine's
``max_num_seqs``; a step whose attention rows are all one-token decodes (plain decodes and the
1 + k rows of speculative verifications) replays the smallest graph that fits, its inputs copied
into static buffers and the extra rows padded: slot -1 (the backend writes no KV for it) and
context length 0 (attention returns zeros for it). Anything else (prefill chunks, a larger batch)
runs as before. ``enforce_eager`` captures nothing.

Only attention backends that read nothing but device tensors on their decode path can be captured
(``supports_cuda_graphs``, the Triton backend); with the reference backend the runner stays
uncaptured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from soarllm.kernels.attention import AttentionMetadata
from soarllm.model.forward_context import set_forward_context

logger = logging.getLogger(__name__)


def capture_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256 (vLLM's spacing), capped at
    ``max_rows``; the cap itself is always included."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 257, 16))
    cap = max(1, min(max_rows, 256))
    out = [s for s in sizes if s < cap]
    return out + [cap]


class DecodeGraphs:
    """Static input buffers plus one captured graph per size; ``run`` pads, copies and replays."""

    def __init__(self, backbone: Callable, backend, kv_caches: list[torch.Tensor],
                 max_rows: int, max_blocks: int, device: str):
        self.backbone = backbone
        self.backend = backend
        self.kv_caches = kv_caches
        self.device = device
        self.sizes = capture_sizes(max_rows)
        n = self.sizes[-1]
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.slot_mapping = torch.full((n,), -1, **long)
        self.seq_lens = torch.zeros(n, **long)
        self.block_tables = torch.zeros(n, max_blocks, **long)
        self.query_start_loc = torch.arange(n + 1, **long)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def _meta(self, size: int) -> AttentionMetadata:
        # The lists are placeholders: a graph-capturable backend reads only the tensors on its
        # decode path, so what the lists say is never baked into a graph.
        return AttentionMetadata(
            positions=self.positions[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            logits_indices=self.query_start_loc[:size],
            num_decodes=size,
            query_lens_cpu=[1] * size,
            query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=[0] * size,
        )

    def capture(self) -> None:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
        # largest first: the smaller graphs reuse its memory pool
        for size in tqdm(sorted(self.sizes, reverse=True), desc="capturing CUDA graphs",
                         unit="graph", leave=False, disable=None):
            self.graphs[size], self.outputs[size] = self._capture_one(size, pool)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (decode batch sizes up to %d) in %.1fs",
                    len(self.graphs), self.max_size, time.perf_counter() - t0)

    def _capture_one(self, size: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Run the stack once on the static buffers (any lazy initialisation happens outside the
        capture), then capture it; returns the graph and its output tensor."""
        with set_forward_context(self._meta(size), self.backend):
            self.backbone(self.input_ids[:size], self.positions[:size], self.kv_caches)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.backbone(self.input_ids[:size], self.positions[:size], self.kv_caches)
        return graph, out

    def size_for(self, rows: int) -> int | None:
        for size in self.sizes:
            if size >= rows:
                return size
        return None

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay for a batch of ``rows`` one-token decode rows; returns hidden states [rows, H]."""
        rows = input_ids.shape[0]
        size = self.size_for(rows)
        width = meta.block_tables.shape[1]
        self.input_ids[:rows].copy_(input_ids, non_blocking=True)
        self.positions[:rows].copy_(meta.positions, non_blocking=True)
        self.slot_mapping[:rows].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:rows].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:rows, :width].copy_(meta.block_tables, non_blocking=True)
        if size > rows:  # padding rows: no KV write, nothing attended, position 0
            self.slot_mapping[rows:size].fill_(-1)
            self.seq_lens[rows:size].zero_()
            self.positions[rows:size].zero_()
            self.input_ids[rows:size].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:rows]
