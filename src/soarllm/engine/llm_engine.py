"""LLMEngine: add requests, call step() until done. Synchronous; the async server wraps it.

Each step: Scheduler.schedule() -> ModelRunner.execute() -> append sampled tokens, detokenize,
check stop conditions, free the blocks of finished requests, and return one RequestOutput per
request that progressed (cumulative text and tokens, plus the delta since its previous output).

Failure containment: when the runner raises, the step's requests are run again one by one, so the
request that breaks (while its inputs are prepared, in the forward, or while sampling) fails alone
and the others go on unchanged. A request that fails is aborted and its error is kept for the
caller (``take_failures``); the step returns the others' outputs as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from soarllm.config import CacheConfig, EngineArgs, SchedulerConfig
from soarllm.distributed.executor import make_executor
from soarllm.engine.detokenizer import IncrementalDetokenizer
from soarllm.engine.failures import RequestFailedError, describe
from soarllm.engine.kv_cache_manager import KVCacheManager
from soarllm.engine.request import Request, RequestStatus
from soarllm.engine.scheduler import Scheduler, new_request_data
from soarllm.errors import ConfigError, ContextLengthError, InvalidRequestError
from soarllm.model.tokenizer import load_tokenizer
from soarllm.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from soarllm.profiling import StepPhases
from soarllm.sampling_params import RequestOutputKind, SamplingParams
from soarllm.scheduler_output import SchedulerOutput
from soarllm.spec.config import SpeculativeConfig
from soarllm.spec.speculator import SpecStats, Speculator
from soarllm.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)

EXPERT_LOAD_REFRESH_S = 1.0  # the expert counters cost a call to every rank: not every step


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    spec: SpecStats | None = None  # speculative decoding counters (drafts, accepted, per position)
    # MoE load balance: tokens routed to each expert since start, one row per MoE layer (None: a
    # dense model); read from the runner at most every EXPERT_LOAD_REFRESH_S
    expert_load: list[list[int]] | None = None


class _Group:
    """The n sequences of one user request and what was already handed out for each."""

    def __init__(self, request_id: str, prompt: str | None, children: list[Request], detoks):
        self.request_id = request_id
        self.prompt = prompt
        self.children = children
        self.detoks: list[IncrementalDetokenizer] = detoks
        self.sent_tokens = [0] * len(children)
        self.prompt_logprobs_sent = False
        self.final_only = children[0].params.output_kind is RequestOutputKind.FINAL_ONLY

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        spec_config = SpeculativeConfig.parse(args.speculative_config)  # refused before loading
        if spec_config is not None and spec_config.method == "lookahead" and args.tensor_parallel_size > 1:
            raise ConfigError(
                "lookahead decoding needs tensor_parallel_size 1 (the accepted guess's KV is moved "
                "by the sampling rank only); use method ngram or draft_model with tensor parallelism"
            )
        self.executor = make_executor(args)
        self.model_name = args.model
        self.max_model_len = self.executor.max_model_len
        self.tokenizer = load_tokenizer(self.executor.checkpoint, args.tokenizer)
        self.vocab_size = self.executor.vocab_size
        self.eos_token_ids = _eos_ids(self.executor.hf_config, self.tokenizer)
        num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_kv_cache(num_blocks)
        self.cache_config = CacheConfig(args.tokens_per_block, num_blocks, args.enable_prefix_caching)
        budget = args.max_num_batched_tokens or (
            max(2048, args.tokens_per_block) if args.enable_chunked_prefill else self.max_model_len
        )
        if not args.enable_chunked_prefill:
            budget = max(budget, self.max_model_len)
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=args.enable_chunked_prefill,
        )
        self.kv = KVCacheManager(num_blocks, args.tokens_per_block, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.kv)
        draft = None
        if spec_config is not None and spec_config.method == "draft_model":
            from soarllm.spec.draft import build_draft_proposer

            text = getattr(self.executor.hf_config, "text_config", None) or self.executor.hf_config
            draft = build_draft_proposer(spec_config, args, text.num_hidden_layers, num_blocks,
                                         self.max_model_len, self.tokenizer)
        self.speculator = Speculator(spec_config, self.max_model_len, draft=draft,
                                     row_tile=self.executor.row_tile)
        self.structured = StructuredOutputManager(self.tokenizer, self.vocab_size,
                                                  self.eos_token_ids)
        self.groups: dict[str, _Group] = {}
        self._by_id: dict[str, tuple[_Group, int]] = {}
        self._failures: dict[str, RequestFailedError] = {}  # request id -> why it failed
        # steps in a row in which every scheduled request failed (a broken forward, not a request)
        self.num_consecutive_failed_steps = 0
        self._expert_load: tuple[float, list[list[int]] | None] | None = None  # (read at, counts)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    def shutdown(self) -> None:
        """Stop the executor's worker processes, if any (also done at interpreter exit)."""
        self.executor.shutdown()

    # -- requests ------------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty; send at least one character", param="prompt")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt has no tokens; send at least one", param="prompt")
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}", param="prompt"
            )
        return None, ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        params.validate()
        text, ids = self.tokenize_prompt(prompt)
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be token ids in [0, {self.vocab_size}); got "
                f"{[t for t in params.stop_token_ids if t >= self.vocab_size][:5]}",
                param="stop_token_ids",
            )
        room = self.max_model_len - len(ids)
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(ids)} tokens and max_tokens asks for {params.max_tokens}; shorten the prompt "
                f"or lower max_tokens to at most {max(room, 0)}",
                param="max_tokens",
            )
        arrival = arrival_time or time.time()
        children: list[Request] = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(
                Request(
                    child_id, ids, params, self.eos_token_ids, arrival,
                    fork_of=children[0] if i else None, parent_id=request_id, index=i,
                )
            )
        if params.prediction:
            pred = params.prediction
            pred_ids = (self.tokenizer.encode(pred, add_special_tokens=False)
                        if isinstance(pred, str) else list(pred))
            if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in pred_ids):
                raise InvalidRequestError(
                    f"prediction token ids must be integers in [0, {self.vocab_size})",
                    param="prediction",
                )
            for c in children:
                c.prediction_token_ids = pred_ids
        self.structured.add_requests([c.request_id for c in children], params)  # compiles
        detoks = [IncrementalDetokenizer(self.tokenizer, ids, params) for _ in children]
        group = _Group(request_id, text, children, detoks)
        self.groups[request_id] = group
        for i, c in enumerate(children):
            self._by_id[c.request_id] = (group, i)
            self.scheduler.add(c)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            for c in group.children:
                if not c.is_finished:
                    self.scheduler.finish(c, RequestStatus.FINISHED_ABORTED)
                self._by_id.pop(c.request_id, None)
                self.speculator.forget(c.request_id)
                self.structured.remove(c.request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.cache_config.num_blocks,
            kv_cache_usage=self.kv.usage(),
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            spec=self.speculator.stats,
            expert_load=self._latest_expert_load(),
        )

    def _latest_expert_load(self) -> list[list[int]] | None:
        now = time.monotonic()
        last = self._expert_load
        if last is not None and (last[1] is None or now - last[0] < EXPERT_LOAD_REFRESH_S):
            return last[1]  # a dense model, or read a moment ago
        read = getattr(self.executor, "expert_load", None)
        try:
            counts = read() if read is not None else None
        except Exception:  # a dead worker: the step that meets it reports it, not the stats
            return last[1] if last is not None else None
        self._expert_load = (now, counts)
        return counts

    def reset_prefix_cache(self) -> None:
        self.kv.reset_prefix_cache()

    # -- the step ------------------------------------------------------------------------------

    @property
    def phases(self) -> StepPhases | None:
        return self.executor.phases

    @phases.setter
    def phases(self, value: StepPhases | None) -> None:
        """Attach a StepPhases to time each step's phases (None detaches)."""
        self.executor.phases = value

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        if self.scheduler.running:
            self.speculator.propose(self.scheduler.running, self._num_base_tokens())
        so = self.scheduler.schedule()
        if so.is_empty:
            if so.finished_req_ids or so.preempted_req_ids:
                self.executor.update_states(so)  # let the runner drop them
            return []
        now = time.time()
        scheduled = [self.scheduler.scheduled_request(rid) for rid in so.num_scheduled_tokens]
        for req in scheduled:
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        self.structured.fill_bitmask(so, scheduled)
        t1 = time.perf_counter()
        result = self._execute_contained(so, scheduled)
        t2 = time.perf_counter()
        self.speculator.observe_step(so.total_num_scheduled_tokens, t2 - t1)
        accepted: dict[str, int] = {}
        for rid, spec in so.spec_token_ids.items():
            toks = result.sampled.get(rid)
            if toks:
                accepted[rid] = len(toks) - 1
                self.speculator.record(self.scheduler.scheduled_request(rid), len(spec), len(toks) - 1)
        self.speculator.end_step()
        for rid, window in result.lookahead.items():
            toks = result.sampled.get(rid)
            if toks:
                self.speculator.observe_lookahead(self.scheduler.scheduled_request(rid), len(toks),
                                                  window)
        self.scheduler.update_after_step(so, accepted)
        now = time.time()
        touched: dict[str, _Group] = {}
        for req in scheduled:
            entry = self._by_id.get(req.request_id)
            if entry is None:
                continue
            group, idx = entry
            try:
                if req.request_id in result.prompt_logprobs:
                    self._add_prompt_logprobs(req, *result.prompt_logprobs[req.request_id])
                if req.request_id not in result.sampled:
                    continue
                lps = result.logprobs.get(req.request_id)
                for j, tok in enumerate(result.sampled[req.request_id]):
                    if req.is_finished:
                        break
                    self._append(req, group.detoks[idx], tok, lps[j] if lps else None, now)
            except Exception as e:  # detokenizing or stop checks broke on this request only
                self._fail_group(group, e, "while processing its new token")
                touched.pop(group.request_id, None)
                continue
            touched[group.request_id] = group
        outputs = []
        for g in touched.values():
            if g.final_only and not g.finished:
                continue
            try:
                outputs.append(self._make_output(g))
            except Exception as e:
                self._fail_group(g, e, "while building its output")
                continue
            if g.finished:
                self.groups.pop(g.request_id, None)
                for c in g.children:
                    self._by_id.pop(c.request_id, None)
                    self.speculator.finished(c)
                    self.structured.remove(c.request_id)
        phases = self.executor.phases
        if phases is not None:
            phases.add("schedule", t1 - t0)
            phases.add("outputs", time.perf_counter() - t2)
            phases.steps += 1
        return outputs

    def _num_base_tokens(self) -> int:
        """Tokens the next step computes without speculation (running requests' remaining
        tokens, then waiting prompts), capped at the step's token budget."""
        budget = self.scheduler_config.max_num_batched_tokens
        n = sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.running)
        for w in self.scheduler.waiting:
            if n >= budget:
                break
            n += w.num_tokens - w.num_computed_tokens
        return min(n, budget)

    # -- failure containment -------------------------------------------------------------------

    def take_failures(self) -> dict[str, RequestFailedError]:
        """Requests that failed since the last call (request id -> error); they are aborted."""
        failures, self._failures = self._failures, {}
        return failures

    def _execute_contained(self, so: SchedulerOutput, scheduled: list[Request]) -> Any:
        try:
            result = self.executor.execute(so)
        except Exception as error:
            if getattr(error, "fatal", False):  # the executor is gone (a worker died): no retry
                raise
            return self._isolate_failure(so, scheduled, error)
        self.num_consecutive_failed_steps = 0
        return result

    def _isolate_failure(self, so: SchedulerOutput, scheduled: list[Request],
                         error: Exception) -> Any:
        """Re-run the step's requests one at a time: only those that fail alone are failed."""
        logger.error("step of %d request(s) failed (%s)%s", len(scheduled), describe(error),
                     "; re-running them one by one" if len(scheduled) > 1 else "",
                     exc_info=error)
        merged = SimpleNamespace(sampled={}, logprobs={}, prompt_logprobs={}, lookahead={})
        failed: dict[str, Exception] = {}
        if len(scheduled) == 1:
            failed[scheduled[0].request_id] = error
        else:
            for i, req in enumerate(scheduled):
                try:
                    out = self.executor.execute(self._sub_step(so, req, first=i == 0))
                except Exception as e:
                    failed[req.request_id] = e
                    continue
                for name, value in vars(out).items():
                    if not isinstance(value, dict):
                        continue
                    if hasattr(merged, name):
                        getattr(merged, name).update(value)
                    else:
                        setattr(merged, name, dict(value))
        whole = len(failed) == len(scheduled)
        # Only a step of several requests that all failed says the engine itself is broken: a lone
        # request failing may be that request's fault, and must not let a client take the server
        # down by sending three bad requests in a row.
        if len(scheduled) > 1:
            self.num_consecutive_failed_steps = self.num_consecutive_failed_steps + 1 if whole else 0
        self._preempt_readers_of(so, scheduled, failed, merged)
        # Blocks of a failed request were made findable before its KV was written: forget them.
        self.kv.reset_prefix_cache()
        for req in scheduled:
            rid = req.request_id
            entry = self._by_id.get(rid)
            if rid not in failed or entry is None:
                continue
            if whole and len(scheduled) > 1:
                where = (f"in the model's forward pass, which failed for all {len(scheduled)} "
                         "requests of the step")
            elif len(scheduled) > 1:
                where = "(it failed again when run alone; the other requests were not affected)"
            else:
                where = "in the model's forward pass"
            self._fail_group(entry[0], failed[rid], where)
        return merged

    def _sub_step(self, so: SchedulerOutput, req: Request, first: bool) -> SchedulerOutput:
        """The step ``so`` reduced to one request, sent whole (the failed attempt may have left
        the runner's copy half-updated); the first one also carries the step's finished and
        preempted ids."""
        rid = req.request_id
        grammar_req_ids, grammar_bitmask = so.grammar_of(rid)
        return SchedulerOutput(
            new_reqs=[new_request_data(req, self.kv.block_ids(rid))],
            num_scheduled_tokens={rid: so.num_scheduled_tokens[rid]},
            spec_token_ids={rid: so.spec_token_ids[rid]} if rid in so.spec_token_ids else {},
            spec_layouts={rid: so.spec_layouts[rid]} if rid in so.spec_layouts else {},
            finished_req_ids=so.finished_req_ids if first else [],
            preempted_req_ids=so.preempted_req_ids if first else [],
            grammar_req_ids=grammar_req_ids,
            grammar_bitmask=grammar_bitmask,
        )

    def _preempt_readers_of(self, so: SchedulerOutput, scheduled: list[Request],
                            failed: dict[str, Exception], merged: Any) -> None:
        """A request that found a failed request's new blocks in the prefix cache this step may
        have read KV that was never written: drop its result and recompute it later."""
        bs = self.cache_config.block_size
        fresh: set[int] = set()
        for req in scheduled:
            n = so.num_scheduled_tokens[req.request_id]
            if req.request_id in failed and n > 0:
                start = req.num_computed_tokens
                first, last = start // bs, (start + n - 1) // bs
                fresh.update(self.kv.block_ids(req.request_id)[first : last + 1])
        if not fresh:
            return
        for req in scheduled:
            if req.request_id in failed or not fresh.intersection(self.kv.block_ids(req.request_id)):
                continue
            for table in vars(merged).values():
                if isinstance(table, dict):
                    table.pop(req.request_id, None)
            if req in self.scheduler.running:
                self.scheduler.running.remove(req)
                self.scheduler._preempt(req)

    def _fail_group(self, group: _Group, error: BaseException, where: str) -> None:
        """Abort every sequence of ``group`` and keep the error for the caller."""
        message = f"the engine failed on this request {where}: {describe(error)}"
        if not isinstance(error, RequestFailedError):
            logger.error("request %s failed %s", group.request_id, where, exc_info=error)
        self._failures[group.request_id] = RequestFailedError(message)
        self.abort_request(group.request_id)

    @staticmethod
    def _add_prompt_logprobs(req: Request, start: int, plp: list[TokenLogprobs]) -> None:
        if not req.prompt_logprobs:
            req.prompt_logprobs.append(None)  # the first prompt token has no logprob
        # A preempted request recomputes its prompt: keep only positions not recorded yet.
        have = len(req.prompt_logprobs) - 1
        req.prompt_logprobs.extend(plp[max(0, have - start) :])

    def _append(self, req: Request, detok: IncrementalDetokenizer, tok: int,
                lp: TokenLogprobs | None, now: float) -> None:
        req.append_token(tok)
        grammar_done = self.structured.accept_token(req.request_id, tok)
        if lp is not None:
            for tid, entry in lp.items():
                entry.decoded_token = self.tokenizer.decode([tid])
            req.output_logprobs.append(lp)
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        p = req.params
        past_min = req.num_output_tokens >= p.min_tokens
        stop_str = detok.add_token(tok, check_stop=past_min)
        status = None
        if stop_str is not None:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        elif past_min and tok in p.stop_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, tok
        elif past_min and not p.ignore_eos and tok in req.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif grammar_done:  # structured output: the grammar allows nothing more
            status = RequestStatus.FINISHED_STOPPED
        elif (p.max_tokens is not None and req.num_output_tokens >= p.max_tokens) or (
            req.num_tokens >= self.max_model_len
        ):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if stop_str is None:
                detok.flush_pending()
            m.finished_time = now
            self.scheduler.finish(req, status)

    def _make_output(self, g: _Group) -> RequestOutput:
        completions = []
        for i, (c, d) in enumerate(zip(g.children, g.detoks)):
            sent = g.sent_tokens[i]
            new_ids = c.output_token_ids[sent:]
            g.sent_tokens[i] = c.num_output_tokens
            want_lp = c.params.logprobs is not None
            delta = d.take_delta(c.is_finished)
            completions.append(
                CompletionOutput(
                    index=i,
                    text=d.text[: d.emitted],
                    token_ids=list(c.output_token_ids),
                    logprobs=list(c.output_logprobs) if want_lp else None,
                    finish_reason=c.status.value if c.is_finished else None,
                    stop_reason=c.stop_reason,
                    delta_text=delta,
                    delta_token_ids=new_ids,
                    delta_logprobs=c.output_logprobs[sent:] if want_lp else None,
                    accepted_prediction_tokens=(c.num_prediction_accepted
                                                if c.prediction_token_ids is not None else None),
                    rejected_prediction_tokens=(c.num_prediction_rejected
                                                if c.prediction_token_ids is not None else None),
                )
            )
        leader = g.children[0]
        plp = None
        if leader.wants_prompt_logprobs and leader.num_computed_tokens >= leader.num_prompt_tokens:
            plp = leader.prompt_logprobs
        return RequestOutput(
            request_id=g.request_id,
            prompt=g.prompt,
            prompt_token_ids=leader.prompt_token_ids,
            outputs=completions,
            finished=g.finished,
            prompt_logprobs=plp,
            metrics=leader.metrics,
        )


def _eos_ids(config, tokenizer) -> set[int]:
    ids: set[int] = set()
    cfg = getattr(config, "eos_token_id", None)
    if isinstance(cfg, int):
        ids.add(cfg)
    elif cfg:
        ids.update(cfg)
    gen = getattr(tokenizer, "eos_token_id", None)
    if gen is not None:
        ids.add(gen)
    return ids
