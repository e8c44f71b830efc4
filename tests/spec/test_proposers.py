"""Proposers and the speculation planner, against hand-worked examples."""

from __future__ import annotations

import numpy as np

from soarllm.engine.request import Request, RequestStatus
from soarllm.sampling_params import SamplingParams
from soarllm.spec.config import SpeculativeConfig
from soarllm.spec.cost_model import StepCostModel
from soarllm.spec.ngram import lookup
from soarllm.spec.reference import ReferenceProposer
from soarllm.spec.speculator import Speculator


def _req(prompt, output=(), prediction=None, rid="r", **params):
    r = Request(rid, list(prompt), SamplingParams(max_tokens=100, **params), set())
    for t in output:
        r.append_token(t)
    r.prediction_token_ids = prediction
    r.status = RequestStatus.RUNNING
    r.num_computed_tokens = r.num_tokens - 1
    return r


def test_ngram_lookup_prefers_the_longest_then_the_latest_match():
    #            0  1  2  3  4  5  6  7  8  9 10 11
    toks = np.array([1, 2, 3, 9, 8, 2, 3, 7, 5, 1, 2, 3])
    # suffix [1, 2, 3] (n=3) occurs at 0 -> continues 9, 8, 2
    assert lookup(toks, 3, 1, 3) == [9, 8, 2]
    # with n at most 2: suffix [2, 3] occurs at 1 and 5; the latest (5) continues 7, 5
    assert lookup(toks, 2, 1, 2) == [7, 5]
    # n_min above any match length: nothing
    assert lookup(np.array([4, 5, 6, 7]), 3, 1, 3) == []
    # a match at the very end has no continuation of its own; an earlier one is used
    assert lookup(np.array([5, 6, 5, 6]), 2, 1, 1) == [5, 6]


def test_reference_follows_resyncs_after_an_edit_and_stops_when_lost():
    ref = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    p = ReferenceProposer()
    r = _req([1, 2], prediction=ref)
    assert p.propose(r, 4) == [10, 11, 12, 13]
    for t in (10, 11, 12):  # the output follows the prediction
        r.append_token(t)
    assert p.propose(r, 3) == [13, 14, 15]
    r.append_token(99)  # the edit: one token differs
    assert p.propose(r, 3) == []  # lost: the last two output tokens (12, 99) are not in ref
    for t in (14, 15):  # back on the prediction after the edit
        r.append_token(t)
    assert p.propose(r, 3) == [16, 17, 18]
    for t in (16, 17, 18, 19):
        r.append_token(t)
    assert p.propose(r, 3) == []  # the prediction is used up


def test_reference_resync_prefers_the_place_after_the_old_pointer():
    ref = [5, 6, 1, 2, 3, 5, 6, 7, 8]
    p = ReferenceProposer()
    r = _req([0], prediction=ref)
    for t in (5, 6, 1, 2, 3):
        r.append_token(t)
    assert p.propose(r, 2) == [5, 6]
    r.append_token(4)  # mismatch at ref[5]
    r.append_token(5)
    r.append_token(6)
    # (5, 6) occurs at 0 and 5: after the old pointer (5) it continues 7, 8
    assert p.propose(r, 2) == [7, 8]


def test_cost_model_interpolates_and_extrapolates():
    m = StepCostModel()
    assert m.time(4) is None
    m.observe(1, 0.010)
    assert m.time(1) == 0.010 and m.time(4) == 0.040  # one point: proportional
    m.observe(9, 0.018)
    assert abs(m.time(5) - 0.014) < 1e-12
    assert abs(m.time(13) - 0.022) < 1e-12  # the last slope, 1 ms per token


def test_cost_model_prices_a_count_as_its_row_block():
    # rows computed in blocks of 4 below 80 rows: 5 tokens cost what 8 do; 1 token its own
    m = StepCostModel(row_tile=(4, 80))
    m.observe(1, 0.009)
    m.observe(5, 0.022)
    assert m.time(1) == 0.009
    assert m.time(8) == m.time(6) == 0.022 and m.measured(7) and not m.measured(9)
    m.observe(12, 0.028)
    assert m.time(9) == 0.028
    assert m.padded(79) == 80 and m.padded(80) == 80 and m.padded(81) == 81
    assert StepCostModel().padded(5) == 5


