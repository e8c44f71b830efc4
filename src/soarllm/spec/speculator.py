"""Speculator: before each step, decide which running decodes speculate and with how many tokens.

Each candidate request (decoding, not mid-prefill, with a proposer: its own ``prediction`` or the
configured method) gets proposals from its proposer. Whether to verify them is a throughput
question answered with two estimates:

- how many draft tokens would be accepted: the j-th draft of a request is accepted with probability
  a**j, where a is the request's smoothed acceptance rate (its own counts, with the method's running
  average as the prior);
- what the step would cost: ``StepCostModel`` gives the measured step time for a token count.

Draft tokens are taken best expected gain first while they raise the step's expected tokens per
second: (tokens emitted) / time(tokens computed). On a small batch a step costs about the same for
a few more tokens, so drafts are nearly free; on a large batch every token costs its share of the
step and speculation turns itself off. Step sizes that get chosen get measured, so an optimistic
estimate corrects itself; and every ``explore_every`` steps the
choice not taken is re-measured (a few drafts at most) so that the comparison follows the machine.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from soarllm.engine.request import Request, RequestStatus
from soarllm.spec.config import SpeculativeConfig
from soarllm.spec.cost_model import StepCostModel
from soarllm.spec.lookahead import LookaheadProposer
from soarllm.spec.ngram import NgramProposer
from soarllm.spec.proposer import Proposer
from soarllm.spec.reference import ReferenceProposer
from soarllm.spec.suffix import SuffixProposer

# most draft tokens per step from a prediction, unless the request says otherwise (the planner
# takes fewer where the step-time model says they do not pay)
REFERENCE_K = 15
_PRIOR_TOKENS = 4.0  # weight of the method's average in a request's acceptance estimate
_MAX_EXPLORE_TOKENS = 8
# a costly method drafts until it has had this many draft tokens verified: its acceptance is
# measured before the step-time comparison may rest it (the prior alone would rest a good draft)
_LEARN_TOKENS = 64
_MAX_EXPLORE_GAPS = 64  # a resting draft explores at least every 64 * explore_every calls
_MARGIN = 0.03  # expected gain in tokens/s that speculation must promise over the plain step
_INITIAL_ACCEPTANCE = {"reference": 0.7, "ngram": 0.4, "suffix": 0.4, "draft_model": 0.6,
                       "lookahead": 0.3}


@dataclass
class SpecStats:
    """Counters since start (Prometheus counters and bench reports read these)."""

    num_drafts: int = 0  # verification steps of one request
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    by_method: dict[str, list[int]] = field(default_factory=dict)  # method -> [drafts, tokens, accepted]

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification step (accepted drafts + the bonus token)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class Speculator:
    def __init__(self, config: SpeculativeConfig | None, max_model_len: int,
                 explore_every: int = 64, draft: Proposer | None = None,
                 row_tile: tuple[int, int] = (1, 0)):
        self.config = config
        self.max_model_len = max_model_len
        self.explore_every = explore_every
        self.proposers: dict[str, Proposer] = {"reference": ReferenceProposer()}
        if config is not None and config.method == "ngram":
            self.proposers["ngram"] = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        if config is not None and config.method == "suffix":
            self.proposers["suffix"] = SuffixProposer(config.prompt_lookup_min,
                                                      config.prompt_lookup_max,
                                                      config.suffix_decoding_min_token_prob)
        if config is not None and config.method == "lookahead":
            self.proposers["lookahead"] = LookaheadProposer(
                config.lookahead_window_size, config.lookahead_ngram_size,
                config.lookahead_guess_set_size, config.lookahead_pool_from_prompt)
        if draft is not None:
            self.proposers[draft.name] = draft
        # A request with a prediction falls back to prompt lookup where the prediction has nothing
        # to offer (before re-synchronising after an edit): the prompt usually holds the same text.
        self._fallback = self.proposers.get("ngram") or NgramProposer(1, 4)
        self.cost = StepCostModel(row_tile=row_tile)
        self.stats = SpecStats()
        self._acceptance = dict(_INITIAL_ACCEPTANCE)  # method -> running average
        self._req: dict[str, list[float]] = {}  # request id -> [drafted, accepted]
        self._method: dict[str, str] = {}  # request id -> method of its pending drafts
        self._steps = 0
        # (method, batch bucket) -> running mean seconds of a draft run for that many requests
        self._draft_seconds: dict[tuple[str, int], float] = {}
        self._draft_calls = 0
        # (method, batch bucket) -> (draft call at which a resting draft explores next, the gap)
        self._explore: dict[tuple[str, int], tuple[int, int]] = {}
        self._layouts: dict[str, object] = {}  # request id -> SpecLayout of this step's lookahead
        self._lookahead_gain = 0.5  # running mean of tokens a lookahead step adds
        # The realized check for costly methods (a draft model's run, a lookahead row): emitted
        # tokens per second of whole engine steps (from one propose() to the next: drafting,
        # scheduling, the forward, outputs), running means per (kind, batch bucket), kind "plain"
        # or the costly method used. Where a method's rate is below the plain one it rests.
        self._rates: dict[tuple[str, int], float] = {}
        self._step: dict = {}  # this step: base tokens, methods, accepted tokens, start time

    # -- before a step ------------------------------------------------------------------------

    def _method_of(self, req: Request) -> str | None:
        if req.params.num_speculative_tokens == 0 or req.params.structured_outputs is not None:
            return None
        if req.prediction_token_ids:
            return "reference"
        return self.config.method if self.config is not None else None

    def _max_k(self, req: Request, method: str) -> int:
        k = req.params.num_speculative_tokens
        if k is None:
            k = REFERENCE_K if method == "reference" else self.config.num_speculative_tokens
        room = self.max_model_len - req.num_tokens - 1
        if req.params.max_tokens is not None:
            room = min(room, req.params.max_tokens - req.num_output_tokens - 1)
        return max(0, min(k, room))

    def acceptance(self, request_id: str, method: str) -> float:
        prior = self._acceptance[method]
        drafted, accepted = self._req.get(request_id, (0.0, 0.0))
        return (accepted + _PRIOR_TOKENS * prior) / (drafted + _PRIOR_TOKENS)

    def propose(self, running: list[Request], num_base_tokens: int) -> None:
        """Set ``spec_token_ids`` on the running requests that should verify drafts this step;
        ``num_base_tokens`` is what the step computes without speculation."""
        wanted: dict[str, list[tuple[Request, int]]] = {}  # method -> (request, k)
        for req in running:
            req.spec_token_ids = []
            if req.status != RequestStatus.RUNNING or req.num_computed_tokens != req.num_tokens - 1:
                continue
            method = self._method_of(req)
            if method is None:
                continue
            k = self._max_k(req, method)
            if k > 0 and self._catch_up_pays(req, method):
                wanted.setdefault(method, []).append((req, k))
        base = max(num_base_tokens, 1)
        self._close_step()
        self._step = {"base": base, "methods": set(), "accepted": 0, "t0": time.perf_counter()}
        candidates: list[tuple[Request, str, list[int]]] = []
        for method, items in wanted.items():
            proposer = self.proposers[method]
            if method == "lookahead":
                for req, _ in items:
                    tokens, layout = proposer.plan(req)
                    if req.num_tokens + len(tokens) <= self.max_model_len:
                        self._layouts[req.request_id] = layout
                        candidates.append((req, method, tokens))
                continue
            if proposer.expensive and not self._worth_drafting(method, items, base):
                continue
            t0 = time.perf_counter()
            proposals = proposer.propose_batch([r for r, _ in items], [k for _, k in items])
            if proposer.expensive:
                elapsed = time.perf_counter() - t0
                recurring = proposer.recurring_seconds(elapsed)
                if recurring is not None:
                    self._observe_draft_time((method, self._bucket(len(items))), recurring)
                # a one-off catch-up is left out of the step's realized rate too: resting
                # causes it, so counting it would keep a good draft resting
                self._step["catch_up"] = elapsed - (recurring if recurring is not None else 0.0)
                self._step["drafted"] = True
            for (req, k), drafts in zip(items, proposals):
                m = method
                if not drafts and method == "reference":
                    m, drafts = "ngram", self._fallback.propose(req, k)
                if drafts:
                    candidates.append((req, m, drafts))
        if not candidates:
            return
        self._steps += 1
        chosen = self._plan(candidates, base)
        for (req, method, drafts), k in zip(candidates, chosen):
            if k:
                req.spec_token_ids = drafts[:k]
                self._method[req.request_id] = method
                if method == "lookahead":
                    req.spec_layout = self._layouts[req.request_id]
                self._step["methods"].add(method)

    # -- proposers that cost a model run (draft models) -----------------------------------------

    def _catch_up_pays(self, req: Request, method: str) -> bool:
        """A draft that fell behind a request (its prompt, or the tokens made while it rested)
        computes those tokens before it guesses again, about what a prefill of them costs: not
        worth it for a request with fewer tokens left to make than that (the tail of a batch
        whose drafting rested, say)."""
        behind = self.proposers[method].tokens_behind(req)
        if behind <= 2:
            return True
        left = self.max_model_len - req.num_tokens
        if req.params.max_tokens is not None:
            left = min(left, req.params.max_tokens - req.num_output_tokens)
        return behind <= left

    def _observe_draft_time(self, key: tuple[str, int], seconds: float) -> None:
        old = self._draft_seconds.get(key)
        self._draft_seconds[key] = seconds if old is None else old + 0.2 * (seconds - old)

    def _worth_drafting(self, method: str, items: list[tuple[Request, int]], base: int) -> bool:
        """Whether running the draft model can pay: the best expected tokens/s with its drafts
        (their expected acceptance, the target's step-time model, plus the draft's own measured
        time for this many requests) beats the plain step, and the steps that drafted delivered
        (``_delivers``). Unmeasured, it drafts anyway; before the method's acceptance is measured
        (``_LEARN_TOKENS``), only where drafts accepted whole would pay; resting, it explores
        after ``explore_every`` calls, then at doubling gaps while it keeps losing."""
        cfg = self.config
        if cfg is not None and not cfg.adaptive:
            return True
        draft_s = self._draft_seconds.get((method, self._bucket(len(items))))
        t0 = self.cost.time(base)
        if draft_s is None or t0 is None:
            return True
        if self.stats.by_method.get(method, (0, 0))[1] < _LEARN_TOKENS:
            # acceptance not measured yet: draft where drafts accepted whole would pay
            return self._pays(method, items, base, draft_s, t0, learning=True)
        self._draft_calls += 1
        key = (method, self._bucket(base))
        if self._delivers(method, base) and self._pays(method, items, base, draft_s, t0):
            if key in self._explore:  # it pays here: a later rest explores at the base gap
                self._explore[key] = (self._explore[key][0], self.explore_every)
            return True
        # Resting. Now and then it drafts anyway, so that the estimates follow the machine; an
        # exploration makes the draft catch up on every token made meanwhile (as costly as a
        # prefill of them), so while explorations keep confirming the loss they grow rarer.
        due, gap = self._explore.setdefault(key, (self._draft_calls + self.explore_every,
                                                  self.explore_every))
        if self._draft_calls < due:
            return False
        gap = min(2 * gap, _MAX_EXPLORE_GAPS * self.explore_every)
        self._explore[key] = (self._draft_calls + gap, gap)
        return True

    def _pays(self, method: str, items: list[tuple[Request, int]], base: int, draft_s: float,
              t0: float, learning: bool = False) -> bool:
        """Whether some number of draft tokens, best expected gain first, beats the plain step's
        tokens/s by the margin, the draft's time included (``learning``: every draft accepted)."""
        gains = sorted((1.0 if learning else self.acceptance(r.request_id, method) ** j
                        for r, k in items for j in range(1, k + 1)), reverse=True)
        plain = base / t0 * (1 + _MARGIN)
        gain = 0.0
        for n, g in enumerate(gains, start=1):
            gain += g
            if (base + gain) / (self.cost.time(base + n) + draft_s) > plain:
                return True
        return False

    def _plan(self, candidates: list[tuple[Request, str, list[int]]], base: int) -> list[int]:
        """Tokens to verify per candidate. A lookahead row is all or nothing: taken when its
        expected tokens (the running mean per lookahead step) raise tokens/s; chains of drafts
        then as below."""
        atomic = [i for i, c in enumerate(candidates) if c[1] == "lookahead"]
        if not atomic:
            return self._plan_chains(candidates, base)
        counts = [0] * len(candidates)
        verdict = self._lookahead_pays(sum(len(candidates[i][2]) for i in atomic), len(atomic),
                                       base)
        if verdict == "explore":  # one row re-measures the method: a whole batch's rows would
            atomic = atomic[:1]  # make the step many times a plain one where it does not pay
        if verdict:
            for i in atomic:
                counts[i] = len(candidates[i][2])
        rest = [i for i in range(len(candidates)) if candidates[i][1] != "lookahead"]
        if rest:
            for i, k in zip(rest, self._plan_chains([candidates[i] for i in rest], base)):
                counts[i] = k
        return counts

    def _lookahead_pays(self, tokens: int, rows: int, base: int) -> str:
        """"all" (every lookahead row this step), "explore" (one row, to re-measure a resting
        method) or "" (none)."""
        cfg = self.config
        if cfg is not None and not cfg.adaptive:
            return "all"
        t0 = self.cost.time(base)
        if t0 is None or not self.cost.measured(base) and self.cost.num_points < 2:
            return ""  # measure plain steps first
        if self._delivers("lookahead", base):
            rate = (base + rows * self._lookahead_gain) / self.cost.time(base + tokens)
            if rate > base / t0 * (1 + _MARGIN):
                return "all"
        return "explore" if self._steps % self.explore_every == 0 else ""

    def _plan_chains(self, candidates: list[tuple[Request, str, list[int]]], base: int) -> list[int]:
        """Draft tokens per candidate: best expected gain first, while tokens/s rises."""
        cfg = self.config
        if cfg is not None and not cfg.adaptive:
            return [len(d) for _, _, d in candidates]
        # every draft token with its expected gain, as a max-heap
        heap: list[tuple[float, int, int]] = []
        for i, (req, method, _) in enumerate(candidates):
            a = self.acceptance(req.request_id, method)
            heap.append((-a, i, 1))
        heapq.heapify(heap)
        order: list[tuple[float, int]] = []
        while heap:
            neg, i, j = heapq.heappop(heap)
            order.append((-neg, i))
            req, method, drafts = candidates[i]
            if j < len(drafts):
                a = self.acceptance(req.request_id, method)
                heapq.heappush(heap, (-(a ** (j + 1)), i, j + 1))
        t0 = self.cost.time(base)
        counts = [0] * len(candidates)
        if t0 is None or not self.cost.measured(base) and self.cost.num_points < 2:
            return counts  # measure plain steps first
        # expected emitted tokens per second with the first K draft tokens in `order`
        # drafts must beat the plain step by a margin: the estimates are noisy, a loss is not
        best_k, best_rate, gain = 0, base / t0 * (1 + _MARGIN), 0.0
        alt_k, alt_rate = 1, 0.0  # the best choice with some speculation
        for k, (g, _) in enumerate(order, start=1):
            gain += g
            rate = (base + gain) / self.cost.time(base + k)
            if rate > best_rate:
                best_k, best_rate = k, rate
            if rate > alt_rate:
                alt_k, alt_rate = k, rate
        if best_k == 0 and base + 1 > self.cost.max_tokens:
            best_k = 1  # beyond every measurement: measure one token's cost to extrapolate from
        elif self._steps % self.explore_every == 0:
            # now and then, re-measure the road not taken (cheaply: a bounded number of drafts)
            best_k = min(alt_k, _MAX_EXPLORE_TOKENS) if best_k == 0 else 0
        for _, i in order[:best_k]:
            counts[i] += 1
        return counts

    # -- after a step ---------------------------------------------------------------------------

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.cost.observe(num_tokens, seconds)

    @staticmethod
    def _bucket(base: int) -> int:
        return 1 << max(0, int(base) - 1).bit_length()

    def _close_step(self, now: float | None = None) -> None:
        """Fold the step that ended (now) into the realized rates: emitted tokens (base +
        accepted drafts) per second of the whole step, as "plain" or as its costly method."""
        st, self._step = self._step, {}
        if not st or not st.get("ran"):
            return
        seconds = (time.perf_counter() if now is None else now) - st["t0"]
        costly = [m for m in st["methods"] if m in ("lookahead", "draft_model")
                  or getattr(self.proposers.get(m), "expensive", False)]
        if st["methods"] and not costly or not st["methods"] and st.get("drafted"):
            return  # cheap methods only (the cost model covers them), or a draft run not used
        seconds -= st.get("catch_up", 0.0)
        if not seconds > 0:
            return
        rate = (st["base"] + st["accepted"]) / seconds
        for kind in costly or ["plain"]:
            key = (kind, self._bucket(st["base"]))
            old = self._rates.get(key)
            self._rates[key] = rate if old is None else old + 0.3 * (rate - old)

    def end_step(self) -> None:
        """The step's results are recorded (its rate is taken at the next propose)."""
        if self._step:
            self._step["ran"] = True

    def _delivers(self, method: str, base: int) -> bool:
        """Whether the method's steps delivered at least the plain rate for this batch size; a
        plain step is taken first when none was measured for it (a costly method must show it
        pays against a measured alternative)."""
        b = self._bucket(base)
        plain = self._rates.get(("plain", b))
        if plain is None:
            return False
        mine = self._rates.get((method, b))
        return mine is None or mine >= plain

    def record(self, req: Request, num_drafted: int, num_accepted: int) -> None:
        """Count one verification of ``num_drafted`` drafts, ``num_accepted`` of them accepted."""
        method = self._method.pop(req.request_id, None) or "ngram"
        if method == "lookahead":
            layout = self._layouts.pop(req.request_id, None)
            self._lookahead_gain += 0.1 * (num_accepted - self._lookahead_gain)
            num_drafted = max((len(c) for c in layout.candidates), default=0) if layout else 0
        if self._step:
            self._step["accepted"] += num_accepted
        st = self.stats
        st.num_drafts += 1
        st.num_draft_tokens += num_drafted
        st.num_accepted_tokens += num_accepted
        while len(st.drafted_per_position) < num_drafted:
            st.drafted_per_position.append(0)
            st.accepted_per_position.append(0)
        for j in range(num_drafted):
            st.drafted_per_position[j] += 1
            if j < num_accepted:
                st.accepted_per_position[j] += 1
        m = st.by_method.setdefault(method, [0, 0, 0])
        m[0] += 1
        m[1] += num_drafted
        m[2] += num_accepted
        counts = self._req.setdefault(req.request_id, [0.0, 0.0])
        counts[0] += num_drafted
        counts[1] += num_accepted
        if num_drafted:
            rate = num_accepted / num_drafted
            self._acceptance[method] += 0.05 * (rate - self._acceptance[method])
        if method == "reference":
            req.num_prediction_accepted += num_accepted
            req.num_prediction_rejected += num_drafted - num_accepted

    def observe_lookahead(self, req: Request, num_emitted: int, window_next: list[int]) -> None:
        """A lookahead step of ``req`` emitted ``num_emitted`` tokens (not yet appended) and
        returned its window's next tokens."""
        proposer = self.proposers.get("lookahead")
        if proposer is not None:
            proposer.update(req, num_emitted, window_next, req.all_token_ids[-1])

    def finished(self, req: Request) -> None:
        """A request ended: proposers with a memory learn its text, then its state goes."""
        for p in self.proposers.values():
            p.learn(req)
        self.forget(req.request_id)

    def forget(self, request_id: str) -> None:
        self._req.pop(request_id, None)
        self._method.pop(request_id, None)
        self._layouts.pop(request_id, None)
        for p in self.proposers.values():
            p.forget(request_id)
