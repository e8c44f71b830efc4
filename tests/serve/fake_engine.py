"""A small, fast stand-in for LLMEngine with the same interface, for serving-layer tests.

The "model" is a byte-level tokenizer (every byte is a token, plus chat and FIM special tokens)
and a deterministic generator: greedy requests produce " w0 w1 w2 ..." one byte per step (so stop
strings and lengths are predictable), sampled requests produce random lowercase letters drawn from
a generator seeded by the request's seed. A pool of KV blocks is held per request and released on
finish or abort, so tests can check that nothing leaks. A prompt containing ``FAIL_STEP`` makes the
next step raise, to test how the server survives an engine failure.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from soarllm.errors import ContextLengthError, InvalidRequestError
from soarllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from soarllm.sampling_params import SamplingParams

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
]
EOS_ID = 0
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_test_tokenizer(fim: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0..6 are special tokens, then one token per byte."""
    specials = SPECIAL_TOKENS if fim else SPECIAL_TOKENS[:3]
    b2u = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=specials[3:],
    )


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


@dataclass
class _Seq:
    index: int
    rng: random.Random
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    text: str = ""
    sent_tokens: int = 0
    sent_text: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Req:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[_Seq]
    metrics: RequestMetrics
    blocks: int = 0
    started: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class FakeEngine:
    """Implements the LLMEngine methods AsyncLLMEngine uses. Not thread-safe, like the real one."""

    def __init__(
        self,
        max_model_len: int = 512,
        num_blocks: int = 4096,
        block_size: int = 16,
        max_num_seqs: int = 64,
        step_time: float = 0.002,
        fim: bool = True,
        model_name: str = "fake-model",
    ):
        self.tokenizer = make_test_tokenizer(fim=fim)
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.vocab_size = len(self.tokenizer)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.step_time = step_time
        self.requests: dict[str, _Req] = {}
        self.num_steps = 0
        self.last_prompt_ids: list[int] = []
        self.thread_ids: set[int] = set()  # threads that called into the engine
        self._fail_next_step = False
        # Steps wait for this event: a test clears it to hold the engine mid-step, then sets it.
        self.gate = threading.Event()
        self.gate.set()

    # -- interface ----------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        self.thread_ids.add(threading.get_ident())
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params.validate()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            if not ids:
                raise InvalidRequestError("the prompt has no tokens", param="prompt")
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token ids must be in [0, {self.vocab_size}); got {bad[:5]}", param="prompt"
                )
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError("stop_token_ids out of the vocabulary",
                                      param="stop_token_ids")
        room = self.max_model_len - len(ids)
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            raise ContextLengthError(
                f"maximum context length is {self.max_model_len} tokens; prompt has {len(ids)}",
                param="max_tokens",
            )
        self.last_prompt_ids = ids
        if "FAIL_STEP" in self.tokenizer.decode(ids):
            self._fail_next_step = True
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        seqs = [_Seq(i, random.Random(seed * 1000 + i)) for i in range(params.n)]
        self.requests[request_id] = _Req(
            request_id, text, ids, params, seqs, RequestMetrics(arrival_time or time.time())
        )

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        self.thread_ids.add(threading.get_ident())
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is not None:
                self.free_blocks += req.blocks

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> FakeStats:
        running = sum(1 for r in self.requests.values() if r.started)
        used = self.num_blocks - self.free_blocks
        return FakeStats(
            num_running=running,
            num_waiting=len(self.requests) - running,
            num_free_blocks=self.free_blocks,
            num_total_blocks=self.num_blocks,
            kv_cache_usage=used / self.num_blocks,
            prefix_cache_queries=10 * self.num_steps,
            prefix_cache_hits=3 * self.num_steps,
            num_preemptions=0,
        )

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.num_steps += 1
        if self._fail_next_step:
            self._fail_next_step = False
            raise RuntimeError("injected step failure")
        self.gate.wait()
        if self.step_time:
            time.sleep(self.step_time)
        now = time.time()
        outputs = []
        for req in list(self.requests.values())[: self.max_num_seqs]:
            if not req.started:
                req.started = True
                req.metrics.first_scheduled_time = now
            for seq in req.seqs:
                if seq.finish_reason is None:
                    self._generate_one(req, seq)
            self._hold_blocks(req)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            outputs.append(self._output(req))
            if req.finished:
                req.metrics.finished_time = now
                self.free_blocks += req.blocks
                del self.requests[req.request_id]
        return outputs

    # -- the fake model -----------------------------------------------------------------------

    def next_token(self, req: _Req, seq: _Seq) -> int:
        if req.params.greedy:
            k = len(seq.token_ids)
            pattern = "".join(f" w{i}" for i in range(k // 2 + 2))
            return self.tokenizer.convert_tokens_to_ids(
                bytes_to_unicode()[pattern.encode()[k]]
            )
        letter = seq.rng.choice("abcdefghijklmnopqrstuvwxyz ")
        return self.tokenizer.convert_tokens_to_ids(bytes_to_unicode()[ord(letter)])

    def _fake_logprobs(self, token: int, k: int) -> dict[int, Logprob]:
        lps = {token: Logprob(math.log(0.5), 1, self.tokenizer.decode([token]))}
        alt = 7 + ord("z")
        for r in range(k):
            tid = alt - r
            if tid not in lps:
                lps[tid] = Logprob(math.log(0.4 / (r + 1)), r + 2, self.tokenizer.decode([tid]))
        return lps

    def _generate_one(self, req: _Req, seq: _Seq) -> None:
        p = req.params
        token = self.next_token(req, seq)
        seq.token_ids.append(token)
        if p.logprobs is not None:
            seq.logprobs.append(self._fake_logprobs(token, p.logprobs))
        seq.text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=p.skip_special_tokens)
        past_min = len(seq.token_ids) >= p.min_tokens
        for stop in p.stop if past_min else []:
            at = seq.text.find(stop, max(0, seq.sent_text - len(stop)))
            if at >= 0:
                seq.text = seq.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return
        if past_min and token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif past_min and token == EOS_ID and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif (p.max_tokens is not None and len(seq.token_ids) >= p.max_tokens) or (
            len(req.prompt_ids) + len(seq.token_ids) >= self.max_model_len
        ):
            seq.finish_reason = "length"

    def _hold_blocks(self, req: _Req) -> None:
        tokens = len(req.prompt_ids) + max(len(s.token_ids) for s in req.seqs)
        need = -(-tokens // self.block_size) * len(req.seqs)
        extra = need - req.blocks
        if extra > 0:
            self.free_blocks -= extra
            req.blocks = need

    def _output(self, req: _Req) -> RequestOutput:
        completions = []
        want_lp = req.params.logprobs is not None
        hold = max((len(s) for s in req.params.stop), default=1) - 1
        for seq in req.seqs:
            # like a real detokenizer, hold back text that may be the start of a stop string
            visible = len(seq.text) if seq.finish_reason else max(seq.sent_text, len(seq.text) - hold)
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.text[:visible],
                    token_ids=list(seq.token_ids),
                    logprobs=list(seq.logprobs) if want_lp else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    delta_text=seq.text[seq.sent_text:visible],
                    delta_token_ids=seq.token_ids[seq.sent_tokens:],
                    delta_logprobs=seq.logprobs[seq.sent_tokens:] if want_lp else None,
                )
            )
            seq.sent_tokens, seq.sent_text = len(seq.token_ids), visible
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [
                self._fake_logprobs(t, req.params.prompt_logprobs) for t in req.prompt_ids[1:]
            ]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_ids,
            outputs=completions,
            finished=req.finished,
            prompt_logprobs=prompt_logprobs,
            metrics=req.metrics,
        )
