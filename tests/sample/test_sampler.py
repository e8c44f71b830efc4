"""Sampler checks against independent numpy computations of each filter's allowed set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soarllm.engine.request import Request
from soarllm.sample.sampler import Sampler
from soarllm.sampling_params import SamplingParams

V = 50


def _req(i=0, **kw):
    return Request(f"r{i}", [1, 2, 3], SamplingParams(**kw), eos_token_ids={0})


def _draws(logits, n=300, **kw):
    sampler = Sampler()
    reqs = [_req(i, **kw) for i in range(n)]
    return sampler(logits.expand(n, -1).clone(), reqs).token_ids


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, V, generator=g) * 2


def _probs(logits, t=1.0):
    x = logits[0].numpy() / t
    p = np.exp(x - x.max())
    return p / p.sum()


def test_top_k_never_emits_excluded(logits):
    allowed = set(np.argsort(-logits[0].numpy())[:5])
    assert set(_draws(logits, top_k=5)) <= allowed


def test_top_p_never_emits_excluded(logits):
    p = _probs(logits)
    order = np.argsort(-p)
    mass_before = np.cumsum(p[order]) - p[order]
    allowed = set(order[mass_before < 0.95])
    got = set(_draws(logits, top_p=0.95))
    assert got <= allowed and len(got) > 1


def test_min_p_never_emits_excluded(logits):
    p = _probs(logits, t=0.7)
    allowed = set(np.nonzero(p >= 0.2 * p.max())[0])
    assert set(_draws(logits, temperature=0.7, min_p=0.2)) <= allowed


def test_sampling_follows_the_softmax(logits):
    # chi-square goodness of fit over the tokens with enough expected mass
    n = 4000
    p = _probs(logits, t=1.5)
    counts = np.bincount(_draws(logits, n=n, temperature=1.5), minlength=V)
    big = p * n >= 5
    chi2 = (((counts[big] - n * p[big]) ** 2) / (n * p[big])).sum()
    dof = big.sum() - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof)  # far beyond the 99.9% quantile


def test_seeded_rows_do_not_depend_on_the_batch(logits):
    sampler = Sampler()
    alone = sampler(logits.clone(), [_req(0, seed=123)]).token_ids
    mixed = sampler(logits.expand(4, -1).clone(), [_req(1), _req(0, seed=123), _req(2), _req(3, seed=5)])
    assert mixed.token_ids[1] == alone[0]


def test_greedy_is_argmax_and_min_tokens_bans_eos():
    logits = torch.zeros(1, V)
    logits[0, 0] = 10.0  # EOS is the most likely token
    logits[0, 7] = 5.0
    sampler = Sampler()
    assert sampler(logits.clone(), [_req(temperature=0.0)]).token_ids == [0]
    assert sampler(logits.clone(), [_req(temperature=0.0, min_tokens=2)]).token_ids == [7]


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.zeros(1, V)
    logits[0, 2] = 1.0  # token 2 is in the prompt [1, 2, 3]
    logits[0, 9] = 0.9
    out = Sampler()(logits.clone(), [_req(temperature=0.0, repetition_penalty=1.5)])
    assert out.token_ids == [9]


def test_logprobs_report_rank_and_top_n(logits):
    out = Sampler()(logits.clone(), [_req(temperature=0.0, logprobs=3)])
    lp = out.logprobs[0]
    ref = torch.log_softmax(logits[0], -1)
    top3 = torch.topk(ref, 3).indices.tolist()
    assert list(lp) == top3
    assert lp[top3[0]].rank == 1
    assert lp[top3[0]].logprob == pytest.approx(ref[top3[0]].item(), abs=1e-6)
