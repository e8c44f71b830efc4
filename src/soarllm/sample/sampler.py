"""Logits -> next tokens for a batch of rows, with the parameters of a SamplingMetadata.

Order: penalties and min_tokens bans act on the raw logits; then the grammar masks of structured
output set every token a row's grammar does not allow to -inf (one ``where`` over the rows that
have a mask); logprobs are reported from the raw model distribution (before penalties, grammar
masks and temperature), and only for rows that ask; then greedy rows take the argmax (an all-greedy batch stops there), and sampled rows divide by their temperature, keep
only tokens allowed by every one of top-k, top-p and min-p (each computed on the temperature-scaled
distribution) and draw.

A sampled row whose grammar allows few tokens (at most ``SPARSE_GRAMMAR_MAX``; on CPU) draws over
those tokens alone: the same distribution (the filters see the masked distribution, where every
other token has probability 0) for a fraction of the work of a vocabulary-wide draw; a row whose
grammar allows one token takes it without drawing.

Drawing uses the exponential race (argmax of p / E, E ~ Exp(1)), which samples exactly from p.
Unseeded rows draw E from the global generator in one call; a seeded row draws from its own
generator keyed by (seed, choice index, output position) (see ``request_seed``), so its tokens do
not depend on the rest of the batch nor on preemption.

The output holds a list of tokens per row (one today; the verifier of speculative decoding returns
the accepted prefix plus a bonus token through the same shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from soarllm.kernels.argmax import argmax_rows
from soarllm.outputs import Logprob, TokenLogprobs
from soarllm.sample.metadata import SamplingMetadata

# A sampled grammar row that allows at most this many tokens draws over those alone (CPU logits).
SPARSE_GRAMMAR_MAX = 4096


@dataclass
class SamplerOutput:
    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]


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


class Sampler:
    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        if (md.all_greedy and md.penalty_rows is None and not md.banned
                and md.grammar_rows is None and max(md.num_logprobs, default=-1) < 0):
            # plain greedy rows: the argmax of the logits as they come (bfloat16 widens to
            # float32 exactly, so the float32 copy the other paths need would change nothing)
            ids = argmax_rows(logits).tolist()
            return SamplerOutput([[t] for t in ids], [None] * len(ids))
        logits = logits.float()
        lp_rows = [i for i, k in enumerate(md.num_logprobs) if k >= 0]
        raw_lp = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None
        logits = apply_penalties(logits, md)
        logits, few = apply_grammar_bitmask(logits, md)
        token_ids = argmax_rows(logits)
        if not md.all_greedy:
            dense = ~md.greedy
            sparse = {r: idx for r, idx in few.items() if dense[r]}
            if sparse:
                dense[list(sparse)] = False
            rows = torch.nonzero(dense).squeeze(1)
            if len(rows):
                token_ids[rows] = self._sample(logits[rows], md, rows)
            for r, idx in sparse.items():
                if len(idx) > 1:  # one allowed token: nothing to draw
                    one = torch.tensor([r], device=logits.device)
                    idx = idx[self._sample(logits[r, idx][None], md, one)]
                token_ids[r] = idx[0]
        ids = token_ids.tolist()
        lps: list[list[TokenLogprobs] | None] = [None] * len(ids)
        for j, i in enumerate(lp_rows):
            lps[i] = [token_logprobs(raw_lp[j], ids[i], md.num_logprobs[i])]
        return SamplerOutput([[t] for t in ids], lps)

    @staticmethod
    def _sample(logits: torch.Tensor, md: SamplingMetadata, rows: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / md.temperature[rows, None], dim=-1)
        keep = allowed_tokens(probs, md, rows)
        if keep is not None:
            probs = probs.masked_fill(~keep, 0.0)
        noise = torch.empty_like(probs).exponential_()
        if md.seeds:
            pos = {int(r): j for j, r in enumerate(rows.tolist())}
            for row, seed in md.seeds.items():
                if row not in pos:  # sampled in another call (a sparse grammar row)
                    continue
                g = torch.Generator(device=probs.device).manual_seed(seed)
                noise[pos[row]].exponential_(generator=g)
        return argmax_rows(probs / noise)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output) penalties and min_tokens
    bans, in place on the rows that have them."""
    if md.penalty_rows is not None:
        rows = md.penalty_rows
        sub = logits[rows]
        rep = md.repetition_penalty[:, None]
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(md.seen_mask, penalised, sub)
        counts = md.output_counts
        sub = sub - md.frequency_penalty[:, None] * counts
        sub = sub - md.presence_penalty[:, None] * (counts > 0).to(sub.dtype)
        logits[rows] = sub
    for row, ids in md.banned:
        logits[row, ids] = float("-inf")
    return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed int32 [G, W] masks -> bool [G, vocab_size]: bit j of word w is token 32 * w + j."""
    if bitmask.device.type != "cpu":
        return unpack_bitmask_torch(bitmask, vocab_size)
    # numpy's unpackbits: a few microseconds per row (the shifts below: a few hundred)
    words = np.ascontiguousarray(bitmask.numpy(), dtype="<i4")  # little-endian words
    bits = np.unpackbits(words.view(np.uint8), axis=-1, count=vocab_size, bitorder="little")
    return torch.from_numpy(bits.view(bool))


def unpack_bitmask_torch(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``unpack_bitmask`` in tensor ops, on the bitmask's device (accelerators)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_grammar_bitmask(logits: torch.Tensor, md: SamplingMetadata
                          ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Tokens the grammar of a row does not allow get -inf, in place on the rows that have one.

    Also returns, for the grammar rows that allow at most ``SPARSE_GRAMMAR_MAX`` tokens (CPU
    logits only; an empty dict elsewhere), row -> the allowed token ids (int64, ascending).
    """
    if md.grammar_rows is None:
        return logits, {}
    rows = md.grammar_rows
    allowed = unpack_bitmask(md.grammar_bitmask, logits.shape[-1])
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    logits[rows] = torch.where(allowed, logits[rows], neg_inf)
    few: dict[int, torch.Tensor] = {}
    if logits.device.type == "cpu":
        counts = allowed.sum(dim=-1).tolist()
        for k, r in enumerate(rows.tolist()):
            if 0 < counts[k] <= SPARSE_GRAMMAR_MAX:
                few[r] = torch.nonzero(allowed[k]).squeeze(1)
    return logits, few


def allowed_tokens(probs: torch.Tensor, md: SamplingMetadata,
                   rows: torch.Tensor) -> torch.Tensor | None:
    """Boolean mask of tokens allowed by top-k, top-p and min-p, or None if no row filters."""
    if md.top_k is None and md.min_p is None:
        return None
    keep = None
    vocab = probs.shape[-1]
    if md.top_k is not None:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        k = md.top_k[rows]
        k = torch.where(k > 0, k, vocab)
        rank_keep = torch.arange(vocab, device=probs.device)[None, :] < k[:, None]
        # Nucleus: keep the smallest prefix whose mass reaches top_p (the top token always stays).
        before = sorted_p.cumsum(dim=-1) - sorted_p
        rank_keep &= before < md.top_p[rows, None]
        keep = torch.zeros_like(rank_keep).scatter(-1, order, rank_keep)
    if md.min_p is not None:
        threshold = md.min_p[rows, None] * probs.max(dim=-1, keepdim=True).values
        by_min_p = probs >= threshold
        keep = by_min_p if keep is None else keep & by_min_p
    return keep
