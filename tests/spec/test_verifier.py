"""The rejection sampler for stochastic drafts keeps the target distribution (chi-square test)."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from soarllm.sample.verifier import num_accepted, rejection_sample


def test_num_accepted_counts_the_leading_agreement():
    assert num_accepted([1, 2, 3, 4], [1, 2, 9]) == 2
    assert num_accepted([5, 6], [5]) == 1
    assert num_accepted([7], []) == 0


def test_rejection_sampling_emits_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    vocab, trials = 6, 20000
    p = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])
    q = torch.tensor([[0.1, 0.1, 0.5, 0.1, 0.1, 0.1]])  # a poor draft: favours token 2
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    n_second = 0
    for _ in range(trials):
        x = int(torch.multinomial(q[0], 1, generator=g))
        out = rejection_sample(p, q, [x], generator=g)
        first[out[0]] += 1
        if len(out) == 2:  # the draft was accepted: the bonus token follows p at position 2
            second[out[1]] += 1
            n_second += 1
    assert chisquare(first.numpy(), (p[0] * trials).numpy()).pvalue > 0.001
    assert chisquare(second.numpy(), (p[1] * n_second).numpy()).pvalue > 0.001
    # acceptance rate is sum(min(p, q)) = 0.1 + 0.1 + 0.1 + 0.1 + 0.05 + 0.05 = 0.5
    assert abs(n_second / trials - 0.5) < 0.02
    # the statistic is sensitive: sampling straight from q fails the same test
    fake = torch.bincount(torch.multinomial(q[0], trials, replacement=True, generator=g),
                          minlength=vocab).float()
    assert chisquare(fake.numpy(), (p[0] * trials).numpy()).pvalue < 1e-6
