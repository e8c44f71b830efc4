"""Draft-model proposer: a small model that shares the target's tokenizer guesses the next k tokens.

The draft has its own ``ModelRunner`` (own weights, own paged KV cache, own persistent input batch)
in the engine's process. Its guesses are greedy (argmax), so the verifier treats them as a one-hot
draft distribution: acceptance stays lossless for greedy and sampled requests alike.

With no ``model`` the draft is a *self-draft*: the target's own checkpoint cut to its first
``draft_num_layers`` layers (then its final norm and LM head), optionally quantized
(``quantization``), so speculation works with no second checkpoint.

Per request the proposer remembers which tokens its KV cache holds. After a verification the
target's tokens agree with those only up to the first rejected draft: the draft keeps the KV of
that common prefix (its blocks stay; later slots are overwritten) and computes the rest. So its
next proposals equal those of a fresh draft run on the accepted tokens.

All requests that draft in a step are proposed together: one draft forward for the new tokens of
every request (prompt chunks of requests seen for the first time included), then one batched
decode per further draft token.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from soarllm.config import EngineArgs
from soarllm.engine.block_pool import BlockPool
from soarllm.engine.request import Request
from soarllm.errors import ConfigError
from soarllm.sampling_params import SamplingParams
from soarllm.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from soarllm.spec.proposer import Proposer

logger = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


@dataclasses.dataclass
class _DraftSeq:
    tokens: list[int]  # the tokens the draft runner's row holds (the last may have no KV yet)
    num_computed: int  # leading tokens whose KV is in the draft's cache
    block_ids: list[int]
    sent_blocks: int = 0  # blocks the runner's row already has
    synced: int = 0  # the target's length at the last sync: tokens before it never change


def build_draft_proposer(config, target: EngineArgs, target_layers: int, num_blocks: int,
                         max_model_len: int, tokenizer) -> DraftModelProposer:
    """The draft of a ``draft_model`` speculative config (spec/config.py), checked against the
    target before anything is loaded where possible."""
    layers = config.draft_num_layers
    if config.model is None and layers is not None and layers >= target_layers:
        raise ConfigError(
            f"draft_num_layers={layers} is not fewer than the target's {target_layers} layers; a "
            f"self-draft runs the first layers only (try {max(1, target_layers // 4)})"
        )
    args = draft_engine_args(target, config.model, layers, config.quantization)
    return DraftModelProposer(args, num_blocks, max_model_len,
                              tokenizer if config.model is not None else None)


def draft_engine_args(target: EngineArgs, model: str | None, num_layers: int | None,
                      quantization: str | None) -> EngineArgs:
    """The draft's engine arguments: the target's device, dtype and limits, its own checkpoint
    (or the target's, cut to ``num_layers``), compiled and captured like the target unless the
    target runs eagerly."""
    overrides = dict(target.hf_overrides) if model is None else {}
    if num_layers is not None:
        overrides["num_hidden_layers"] = num_layers
    return dataclasses.replace(
        target,
        model=model or target.model,
        tokenizer=None if model else target.tokenizer,
        load_format=target.load_format if model is None else "auto",
        quantization=quantization if quantization is not None else (
            target.quantization if model is None else None),
        hf_overrides=overrides,
        speculative_config=None,
        tensor_parallel_size=1,
        distributed_executor_backend=None,
        enable_expert_parallel=False,  # one process; a dense draft would refuse it
        expert_dispatch="all_reduce",
        kv_cache_memory=None,
        num_gpu_blocks_override=None,
        enable_prefix_caching=False,
    )


class DraftModelProposer(Proposer):
    name = "draft_model"
    expensive = True

    def __init__(self, args: EngineArgs, num_blocks: int, max_model_len: int, tokenizer=None):
        """``tokenizer``: the target's; a draft with its own checkpoint must have the same vocabulary."""
        from soarllm.model.runner import ModelRunner

        t0 = time.perf_counter()
        self.runner = ModelRunner(args)
        if tokenizer is not None:
            from soarllm.model.tokenizer import load_tokenizer

            mine = load_tokenizer(self.runner.checkpoint, args.tokenizer)
            if mine.get_vocab() != tokenizer.get_vocab():
                raise ConfigError(
                    f"the draft model {args.model!r} has another tokenizer than the target "
                    f"({len(mine.get_vocab())} vs {len(tokenizer.get_vocab())} tokens, or the same "
                    "count with other ids); a draft must share the target's vocabulary"
                )
        if self.runner.max_model_len < max_model_len:
            raise ConfigError(
                f"the draft model's context ({self.runner.max_model_len} tokens) is shorter than the "
                f"target's max_model_len ({max_model_len}); lower max_model_len or pick another draft"
            )
        self.block_size = self.runner.block_size
        self.runner.allocate_kv_cache(num_blocks)
        self.pool = BlockPool(num_blocks, enable_caching=False)
        self.seqs: dict[str, _DraftSeq] = {}
        self.vocab_size = self.runner.model.vocab_size
        # draft tokens computed to catch up per call, over all requests (a prompt, or what the
        # target made while drafting rested): a large batch's catch-up is spread over steps
        self.catch_up_tokens = 256
        # the last call: seconds it spent catching up, and whether that left nothing to measure
        self._catch_up_s, self._unmeasured = 0.0, False
        logger.info("draft model ready in %.1fs (%d layers, %d KV blocks)",
                    time.perf_counter() - t0, self.runner.model.num_layers, num_blocks)

    def propose(self, req: Request, k: int) -> list[int]:
        return self.propose_batch([req], [k])[0]

    def propose_batch(self, reqs: list[Request], ks: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in reqs]
        self._catch_up_s, self._unmeasured = 0.0, False
        active = [i for i, k in enumerate(ks) if k > 0 and self._make_room(reqs[i], ks[i])]
        if not active:
            return out
        # Pass 1: every request's tokens the draft has not computed, sampling its first guess. A
        # request far behind (its prompt, or tokens made while drafting rested) catches up in
        # chunks of the step's catch-up budget and guesses once it is level.
        so = SchedulerOutput()
        budget = max(self.catch_up_tokens, 2 * len(active))
        for i in active:
            budget -= self._sync(reqs[i], so, max(budget, 2))
        # a level request syncs 1-2 tokens (the bonus token, a corrected guess): more is catch-up
        catching_up = so.total_num_scheduled_tokens > 2 * len(active)
        t0 = time.perf_counter()
        sampled = self.runner.execute(so).sampled
        first, passes = time.perf_counter() - t0, []
        for i in active:
            out[i] = list(sampled.get(reqs[i].request_id, ()))[:1]
        # Passes 2..k: one batched decode per further guess.
        for step in range(1, max(ks[i] for i in active)):
            so = SchedulerOutput()
            for i in active:
                rid = reqs[i].request_id
                if ks[i] <= step or len(out[i]) < step:
                    continue
                seq = self.seqs[rid]
                tok = out[i][-1]
                so.cached_reqs.append(CachedRequestData(rid, [tok], [], len(seq.tokens)))
                seq.tokens.append(tok)
                seq.num_computed = len(seq.tokens)  # this pass computes tok's KV
                so.num_scheduled_tokens[rid] = 1
            if so.is_empty:
                break
            t0 = time.perf_counter()
            sampled = self.runner.execute(so).sampled
            passes.append(time.perf_counter() - t0)
            for i in active:
                toks = sampled.get(reqs[i].request_id)
                if toks and len(out[i]) == step:
                    out[i].append(toks[0])
        # The last guess of each request was sampled but not fed back: its KV is not computed.
        # Once level, the first pass costs about what the later ones do: beyond that, it caught up.
        if catching_up:
            if passes:
                self._catch_up_s = max(0.0, first - sum(passes) / len(passes))
            else:  # one pass only: its catch-up and its guess cannot be told apart
                self._unmeasured = True
        return out

    def tokens_behind(self, req: Request) -> int:
        seq = self.seqs.get(req.request_id)
        return req.num_tokens - (seq.num_computed if seq is not None else 0)

    def recurring_seconds(self, elapsed: float) -> float | None:
        """The call's time less its catch-up (a prompt, or tokens made while drafting rested):
        the first pass priced like the later ones; None where a catching-up call had no later
        pass to compare with."""
        if self._unmeasured:
            return None
        return max(0.0, elapsed - self._catch_up_s)

    def _make_room(self, req: Request, k: int) -> bool:
        """Blocks for the request's tokens plus k guesses; False when the draft's pool is full."""
        seq = self.seqs.get(req.request_id)
        have = len(seq.block_ids) if seq else 0
        need = -(-(req.num_tokens + k) // self.block_size) - have
        if need <= 0:
            return True
        if need > self.pool.num_free_blocks:
            return False
        new = [b.block_id for b in self.pool.allocate(need)]
        if seq is None:
            self.seqs[req.request_id] = _DraftSeq([], 0, new)
        else:
            seq.block_ids.extend(new)
        return True

    def _sync(self, req: Request, so: SchedulerOutput, budget: int) -> int:
        """Bring the draft's row of ``req`` to the target's tokens and schedule what is missing,
        at most ``budget`` tokens (the rest in later calls); returns the tokens scheduled."""
        rid = req.request_id
        seq = self.seqs[rid]
        target = req.all_token_ids
        n = len(target)
        known = seq.tokens
        # leading tokens the draft's row shares with the target: only the guesses fed to the draft
        # since the last sync can differ
        keep = min(seq.synced, len(known), n)
        limit = min(len(known), n)
        while keep < limit and known[keep] == target[keep]:
            keep += 1
        computed = min(seq.num_computed, keep, n - 1)  # at least one token left to compute
        if not known:  # first time: the whole request
            so.new_reqs.append(NewRequestData(rid, list(target), req.num_prompt_tokens, _GREEDY,
                                              list(seq.block_ids), 0))
        elif keep == len(known):  # the target only appended tokens
            so.cached_reqs.append(CachedRequestData(rid, list(target[keep:]),
                                                    seq.block_ids[seq.sent_blocks:], computed))
        else:  # a rejected guess: rewrite the row from the common prefix
            so.new_reqs.append(NewRequestData(rid, list(target), req.num_prompt_tokens, _GREEDY,
                                              list(seq.block_ids), computed))
        seq.sent_blocks = len(seq.block_ids)
        del known[keep:]
        known.extend(target[keep:])
        seq.synced = n
        count = min(n - computed, budget)
        seq.num_computed = computed + count
        so.num_scheduled_tokens[rid] = count
        return count

    def forget(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return
        self.runner.execute(SchedulerOutput(finished_req_ids=[request_id]))
        self.pool.free([self.pool.blocks[b] for b in reversed(seq.block_ids)])
