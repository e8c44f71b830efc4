"""Verification of draft tokens: keep the longest prefix the target model agrees with, plus one
token of its own. Either way the emitted tokens follow the target distribution exactly.

Deterministic drafts (n-gram, reference, lookahead: a one-hot draft distribution q) need no
draft probabilities. Standard speculative sampling accepts draft x with probability
min(1, p(x) / q(x)) = p(x) and otherwise draws from norm(max(0, p - q)), which is p with x removed.
Drawing y ~ p at the position and accepting x exactly when y == x does both at once: P(accept) =
p(x), and a rejected position emits y, distributed as p conditioned on y != x. So the runner samples
every verified position with the ordinary sampler (same parameters, same per-position seeded
noise) and ``num_accepted`` compares: a seeded request then emits the very tokens it would emit
without speculation, and a greedy one is the argmax at every position.

Drafts from a model (a probability vector per position) go through ``rejection_sample``.
"""

from __future__ import annotations

import torch


def num_accepted(sampled: list[int], drafts: list[int]) -> int:
    """How many leading drafts equal the target's own choice at their position."""
    n = 0
    for s, d in zip(sampled, drafts):
        if s != d:
            break
        n += 1
    return n


def follow_candidates(toks: list[int], candidates: list[list[int]],
                      row_tokens: list[int]) -> tuple[list[int], int]:
    """Lossless verification of several guessed continuations (lookahead decoding): ``toks`` are
    the tokens sampled at the last known token (index 0) and at every candidate token, candidate
    after candidate; ``candidates`` are each candidate's rows and ``row_tokens`` the row's tokens. The
    first emitted token is toks[0]; while some candidate's next token equals the last emitted
    one, the first such candidate's sample there is emitted next (every matching candidate has
    the same context at that point, so any of them samples the same distribution). Returns the
    indices into ``toks`` of the emitted tokens and the candidate followed (-1: none)."""
    picks, best = [0], -1
    active = list(range(len(candidates)))
    start = [1]
    for c in candidates[:-1]:
        start.append(start[-1] + len(c))
    depth = 0
    while active:
        last = toks[picks[-1]]
        active = [g for g in active
                  if depth < len(candidates[g]) and row_tokens[candidates[g][depth]] == last]
        if not active:
            break
        best = active[0]
        picks.append(start[best] + depth)
        depth += 1
    return picks, best


def rejection_sample(
    target_probs: torch.Tensor,  # [k + 1, V] the target's distribution at each verified position
    draft_probs: torch.Tensor,  # [k, V] the draft's distribution the drafts were drawn from
    draft_tokens: list[int],  # k drafts
    generator: torch.Generator | None = None,
) -> list[int]:
    """Speculative sampling for a stochastic draft: the accepted drafts, then one token from the
    residual norm(max(0, p - q)) at the first rejection or from p after the last draft."""
    k = len(draft_tokens)
    out: list[int] = []
    u = torch.rand(k, generator=generator, device=target_probs.device, dtype=torch.float64)
    for j, x in enumerate(draft_tokens):
        p, q = float(target_probs[j, x]), float(draft_probs[j, x])
        if q > 0 and u[j].item() * q <= p:  # accept with probability min(1, p / q)
            out.append(x)
            continue
        residual = (target_probs[j].double() - draft_probs[j].double()).clamp_min(0)
        total = residual.sum()
        dist = residual / total if total > 0 else target_probs[j].double()
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs[k].double(), 1, generator=generator)))
    return out
