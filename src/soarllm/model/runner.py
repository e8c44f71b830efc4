"""ModelRunner: owns the model, its KV cache and the persistent input batch; applies each step
message's deltas to the batch, builds one flat batch from it with vectorized numpy, runs the model
once and samples.

The flat batch puts decodes and speculative verifications first, then prefill chunks, and carries
explicit attention metadata: positions, query start offsets, sequence lengths, slot mapping, block
tables and the rows whose logits are needed. Attention sees a verification of k drafts as k + 1
one-token rows of the same request at consecutive lengths, so it joins the batched decode path.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import mmap
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from soarllm.config import EngineArgs, available_memory_bytes, parse_dtype, parse_memory
from soarllm.errors import ConfigError
from soarllm.kernels import kv_quant
from soarllm.kernels.argmax import argmax_rows
from soarllm.kernels.attention import AttentionMetadata, get_attention_backend
from soarllm.kernels.context_parallel_attention import ContextParallelAttentionBackend
from soarllm.model.compilation import WARMUP_SIZES, CompiledBackbone, compile_backbone
from soarllm.model.context_parallel import gather_logit_rows, shard_step
from soarllm.model.cuda_graph import DecodeGraphs
from soarllm.model.forward_context import set_forward_context
from soarllm.model.input_batch import InputBatch
from soarllm.model.kv_offload import KVOffload
from soarllm.model.layers.fused_moe import FusedMoE
from soarllm.model.layers.rotary import rope_max_position
from soarllm.model.loader import Checkpoint, load_checkpoint
from soarllm.model.loader.dummy import RandomSource
from soarllm.model.loader.memory import release_free_heap
from soarllm.model.parallel_state import TPGroup
from soarllm.model.registry import resolve_model_class
from soarllm.outputs import TokenLogprobs
from soarllm.profiling import StepPhases
from soarllm.quant.base import QuantMethod
from soarllm.quant.config import get_quant_config
from soarllm.sample.metadata import add_grammar_bitmask, build_sampling_metadata
from soarllm.sample.sampler import Sampler, token_logprobs
from soarllm.sample.verifier import follow_candidates, num_accepted
from soarllm.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

# Default KV cache on CPU when kv_cache_memory is not given: this fraction of free memory, capped.
_CPU_DEFAULT_FRACTION = 0.3
_CPU_DEFAULT_CAP = 4 * 2**30
_GPU_DEFAULT_FRACTION = 0.85


# Set as the interpreter begins to exit (before it tears modules down): a background load of the
# compiled step that fails then failed because of the exit, not because of the saved files.
_process_exiting = threading.Event()
atexit.register(_process_exiting.set)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    if device != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, nbytes)  # anonymous: zero-filled lazily by the kernel
    return torch.frombuffer(buf, dtype=dtype).view(shape)


@dataclass
class RunnerOutput:
    # request id -> tokens to append (one for a decode; accepted prefix + bonus when verifying)
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs] | None] = field(default_factory=dict)
    # request id -> (first position, logprobs of the prompt tokens this step covers); the logits
    # at position j give the logprob of prompt token j + 1
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # lookahead decoding: request id -> greedy next tokens of its window rows (not emitted)
    lookahead: dict[str, list[int]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, args: EngineArgs, tp: TPGroup | None = None, cp: TPGroup | None = None):
        self.args = args
        # this runner's tensor-parallel rank; only rank 0 (the driver) samples
        self.tp = tp or TPGroup.single()
        # its context-parallel rank (model/context_parallel.py): the same collectives, over ranks
        # that split the tokens instead of the weights
        self.cp = cp or TPGroup.single()
        self.device = args.resolved_device()
        self.dtype = parse_dtype(args.dtype, self.device)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        self.checkpoint: Checkpoint = load_checkpoint(args.model, args.load_format, args.hf_overrides)
        if isinstance(self.checkpoint.source, RandomSource) and self.device != "cpu":
            self.checkpoint.source = dataclasses.replace(self.checkpoint.source, device=self.device)
        config = self.checkpoint.config
        self.hf_config = config
        model_cls = resolve_model_class(config)
        self.backend = get_attention_backend(
            self.device, _latent_backend(args.attention_backend) if model_cls.latent_kv_cache
            else args.attention_backend)
        self.offload: KVOffload | None = None  # set with the caches when args.kv_offload
        if args.kv_offload and self.cp.world_size > 1:
            raise ConfigError("kv_offload with context_parallel_size > 1 is not supported; the "
                              "ranks already split the KV: use one of them")
        if self.cp.world_size > 1:
            if model_cls.latent_kv_cache:
                raise ConfigError(
                    f"{model_cls.__name__} keeps an MLA latent KV cache, which context "
                    "parallelism does not split yet; run it with context_parallel_size=1")
            self.backend = ContextParallelAttentionBackend(self.cp.rank, self.cp.world_size,
                                                           self.cp.group)
        quant_config = get_quant_config(args.quantization, self.checkpoint, model_cls.packed_modules)
        parallel = {}
        if self.tp.world_size > 1:
            _check_parallel(model_cls, quant_config, self.tp)
            parallel["tp"] = self.tp
        if args.enable_expert_parallel:
            from soarllm.model.models.moe import check_expert_parallel

            check_expert_parallel(model_cls, config, self.tp.world_size, True)
            parallel["enable_expert_parallel"] = True
        if args.expert_dispatch not in ("all_reduce", "all_to_all"):
            raise ConfigError(f"expert_dispatch={args.expert_dispatch!r}: use 'all_reduce' or "
                              "'all_to_all'")
        if args.expert_dispatch == "all_to_all" and not args.enable_expert_parallel:
            raise ConfigError("expert_dispatch='all_to_all' sends tokens to the ranks owning "
                              "their experts: it needs enable_expert_parallel (and "
                              "tensor_parallel_size > 1)")
        with torch.device(self.device):
            self.model = model_cls(config, dtype=self.dtype, backend=self.backend,
                                   quant_config=quant_config, **parallel)
        if quant_config is None:
            self.model.load_weights(self.checkpoint.weights(self.dtype))
        else:
            self.model.load_weights(quant_config.weights(self.checkpoint, self.dtype))
            logger.info("%s", quant_config.summary())
        if args.expert_dispatch == "all_to_all" and self.tp.world_size > 1:
            for module in self.model.modules():
                if isinstance(module, FusedMoE):
                    module.all_to_all = True
        release_free_heap()
        self.model.eval()
        logger.info("model loaded in %.1fs (%s, %s)", time.perf_counter() - t0, model_cls.__name__, self.dtype)
        max_pos = rope_max_position(config)  # max_position_embeddings, stretched by rope scaling
        self.max_model_len = args.max_model_len or max_pos
        if self.max_model_len > max_pos:
            raise ConfigError(
                f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings "
                f"({max_pos}, with its rope scaling); lower max_model_len"
            )
        self.block_size = args.block_size  # slots of one cache block (on this rank)
        self.tokens_per_block = args.tokens_per_block  # tokens of one scheduler block (all ranks)
        # KV cache: the model dtype, or int8 with per-token-head scales (kernels/kv_quant.py)
        self.kv_cache_dtype = kv_quant.parse_kv_cache_dtype(args.kv_cache_dtype)
        self.kv_dtype = torch.int8 if self.kv_cache_dtype == "int8" else self.dtype
        self.sampler = Sampler()
        self.input_batch = InputBatch(args.max_num_seqs, self.max_model_len,
                                      self.tokens_per_block)
        self.phases: StepPhases | None = None  # attach one to time the step's phases
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None  # captured decode steps (CUDA only)
        # the decoder stack the runner calls: compiled after warm-up, else the module itself
        self.backbone = self.model.model
        # a compiled step loading in a background thread, and the loaded one waiting to be
        # adopted at the start of the next step (load_compiled_in_background)
        self._compile_loader: threading.Thread | None = None
        self._compiled_ready: CompiledBackbone | None = None

    # -- KV cache ------------------------------------------------------------------------------

    @property
    def kv_planes(self) -> int:
        """K and V planes of a layer's cache; one for a latent cache (MLA: key = value)."""
        return 1 if self.model.latent_kv_cache else 2

    def kv_bytes_per_block(self) -> int:
        m = self.model
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        d = kv_quant.stored_head_dim(m.head_dim, self.kv_cache_dtype)
        return self.kv_planes * m.num_layers * self.block_size * m.num_kv_heads * d * elem

    @property
    def kv_device(self) -> str:
        """Where the KV caches live: host memory with kv_offload, else the model's device."""
        return "cpu" if self.args.kv_offload else self.device

    def determine_num_blocks(self) -> int:
        if self.args.num_gpu_blocks_override:
            return self.args.num_gpu_blocks_override
        setting = self.args.kv_cache_memory
        where = self.kv_device
        if setting is None:
            free = available_memory_bytes(where)
            if where == "cpu":
                budget = min(free * _CPU_DEFAULT_FRACTION, _CPU_DEFAULT_CAP)
            else:
                budget = free * _GPU_DEFAULT_FRACTION
        else:
            kind, value = parse_memory(setting)
            budget = value * available_memory_bytes(where) if kind == "fraction" else value
        if where == "cpu":  # the ranks of a CPU engine (or host caches) share one memory: split
            budget /= self.tp.world_size * self.cp.world_size
        num_blocks = int(budget // self.kv_bytes_per_block())
        if num_blocks * self.tokens_per_block < self.max_model_len:
            need = -(-self.max_model_len // self.tokens_per_block) * self.kv_bytes_per_block()
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
        d = kv_quant.stored_head_dim(m.head_dim, self.kv_cache_dtype)
        shape = (self.kv_planes, num_blocks, self.block_size, m.num_kv_heads, d)
        self.kv_caches = [_zeros(shape, self.kv_dtype, self.kv_device) for _ in range(m.num_layers)]
        if self.args.kv_offload:
            self.offload = KVOffload(self.kv_caches, self.block_size, self.device)
        self.compile_and_warm_up()
        self.capture_cuda_graphs()
        self.reset_expert_load()  # the warm-up and capture runs routed no request's tokens

    # -- load-balance statistics ---------------------------------------------------------------

    def expert_load(self) -> list[list[int]] | None:
        """Tokens routed to each expert since start, one row per MoE layer (None: no experts).
        Every rank routes the whole batch, so every rank's counts are the model's."""
        loads = [m.expert_load for m in self.model.modules() if isinstance(m, FusedMoE)]
        return [t.tolist() for t in loads] if loads else None

    @property
    def row_tile(self) -> tuple[int, int]:
        """(tile, limit): steps of fewer than ``limit`` tokens cost the same for every count in a
        block of ``tile`` (a kernel that computes rows in blocks; quant/w4a16.py's ROW_TILE).
        (1, 0) where no layer says so."""
        tiles = [m.row_tile for m in self.model.modules() if getattr(m, "row_tile", None)]
        if not tiles:
            return (1, 0)
        return (max(t for t, _ in tiles), min(lim for _, lim in tiles))

    def reset_expert_load(self) -> None:
        for m in self.model.modules():
            if isinstance(m, FusedMoE):
                m.expert_load.zero_()

    # -- compilation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def compile_and_warm_up(self) -> None:
        """Compile the decoder stack and run it once per warm-up size, so no request pays for
        compilation; any compile failure leaves the runner eager (with a warning), never broken."""
        all_to_all = self.args.expert_dispatch == "all_to_all" and self.tp.world_size > 1
        if self.cp.world_size > 1 or self.offload is not None or all_to_all:  # eager for now
            return
        compiled = compile_backbone(self.model.model, self.device, self.args.enforce_eager,
                                    cache_tag=f"tp{self.tp.rank}/{self.tp.world_size}")
        if compiled is None:
            return
        prepare = getattr(self.backend, "prepare_compiled", None)
        if prepare is not None:
            prepare()
        for module in self.model.modules():
            method = getattr(module, "quant_method", None)
            if isinstance(method, QuantMethod):
                method.prepare_compiled(module)
        if (self.args.load_compiled_in_background and self.tp.world_size == 1
                and compiled.saved(self.kv_caches)):
            self._load_compiled_in_background(compiled)
            return
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        try:
            for size in tqdm(WARMUP_SIZES, desc="compiling the model step", unit="graph",
                             leave=False, disable=None):
                meta = _warmup_metadata(size, self.device)
                with set_forward_context(meta, self.backend):
                    compiled.warm_up(torch.zeros(size, dtype=torch.long, device=self.device),
                                     meta.positions, self.kv_caches)
        except Exception as e:  # an inductor/compiler failure must not take the engine down
            logger.warning("torch.compile failed (%s: %s); running the model eagerly",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return
        finally:
            for cache in self.kv_caches:  # the warm-up wrote block 0: leave it as allocated
                cache[:, 0].zero_()
        compiled.finish_warm_up()
        self.backbone = compiled
        if compiled.compiled:
            logger.info("model step compiled in %.1fs (saved for the next start)",
                        time.perf_counter() - t0)
        else:
            logger.info("model step loaded compiled in %.1fs", time.perf_counter() - t0)

    def _load_compiled_in_background(self, compiled: CompiledBackbone) -> None:
        """Load the saved graphs in a thread while the runner goes on eagerly; the first step after
        they are loaded switches to them (``execute``). Loading is Python work that holds the
        GIL: the interpreter's switch interval drops to 1 ms meanwhile, or each of the eager
        step's few hundred op calls could wait 5 ms to take the GIL back (8 tokens of the
        default model took 27 s instead of 0.1 s beside a busy thread)."""
        # the warm-up's inputs (ids and positions both zeros, two tensors: the guards check that
        # they do not alias), to check the guards on
        inputs = [tuple(torch.zeros(size, dtype=torch.long, device=self.device) for _ in range(2))
                  for size in WARMUP_SIZES]

        def load() -> None:
            t0 = time.perf_counter()
            interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, 0.001))
            error: Exception | None = None
            try:
                with torch.inference_mode():  # as the graphs run (their guards check it)
                    ok = compiled.load_saved(inputs, self.kv_caches)
            except Exception as e:  # never take the engine down: it runs eagerly on
                ok, error = False, e
            finally:
                sys.setswitchinterval(interval)
            if not ok:
                if _process_exiting.is_set() or sys.is_finalizing():
                    return  # the process stopped under the load: the files are not to blame
                compiled.forget_saved(self.kv_caches)
                why = f" ({type(error).__name__}: {error})" if error is not None else ""
                logger.warning("the saved compiled model step could not be loaded%s: running the "
                               "model eagerly (the next start compiles it again)", why)
                return
            compiled.finish_warm_up()
            self._compiled_ready = compiled
            logger.info("model step loaded compiled in %.1fs (in the background, the model "
                        "ran eagerly meanwhile)", time.perf_counter() - t0)

        self._compile_loader = threading.Thread(target=load, name="soarllm-load-compiled",
                                                daemon=True)
        self._compile_loader.start()

    def wait_for_compiled(self, timeout: float | None = None) -> bool:
        """Wait for a background load of the compiled step (if one runs); whether the runner
        now steps through compiled graphs."""
        if self._compile_loader is not None:
            self._compile_loader.join(timeout)
        self._adopt_compiled()
        return self.backbone is not self.model.model

    def _adopt_compiled(self) -> None:
        ready, self._compiled_ready = self._compiled_ready, None
        if ready is not None:
            self.backbone = ready

    def capture_cuda_graphs(self) -> None:
        """Capture decode steps as CUDA graphs (model/cuda_graph.py) where the device and the
        attention backend allow; a failed capture leaves the runner uncaptured, with a warning."""
        self.graphs = None
        if (not self.device.startswith("cuda") or self.args.enforce_eager
                or self.offload is not None  # the staged blocks change every step
                or not getattr(self.backend, "supports_cuda_graphs", False)):
            return
        graphs = DecodeGraphs(self.backbone, self.backend, self.kv_caches,
                              max_rows=self.args.max_num_seqs,
                              max_blocks=self.input_batch.max_num_blocks, device=self.device)
        try:
            with torch.inference_mode():
                graphs.capture()
        except Exception as e:  # a capture failure must not take the engine down
            logger.warning("CUDA graph capture failed (%s: %s); decode steps run uncaptured",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return
        finally:
            for cache in self.kv_caches:  # capture runs wrote nothing (slot -1), but be sure
                cache[:, 0].zero_()
        self.graphs = graphs

    # -- one step ------------------------------------------------------------------------------

    def _move_kv(self, r: int, src_positions: list[int], dst_start: int, count: int) -> None:
        """Copy the KV of the first ``count`` of ``src_positions`` (cache indices of request row
        r) to indices dst_start.. : an accepted lookahead candidate's tokens to where their
        positions belong."""
        b, bs = self.input_batch, self.block_size
        src = np.asarray(src_positions[:count], dtype=np.int64)
        dst = np.arange(dst_start, dst_start + count, dtype=np.int64)
        to_slot = lambda p: b.block_table[r, p // bs] * bs + p % bs  # noqa: E731
        where = self.kv_caches[0].device  # host memory with kv_offload
        s = torch.from_numpy(to_slot(src)).to(where)
        d = torch.from_numpy(to_slot(dst)).to(where)
        for cache in self.kv_caches:
            flat = cache.view(cache.shape[0], -1, *cache.shape[3:])
            flat[:, d] = flat[:, s]

    def update_states(self, so: SchedulerOutput) -> None:
        """Apply the step message's deltas to the persistent batch."""
        batch = self.input_batch
        for rid in so.finished_req_ids:
            batch.remove(rid)
        for rid in so.preempted_req_ids:
            batch.remove(rid)
        for new in so.new_reqs:
            batch.add(new)
        for cached in so.cached_reqs:
            batch.update(cached)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        t_start = time.perf_counter()
        if self._compiled_ready is not None:
            self._adopt_compiled()
        self.update_states(so)
        if so.is_empty:
            return RunnerOutput()
        b = self.input_batch
        bs = self.tokens_per_block
        ids = list(so.num_scheduled_tokens)
        rows = np.fromiter((b.row_of[r] for r in ids), dtype=np.int64, count=len(ids))
        n = np.fromiter(so.num_scheduled_tokens.values(), dtype=np.int64, count=len(ids))
        num_spec = np.zeros(len(ids), dtype=np.int64)
        for rid, spec in so.spec_token_ids.items():
            i = ids.index(rid)
            b.write_spec_tokens(int(rows[i]), spec)
            num_spec[i] = len(spec)
        layouts = so.spec_layouts
        laid_out = np.zeros(len(ids), dtype=np.bool_)  # lookahead rows: one masked row each
        for rid in layouts:
            laid_out[ids.index(rid)] = True
        start = b.num_computed_tokens[rows]
        seq_lens = start + n
        # A verification (last known token + drafts, nothing else) attends like n decodes of the
        # same request at consecutive lengths: the drafts' KV is written before attention reads.
        single = ((n == 1) | ((num_spec > 0) & (n == num_spec + 1))) & ~laid_out
        # Decodes and verifications first, shortest context first, so attention can gather them
        # in length buckets; prefill chunks after.
        order = np.lexsort((seq_lens, ~single))
        single = single[order]
        rows, n, start, seq_lens, num_spec = rows[order], n[order], start[order], seq_lens[order], num_spec[order]
        laid_out = laid_out[order]
        ids = [ids[i] for i in order]
        qsl = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(n, out=qsl[1:])
        req_idx = np.repeat(np.arange(len(ids)), n)
        positions = start[req_idx] + np.arange(int(qsl[-1])) - qsl[req_idx]
        token_rows = rows[req_idx]
        input_ids = b.token_ids[token_rows, positions]
        slots = b.block_table[token_rows, positions // bs] * bs + positions % bs
        custom_masks = None
        if laid_out.any():
            # KV goes to the slots in row order (above); rotary positions and masks follow the layout
            custom_masks = []
            for i in range(len(ids)):
                if not laid_out[i]:
                    custom_masks.append(None)
                    continue
                lay = layouts[ids[i]]
                positions[qsl[i] : qsl[i + 1]] = start[i] + np.asarray(lay.positions)
                mask = torch.ones((int(n[i]), int(seq_lens[i])), dtype=torch.bool)
                mask[:, int(start[i]) :] = torch.from_numpy(lay.mask)
                custom_masks.append(mask.to(self.device))
        # Attention rows: one per query token of a decode or verification, one per prefill chunk.
        att_count = np.where(single, n, 1)
        att_req = np.repeat(np.arange(len(ids)), att_count)
        att_off = np.arange(len(att_req)) - np.repeat(np.cumsum(att_count) - att_count, att_count)
        att_single = single[att_req]
        att_qlen = np.where(att_single, 1, n[att_req])
        att_seq = np.where(att_single, start[att_req] + att_off + 1, seq_lens[att_req])
        att_qsl = np.zeros(len(att_req) + 1, dtype=np.int64)
        np.cumsum(att_qlen, out=att_qsl[1:])
        block_tables = b.block_table[rows[att_req], : int(b.num_blocks[rows].max())]
        # A request samples when this step reaches the end of its known tokens: at its last known
        # token and, when verifying, after each of its draft tokens (1 + num_spec positions).
        samples = seq_lens - num_spec >= b.num_tokens[rows]
        sample_idx = np.nonzero(samples)[0]
        window_flat = np.zeros(0, dtype=np.int64)
        if laid_out.any():
            sample_flat, sample_off, per_req, window_flat = _laid_out_samples(
                sample_idx, laid_out, layouts, ids, n, num_spec, qsl)
            sample_req = np.repeat(np.arange(len(sample_idx)), per_req)
        else:
            per_req = num_spec[sample_idx] + 1
            sample_req = np.repeat(np.arange(len(sample_idx)), per_req)
            sample_off = (np.arange(int(per_req.sum()))
                          - np.repeat(np.cumsum(per_req) - per_req, per_req))
            sample_flat = (qsl[1:][sample_idx] - per_req)[sample_req] + sample_off
        # Prompt logprobs: the logits at prompt position j give the logprob of prompt token j + 1.
        prompt_lp: list[tuple[int, int, int, int]] = []  # (batch index, first flat row, count, start)
        prompt_flat: list[np.ndarray] = []
        wants = (b.num_prompt_logprobs[rows] >= 0) & (start < b.num_prompt_tokens[rows] - 1)
        for i in np.nonzero(wants)[0].tolist():
            count = int(min(seq_lens[i], b.num_prompt_tokens[rows[i]] - 1) - start[i])
            prompt_lp.append((i, sum(len(x) for x in prompt_flat), count, int(start[i])))
            prompt_flat.append(np.arange(qsl[i], qsl[i] + count))
        logits_rows = np.concatenate(prompt_flat + [sample_flat, window_flat]).astype(np.int64)
        num_prompt_rows = sum(len(x) for x in prompt_flat)
        dev = self.device
        if self.offload is not None:  # block ids into the staging of this step's blocks
            block_tables, slots = self.offload.plan(block_tables, att_seq, slots)
        local = None
        if self.cp.world_size > 1:  # this rank's tokens only
            if so.spec_token_ids or layouts:  # every rank refuses alike, before any collective
                raise ConfigError("speculative decoding (a request's `prediction` included) is "
                                  "not supported with context_parallel_size > 1; send the "
                                  "request without a prediction")
            local = shard_step(positions, slots, req_idx, single, logits_rows, self.block_size,
                               self.cp.rank, self.cp.world_size)
            positions, input_ids, slots = positions[local.keep], input_ids[local.keep], local.slots
            att_qsl = local.query_start_loc
            att_qlen = np.diff(att_qsl)
        meta = AttentionMetadata(
            positions=torch.from_numpy(positions).to(dev),
            query_start_loc=torch.from_numpy(att_qsl).to(dev),
            seq_lens=torch.from_numpy(att_seq).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.from_numpy(np.ascontiguousarray(block_tables)).to(dev),
            logits_indices=torch.from_numpy(logits_rows).to(dev),
            num_decodes=int(att_single.sum()),
            query_lens_cpu=att_qlen.tolist(),
            query_start_loc_cpu=att_qsl.tolist(),
            seq_lens_cpu=att_seq.tolist(),
            decode_group_sizes_cpu=n[single].tolist(),
            custom_masks=custom_masks,
        )
        input_t = torch.from_numpy(input_ids.astype(np.int64)).to(dev)
        t_forward = time.perf_counter()
        graphs = self.graphs
        if (graphs is not None and meta.num_decodes == len(input_ids)
                and len(input_ids) <= graphs.max_size):
            hidden = graphs.run(input_t, meta)  # every row a one-token decode: replay
        else:
            with set_forward_context(meta, self.backend, self.offload):
                hidden = self.backbone(input_t, meta.positions, self.kv_caches)
        out = RunnerOutput()
        if local is not None:
            if len(logits_rows):
                hidden = gather_logit_rows(hidden, local, self.cp)
            if not self.cp.is_driver:
                return out
        if len(logits_rows):
            rows_h = hidden if local is not None else hidden[meta.logits_indices]
            logits = self.model.compute_logits(rows_h)
        t_sample = time.perf_counter()
        if self.phases is not None:
            self.phases.add("prepare", t_forward - t_start)
            self.phases.add("forward", t_sample - t_forward)
            self.phases.tokens += len(input_ids)
        if not len(logits_rows) or not self.tp.is_driver:
            return out
        for i, row0, count, first in prompt_lp:
            r = int(rows[i])
            lp = torch.log_softmax(logits[row0 : row0 + count].float(), dim=-1)
            nxt = b.token_ids[r, first + 1 : first + 1 + count].tolist()
            k = int(b.num_prompt_logprobs[r])
            out.prompt_logprobs[ids[i]] = (
                first, [token_logprobs(lp[j], nxt[j], k) for j in range(count)]
            )
        if len(sample_idx):
            md = build_sampling_metadata(b, rows[sample_idx][sample_req], logits.shape[-1], dev,
                                         offsets=sample_off)
            if so.grammar_bitmask is not None:
                add_grammar_bitmask(md, [ids[i] for i in sample_idx.tolist()], per_req,
                                    so.grammar_req_ids, so.grammar_bitmask, dev)
            s0 = num_prompt_rows
            sampled = self.sampler(logits[s0 : s0 + len(sample_flat)], md)
            if len(window_flat):
                window_next = argmax_rows(logits[s0 + len(sample_flat) :]).tolist()
            j = w = 0
            for i, count in zip(sample_idx.tolist(), per_req.tolist()):
                toks = [t[0] for t in sampled.token_ids[j : j + count]]
                r = int(rows[i])
                picks = [0]
                if laid_out[i]:  # lookahead: follow the candidate that matches what is sampled
                    lay = layouts[ids[i]]
                    row_tokens = b.token_ids[r, start[i] : start[i] + n[i]].tolist()
                    picks, best = follow_candidates(toks, lay.candidates, row_tokens)
                    if best > 0 and len(picks) > 1:
                        self._move_kv(r, [int(start[i]) + q for q in lay.candidates[best]],
                                      int(start[i]) + 1, len(picks) - 1)
                    nw = len(lay.window_rows)
                    out.lookahead[ids[i]] = window_next[w : w + nw]
                    w += nw
                elif count > 1:  # verification: the drafts the target agrees with, then its own token
                    drafts = b.token_ids[r, b.num_tokens[r] : b.num_tokens[r] + count - 1].tolist()
                    picks = list(range(num_accepted(toks, drafts) + 1))
                out.sampled[ids[i]] = [toks[q] for q in picks]
                lps = [sampled.logprobs[j + q] for q in picks]
                out.logprobs[ids[i]] = None if lps[0] is None else [lp[0] for lp in lps]
                j += count
        if self.phases is not None:
            self.phases.add("sample", time.perf_counter() - t_sample)
        return out


def _laid_out_samples(sample_idx, laid_out, layouts, ids, n, num_spec, qsl):
    """Flat rows to sample (with their output offsets) per sampling request when some rows are
    laid out (lookahead): the last known token and every candidate token, each at the offset of
    the output position it predicts; plus the flat window rows (greedy, not emitted)."""
    flat, offs, per, window = [], [], [], []
    for i in sample_idx.tolist():
        if laid_out[i]:
            lay = layouts[ids[i]]
            rel = [0] + [q for c in lay.candidates for q in c]
            off = [0] + [d + 1 for c in lay.candidates for d in range(len(c))]
            window.extend(int(qsl[i]) + q for q in lay.window_rows)
        else:
            cnt = int(num_spec[i]) + 1
            rel = list(range(int(n[i]) - cnt, int(n[i])))
            off = list(range(cnt))
        flat.extend(int(qsl[i]) + q for q in rel)
        offs.extend(off)
        per.append(len(rel))
    as_i64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return as_i64(flat), as_i64(offs), as_i64(per), as_i64(window)


def _check_parallel(model_cls, quant_config, tp: TPGroup) -> None:
    if not getattr(model_cls, "supports_tensor_parallel", False):
        raise ConfigError(
            f"{model_cls.__name__} does not support tensor parallelism yet; run it with "
            f"tensor_parallel_size=1")
    if quant_config is not None and not getattr(quant_config, "splits_over_ranks", False):
        raise ConfigError(
            f"quantization {quant_config.name!r} cannot be split over {tp.world_size} ranks yet; "
            f"run tensor parallel models with weights quantized at load (quantization='w8a16', "
            f"'w4a16' or 'w8a8' on the float checkpoint), unquantized (quantization='none'), or "
            f"with tensor_parallel_size=1")


def _latent_backend(name: str | None) -> str:
    """The attention backend for a latent (MLA) KV cache: only the reference backend reads its
    one-plane layout yet, so "auto" means reference there."""
    if (name or "auto").strip().lower() in ("auto", "reference"):
        return "reference"
    raise ConfigError(f"attention_backend={name!r} cannot read the latent KV cache of an MLA "
                      "model (DeepSeek-V2/V3) yet; use attention_backend='reference' or 'auto'")


def _warmup_metadata(num_tokens: int, device: str) -> AttentionMetadata:
    """``num_tokens`` one-token decodes at position 0, all in slot 0 of block 0."""
    zeros = torch.zeros(num_tokens, dtype=torch.long, device=device)
    return AttentionMetadata(
        positions=zeros,
        query_start_loc=torch.arange(num_tokens + 1, device=device),
        seq_lens=torch.ones(num_tokens, dtype=torch.long, device=device),
        slot_mapping=zeros,
        block_tables=torch.zeros(num_tokens, 1, dtype=torch.long, device=device),
        logits_indices=torch.arange(num_tokens, device=device),
        num_decodes=num_tokens,
        query_lens_cpu=[1] * num_tokens,
        query_start_loc_cpu=list(range(num_tokens + 1)),
        seq_lens_cpu=[1] * num_tokens,
    )