def test_planner_fills_the_row_block_it_pays_for():
    # a staircase (each block of 4 rows costs 6 ms more; 1 row 9 ms), measured where a verifier
    # of 8 drafts that all match measures it: 1 and 9 tokens (and 17)
    def stairs(t):
        return 0.009 + 0.006 * (-(-t // 4)) if t > 1 else 0.009

    seen = [(t, stairs(t)) for t in (1, 9, 17)]
    # tiled, 9 tokens are priced as the block of 12 they start: 8 tokens (7 drafts) pay more
    assert _plan(seen, (100, 100), n_reqs=1, k=8, row_tile=(4, 80)) == [7]
    # untiled, 8 tokens look nearly as dear as 9, so it takes all 8 drafts: the slower choice
    assert _plan(seen, (100, 100), n_reqs=1, k=8) == [8]
    assert 8 / stairs(8) > 9 / stairs(9)


def _plan(cost_points, acceptance_counts, n_reqs, k=4, row_tile=(1, 0)):
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=k), max_model_len=1000,
                      explore_every=10**9, row_tile=row_tile)
    for t, s in cost_points:
        spec.observe_step(t, s)
    reqs = []
    for i in range(n_reqs):
        # prompt with a repeat so prompt lookup proposes k tokens
        r = _req([1, 2, 3, 4, 5, 6, 7, 8, 1, 2], rid=f"r{i}")
        spec._req[r.request_id] = list(acceptance_counts)
        reqs.append(r)
    spec.propose(reqs, n_reqs)
    return [len(r.spec_token_ids) for r in reqs]


def test_planner_speculates_when_steps_are_flat_and_stops_when_tokens_cost_their_share():
    flat = [(t, 0.020 + 0.0001 * t) for t in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert _plan(flat, (100, 60), n_reqs=1) == [4]
    assert _plan(flat, (100, 60), n_reqs=8) == [4] * 8
    # compute-bound: every token costs as much as the step's average: drafts never pay
    linear = [(t, 0.001 * t) for t in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert _plan(linear, (100, 60), n_reqs=32) == [0] * 32
    # a request whose drafts are never accepted gets none, even when steps are flat
    assert _plan(flat, (400, 0), n_reqs=1) == [0]


def test_planner_spends_drafts_on_the_requests_that_accept_them():
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4), max_model_len=1000,
                      explore_every=10**9)
    # 8 decodes cost 80 ms, each extra token 5 ms: a draft pays when accepted > ~0.5 of the time
    for t in range(1, 64):
        spec.observe_step(t, 0.040 + 0.005 * t)
    good, bad = _req([1, 2, 3, 1, 2], rid="good"), _req([1, 2, 3, 1, 2], rid="bad")
    spec._req["good"] = [100.0, 95.0]
    spec._req["bad"] = [100.0, 10.0]
    others = [_req([9], rid=f"o{i}") for i in range(6)]  # decodes without proposals
    spec.propose([good, bad, *others], 8)
    assert len(good.spec_token_ids) >= 2 and bad.spec_token_ids == []


def test_cost_model_outlier_cannot_price_a_count_out():
    # one slow measurement (a pause) at a count the planner would then never choose again
    m = StepCostModel()
    m.observe(1, 0.009)
    m.observe(12, 0.028)
    m.observe(16, 0.335)
    assert m.time(16) <= 0.028 * 16 / 12 + 1e-12  # no dearer per token than 12 tokens
    assert m.time(14) <= 0.028 * 14 / 12 + 1e-12
    assert m.time(1) == 0.009 and m.time(12) == 0.028
    # a known count's mean moves by at most max_jump x its mean per measurement
    m.observe(1, 1.0)
    assert abs(m.time(1) - (0.009 + 0.2 * (3 * 0.009 - 0.009))) < 1e-12


def test_a_resting_lookahead_explores_with_one_row_not_the_whole_batch():
    # compute-bound steps: a lookahead row (16 tokens for 1 + ~0.5 expected) never pays, so the
    # method rests; its periodic re-measurement takes one row, not 32 rows of 16 tokens
    spec = Speculator(SpeculativeConfig(method="lookahead"), max_model_len=1000, explore_every=4)
    for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        spec.observe_step(t, 0.001 * t)
    chosen = []
    for _ in range(8):
        reqs = [_req([1, 2, 3, 4, 5, 6, 7, 8, 1, 2], rid=f"r{i}") for i in range(32)]
        spec.propose(reqs, len(reqs))
        chosen.append(sum(bool(r.spec_token_ids) for r in reqs))
        for r in reqs:
            if r.spec_token_ids:
                spec.record(r, len(r.spec_token_ids), 0)
    assert max(chosen) == 1 and chosen.count(1) == 2, chosen  # steps 4 and 8 of 8
