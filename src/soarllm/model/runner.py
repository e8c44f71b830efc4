"""ModelRunner: owns the model and its KV cache; turns a SchedulerOutput into one flat batch, runs the
model once and samples.

The flat batch puts single-token requests (decodes) first, then multi-token ones (prefill chunks,
verification), and carries explicit attention metadata: positions, query start offsets, sequence
lengths, slot mapping, block tables and the rows whose logits are needed.
"""

from __future__ import annotations

import logging
import math
import mmap
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from soarllm.config import EngineArgs, available_memory_bytes, parse_dtype, parse_memory
from soarllm.engine.scheduler import SchedulerOutput
from soarllm.errors import ConfigError
from soarllm.kernels.attention import AttentionMetadata, get_attention_backend
from soarllm.model.loader import Checkpoint, load_checkpoint
from soarllm.model.registry import resolve_model_class
from soarllm.outputs import TokenLogprobs
from soarllm.sample.sampler import Sampler, token_logprobs

logger = logging.getLogger(__name__)

# Default KV cache on CPU when kv_cache_memory is not given: this fraction of free memory, capped.
_CPU_DEFAULT_FRACTION = 0.3
_CPU_DEFAULT_CAP = 4 * 2**30
_GPU_DEFAULT_FRACTION = 0.85


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    if device != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, nbytes)  # anonymous: zero-filled lazily by the kernel
    return torch.frombuffer(buf, dtype=dtype).view(shape)


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs | None] = field(default_factory=dict)
    # request id -> (first position, logprobs of the prompt tokens this step covers); the logits
    # at position j give the logprob of prompt token j + 1
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, args: EngineArgs):
        self.args = args
        self.device = args.resolved_device()
        self.dtype = parse_dtype(args.dtype, self.device)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        self.checkpoint: Checkpoint = load_checkpoint(args.model, args.load_format, args.hf_overrides)
        config = self.checkpoint.config
        self.hf_config = config
        model_cls = resolve_model_class(config)
        self.backend = get_attention_backend(self.device)
        with torch.device(self.device):
            self.model = model_cls(config, dtype=self.dtype, backend=self.backend)
        self.model.load_weights(self.checkpoint.weights(self.dtype))
        self.model.eval()
        logger.info("model loaded in %.1fs (%s, %s)", time.perf_counter() - t0, model_cls.__name__, self.dtype)
        max_pos = getattr(config, "max_position_embeddings", None) or 2048
        self.max_model_len = args.max_model_len or max_pos
        if self.max_model_len > max_pos:
            raise ConfigError(
                f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings "
                f"({max_pos}); lower max_model_len"
            )
        self.block_size = args.block_size
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []

    # -- KV cache ------------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        m = self.model
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

    def determine_num_blocks(self) -> int:
        if self.args.num_gpu_blocks_override:
            return self.args.num_gpu_blocks_override
        setting = self.args.kv_cache_memory
        if setting is None:
            free = available_memory_bytes(self.device)
            if self.device == "cpu":
                budget = min(free * _CPU_DEFAULT_FRACTION, _CPU_DEFAULT_CAP)
            else:
                budget = free * _GPU_DEFAULT_FRACTION
        else:
            kind, value = parse_memory(setting)
            budget = value * available_memory_bytes(self.device) if kind == "fraction" else value
        num_blocks = int(budget // self.kv_bytes_per_block())
        if num_blocks * self.block_size < self.max_model_len:
            need = -(-self.max_model_len // self.block_size) * self.kv_bytes_per_block()
            raise ConfigError(
                f"the KV cache ({int(budget) / 2**20:.0f} MiB, {num_blocks} blocks of "
                f"{self.block_size} tokens) cannot hold one request of max_model_len="
                f"{self.max_model_len} tokens, which needs {need / 2**20:.0f} MiB; raise "
                f"kv_cache_memory or lower max_model_len"
            )
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One zeroed [2, num_blocks, block_size, H_kv, D] tensor per layer.

        Zeroed, not empty: padded attention reads unused slots with weight 0, and 0 * NaN = NaN.
        On CPU the memory comes from an anonymous mapping, which the OS hands out zeroed page by
        page as blocks are first used, instead of writing gigabytes of zeros at start-up.
        """
        m = self.model
        shape = (2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [_zeros(shape, self.dtype, self.device) for _ in range(m.num_layers)]

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        # Decodes first, shortest context first, so attention can gather them in length buckets.
        sched = sorted(so.scheduled, key=lambda s: (s.num_new_tokens > 1, s.start))
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        qsl = [0]
        seq_lens: list[int] = []
        prompt_rows: list[int] = []  # flat-batch indices whose logits give prompt logprobs
        sample_rows: list[int] = []  # flat-batch indices whose logits are sampled
        sample_reqs = []
        prompt_lp: list[tuple] = []  # (request, first flat index, count)
        max_blocks = max(len(s.block_ids) for s in sched)
        block_tables = np.zeros((len(sched), max_blocks), dtype=np.int64)
        for i, s in enumerate(sched):
            req, start, n = s.request, s.start, s.num_new_tokens
            toks = req.all_token_ids[start : start + n]
            toks += s.spec_token_ids[: n - len(toks)]
            input_ids.extend(toks)
            pos = np.arange(start, start + n)
            bt = np.asarray(s.block_ids, dtype=np.int64)
            block_tables[i, : len(bt)] = bt
            positions.append(pos)
            slots.append(bt[pos // bs] * bs + pos % bs)
            base = qsl[-1]
            qsl.append(base + n)
            seq_lens.append(start + n)
            if req.wants_prompt_logprobs and start < req.num_prompt_tokens - 1:
                count = min(start + n, req.num_prompt_tokens - 1) - start
                prompt_lp.append((req, len(prompt_rows), count))
                prompt_rows.extend(range(base, base + count))
            if s.samples:
                sample_rows.append(base + n - 1 - len(s.spec_token_ids))
                sample_reqs.append(req)
        logits_rows = prompt_rows + sample_rows
        dev = self.device
        meta = AttentionMetadata(
            positions=torch.from_numpy(np.concatenate(positions)).to(dev),
            query_start_loc=torch.tensor(qsl, device=dev),
            seq_lens=torch.tensor(seq_lens, device=dev),
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            block_tables=torch.from_numpy(block_tables).to(dev),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            num_decodes=sum(1 for s in sched if s.num_new_tokens == 1),
            query_lens_cpu=[qsl[i + 1] - qsl[i] for i in range(len(sched))],
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        hidden = self.model(ids, meta.positions, self.kv_caches, meta)
        out = RunnerOutput()
        if not logits_rows:
            return out
        logits = self.model.compute_logits(hidden[meta.logits_indices])
        for req, row0, count in prompt_lp:
            lp = torch.log_softmax(logits[row0 : row0 + count].float(), dim=-1)
            start = req.num_computed_tokens
            nxt = req.all_token_ids[start + 1 : start + 1 + count]
            out.prompt_logprobs[req.request_id] = (
                start,
                [token_logprobs(lp[j], nxt[j], req.params.prompt_logprobs) for j in range(count)],
            )
        if sample_reqs:
            sampled = self.sampler(logits[len(prompt_rows) :], sample_reqs)
            for req, tok, lp in zip(sample_reqs, sampled.token_ids, sampled.logprobs):
                out.sampled[req.request_id] = tok
                out.logprobs[req.request_id] = lp
        return out
