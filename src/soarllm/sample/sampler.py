"""Logits -> next tokens for a batch of requests, each with its own SamplingParams.

Order: penalties and min_tokens act on the raw logits; logprobs are reported from the raw model
distribution (before penalties and temperature); then greedy rows take the argmax, and sampled rows
divide by their temperature, keep only tokens allowed by every one of top-k, top-p and min-p
(each computed on the temperature-scaled distribution) and draw.

Drawing uses the exponential race (argmax of p / E, E ~ Exp(1)), which samples exactly from p.
A seeded request draws E from a generator keyed by (seed, choice index, output position), so its
tokens do not depend on what else is in the batch, nor on preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soarllm.engine.request import Request
from soarllm.outputs import Logprob, TokenLogprobs

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def token_logprobs(lp_row: torch.Tensor, token_id: int, top_n: int) -> TokenLogprobs:
    """The chosen token's logprob and rank, plus the top_n most likely tokens."""
    out: TokenLogprobs = {}
    if top_n > 0:
        vals, ids = torch.topk(lp_row, top_n)
        for rank, (v, i) in enumerate(zip(vals.tolist(), ids.tolist()), start=1):
            out[i] = Logprob(v, rank)
    if token_id not in out:
        v = lp_row[token_id]
        rank = int((lp_row > v).sum()) + 1
        out[token_id] = Logprob(float(v), rank)
    return out


def _seed_for(req: Request) -> int:
    s = req.params.seed
    return ((s * _MIX) ^ ((req.index + 1) * 0xBF58476D1CE4E5B9) ^ (req.num_output_tokens * 0x94D049BB133111EB)) & _MASK


class Sampler:
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        logits = logits.float()
        want_lp = [r.params.logprobs is not None for r in reqs]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        logits = self._apply_penalties(logits, reqs)

        token_ids = logits.argmax(dim=-1)
        sampled_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows)
            token_ids[rows] = self._sample(logits[rows], [reqs[i] for i in sampled_rows])
        ids = token_ids.tolist()
        lps: list[TokenLogprobs | None] = [
            token_logprobs(raw_lp[i], ids[i], r.params.logprobs) if want_lp[i] else None
            for i, r in enumerate(reqs)
        ]
        return SamplerOutput(ids, lps)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        for i, r in enumerate(reqs):
            p = r.params
            if p.needs_penalties:
                row = logits[i]
                if p.repetition_penalty != 1.0:
                    seen = torch.tensor(sorted(set(r.all_token_ids)), dtype=torch.long)
                    vals = row[seen]
                    row[seen] = torch.where(
                        vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                    )
                if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
                    out = torch.tensor(r.output_token_ids, dtype=torch.long)
                    counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].float()
                    row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
            if r.num_output_tokens < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else r.eos_token_ids)
                if banned:
                    logits[i, torch.tensor(sorted(banned))] = float("-inf")
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        temps = torch.tensor([r.params.temperature for r in reqs], dtype=logits.dtype)
        logits = logits / temps[:, None]
        probs = torch.softmax(logits, dim=-1)
        keep = _allowed(probs, reqs)
        if keep is not None:
            probs = probs.masked_fill(~keep, 0.0)
        noise = torch.empty_like(probs)
        for i, r in enumerate(reqs):
            if r.params.seed is None:
                noise[i].exponential_()
            else:
                g = torch.Generator(device=probs.device).manual_seed(_seed_for(r))
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)


def _allowed(probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor | None:
    """Boolean mask of tokens allowed by top-k, top-p and min-p, or None if no row filters."""
    top_k = [r.params.top_k for r in reqs]
    top_p = [r.params.top_p for r in reqs]
    min_p = [r.params.min_p for r in reqs]
    if not any(top_k) and all(p >= 1.0 for p in top_p) and not any(min_p):
        return None
    vocab = probs.shape[-1]
    keep = torch.ones_like(probs, dtype=torch.bool)
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank_keep = torch.ones_like(sorted_p, dtype=torch.bool)
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k])
        rank_keep &= torch.arange(vocab)[None, :] < k[:, None]
        # Nucleus: keep the smallest prefix whose mass reaches top_p (the top token always stays).
        before = sorted_p.cumsum(dim=-1) - sorted_p
        rank_keep &= before < torch.tensor(top_p, dtype=probs.dtype)[:, None]
        keep = torch.zeros_like(keep).scatter(-1, order, rank_keep)
    if any(min_p):
        threshold = torch.tensor(min_p, dtype=probs.dtype)[:, None] * probs.max(dim=-1, keepdim=True).values
        keep &= probs >= threshold
    return keep
