"""SamplingMetadata: the sampling parameters of one step's sampled rows, as tensors.

Built by gathering rows of the persistent input batch, so a step never walks request objects: the
per-row Python work is limited to the few rows that need it (seeded generators, min_tokens bans,
logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] float32; rows that are greedy hold 1.0 (unused)
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    top_k: torch.Tensor | None = None  # [B] int64, 0 = off; None when no row filters
    top_p: torch.Tensor | None = None  # [B] float32
    min_p: torch.Tensor | None = None  # [B] float32
    # Penalties, only for the rows listed in penalty_rows (None when no row has any).
    penalty_rows: torch.Tensor | None = None  # [P] int64 rows of the batch
    repetition_penalty: torch.Tensor | None = None  # [P]
    presence_penalty: torch.Tensor | None = None  # [P]
    frequency_penalty: torch.Tensor | None = None  # [P]
    seen_mask: torch.Tensor | None = None  # [P, V] bool: token in prompt or output
    output_counts: torch.Tensor | None = None  # [P, V] float: occurrences in the output
    banned: list[tuple[int, list[int]]] = field(default_factory=list)  # (row, ids) -> -inf
    seeds: dict[int, int] = field(default_factory=dict)  # row -> generator seed
    num_logprobs: list[int] = field(default_factory=list)  # per row; -1: none
    # Structured output: the rows sampled under a grammar and their packed allowed-token masks
    # (int32 [G, ceil(V' / 32)], bit j of word w allows token 32 * w + j); None when no row has one.
    grammar_rows: torch.Tensor | None = None  # [G] int64 rows of the batch
    grammar_bitmask: torch.Tensor | None = None  # [G, W] int32

    @property
    def wants_logprobs(self) -> bool:
        return any(k >= 0 for k in self.num_logprobs)


def request_seed(seed: int, index: int, num_output_tokens: int) -> int:
    """The generator seed of a seeded request's next token: keyed by (seed, choice index, output
    position), so its draws depend neither on the batch around it nor on preemption."""
    return ((seed * _MIX) ^ ((index + 1) * 0xBF58476D1CE4E5B9)
            ^ (num_output_tokens * 0x94D049BB133111EB)) & _MASK


def build_sampling_metadata(batch, rows: np.ndarray, vocab_size: int,
                            device: str | torch.device = "cpu",
                            offsets: np.ndarray | None = None) -> SamplingMetadata:
    """Gather the sampling parameters of ``rows`` of an InputBatch (in that order).

    ``offsets`` (speculative verification): the sampled position of each entry, counted in draft
    tokens past the row's known tokens. Entry (row, j) samples as if the row's first j draft
    tokens (written after its known tokens) had been generated: penalties count them, min_tokens
    and the seed's position move on by j. So each position samples exactly as it would without
    speculation.
    """
    if offsets is None:
        offsets = np.zeros(len(rows), dtype=np.int64)
    greedy = batch.greedy[rows]
    temp = np.where(greedy, 1.0, batch.temperature[rows]).astype(np.float32)
    md = SamplingMetadata(
        temperature=torch.from_numpy(temp).to(device),
        greedy=torch.from_numpy(greedy).to(device),
        all_greedy=bool(greedy.all()),
        num_logprobs=batch.num_logprobs[rows].tolist(),
    )
    if not md.all_greedy:
        top_k, top_p, min_p = batch.top_k[rows], batch.top_p[rows], batch.min_p[rows]
        sampled = ~greedy
        if (top_k[sampled] > 0).any() or (top_p[sampled] < 1.0).any():
            md.top_k = torch.from_numpy(np.where(top_k >= vocab_size, 0, top_k)).to(device)
            md.top_p = torch.from_numpy(top_p.copy()).to(device)
        if (min_p[sampled] > 0).any():
            md.min_p = torch.from_numpy(min_p.copy()).to(device)
    _add_penalties(md, batch, rows, offsets, vocab_size, device)
    out_len = batch.num_tokens[rows] + offsets - batch.num_prompt_tokens[rows]
    for i in np.nonzero(out_len < batch.min_tokens[rows])[0].tolist():
        r = int(rows[i])
        p = batch.params[r]
        if p.structured_outputs is not None:
            continue  # the grammar decides where the output may end
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(batch.eos_token_ids[r]))
        if banned:
            md.banned.append((i, sorted(banned)))
    for i in np.nonzero(batch.has_seed[rows] & ~greedy)[0].tolist():
        r = int(rows[i])
        md.seeds[i] = request_seed(int(batch.seed[r]), int(batch.index[r]), int(out_len[i]))
    return md


def _add_penalties(md: SamplingMetadata, batch, rows: np.ndarray, offsets: np.ndarray,
                   vocab_size: int, device) -> None:
    rep = batch.repetition_penalty[rows]
    pres = batch.presence_penalty[rows]
    freq = batch.frequency_penalty[rows]
    idx = np.nonzero((rep != 1.0) | (pres != 0.0) | (freq != 0.0))[0]
    if not len(idx):
        return
    r = rows[idx]
    lens = batch.num_tokens[r] + offsets[idx]
    width = int(lens.max())
    toks = batch.token_ids[r, :width].astype(np.int64)
    col = np.arange(width)[None, :]
    # Pad with an extra bucket (vocab_size) that is dropped after counting.
    all_toks = np.where(col < lens[:, None], toks, vocab_size)
    out_toks = np.where((col >= batch.num_prompt_tokens[r][:, None]) & (col < lens[:, None]),
                        toks, vocab_size)
    ones = torch.ones(toks.shape, dtype=torch.float32)
    seen = torch.zeros(len(idx), vocab_size + 1).scatter_add_(1, torch.from_numpy(all_toks), ones)
    counts = torch.zeros(len(idx), vocab_size + 1).scatter_add_(1, torch.from_numpy(out_toks), ones)
    md.penalty_rows = torch.from_numpy(idx).to(device)
    md.repetition_penalty = torch.from_numpy(rep[idx].copy()).to(device)
    md.presence_penalty = torch.from_numpy(pres[idx].copy()).to(device)
    md.frequency_penalty = torch.from_numpy(freq[idx].copy()).to(device)
    md.seen_mask = (seen[:, :vocab_size] > 0).to(device)
    md.output_counts = counts[:, :vocab_size].to(device)



def add_grammar_bitmask(md: SamplingMetadata, entry_req_ids: list[str], per_req: np.ndarray,
                        grammar_req_ids: list[str], bitmask: np.ndarray,
                        device: str | torch.device = "cpu") -> None:
    """Attach the step's grammar masks to the sampled rows they belong to.

    ``entry_req_ids[i]`` samples ``per_req[i]`` consecutive rows (1, or 1 + k when verifying k
    drafts); row ``k`` of ``bitmask`` masks the one sampled row of ``grammar_req_ids[k]``.
    """
    first_row = np.cumsum(per_req) - per_req
    where = {rid: i for i, rid in enumerate(entry_req_ids)}
    rows, masks = [], []
    for k, rid in enumerate(grammar_req_ids):
        i = where.get(rid)
        if i is None:
            raise RuntimeError(f"request {rid} has a grammar mask but samples nothing this step")
        if per_req[i] != 1:
            raise RuntimeError(f"request {rid} has a grammar and must not verify drafts")
        rows.append(int(first_row[i]))
        masks.append(k)
    if rows:
        md.grammar_rows = torch.tensor(rows, dtype=torch.int64, device=device)
        md.grammar_bitmask = torch.from_numpy(np.ascontiguousarray(bitmask[masks])).to(device)
