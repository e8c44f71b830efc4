"""Context parallelism in the runner: which of a step's tokens a rank runs, and where their KV goes.

Every context-parallel rank keeps the whole persistent batch and builds the same global flat
batch from each step message; this module cuts it down to the rank's share (the striped layout of
kernels/context_parallel_attention.py: token p belongs to rank p % N):

- prefill chunks: the rank runs only its own tokens, so the projections, MLP and attention of a
  long prompt are split N ways;
- decodes: every rank runs every decode row (one token: splitting it saves nothing) and only the
  token's owner stores its KV, so decoded tokens spread round-robin over the ranks.

The scheduler's KV block holds ``block_size x N`` tokens (``EngineArgs.tokens_per_block``); each
rank stores its ``block_size`` of them in its own cache block with the same id, so a request's
block table is the same on every rank and each rank's KV memory is 1 / N of the request's.
The rows whose logits are needed come from the rank that ran them, summed into one tensor
(zeros elsewhere) by an all-reduce; rank 0 samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LocalStep:
    keep: np.ndarray  # [T] bool: the global batch's tokens this rank runs
    slots: np.ndarray  # [T_local] this rank's cache slot of each token run, -1: another rank's
    query_start_loc: np.ndarray  # [B+1] offsets of each request's tokens in the local batch
    logits_owned: np.ndarray  # [L] bool: this rank supplies logits row j
    logits_local: np.ndarray  # [L] the local row of each owned logits row (0 elsewhere)


def shard_step(positions: np.ndarray, slots: np.ndarray, req_idx: np.ndarray, single: np.ndarray,
               logits_rows: np.ndarray, block_size: int, rank: int, world_size: int) -> LocalStep:
    """This rank's part of a global flat batch. ``slots`` are the scheduler's (blocks of
    ``block_size * world_size`` tokens), ``single`` marks the decode requests, ``req_idx`` the
    request of every token; ``block_size`` is the slots of one block on one rank."""
    owner = positions % world_size
    decode = single[req_idx]
    keep = decode | (owner == rank)
    span = block_size * world_size
    local_slots = (slots // span) * block_size + (slots % span) // world_size
    local_slots = np.where(owner == rank, local_slots, -1)[keep]
    counts = np.bincount(req_idx[keep], minlength=len(single))
    qsl = np.zeros(len(single) + 1, dtype=np.int64)
    np.cumsum(counts, out=qsl[1:])
    local_index = np.cumsum(keep) - 1
    # decode rows are the same on every rank: rank 0 supplies them
    supplier = np.where(decode, 0, owner)[logits_rows]
    owned = supplier == rank
    return LocalStep(keep, local_slots.astype(np.int64), qsl, owned,
                     np.where(owned, local_index[logits_rows], 0))


def gather_logit_rows(hidden: torch.Tensor, local: LocalStep, cp) -> torch.Tensor:
    """The hidden states of the step's logits rows [L, H], in the global order, on every rank."""
    rows = torch.zeros((len(local.logits_owned), hidden.shape[-1]), dtype=hidden.dtype,
                       device=hidden.device)
    owned = torch.from_numpy(local.logits_owned).to(hidden.device)
    idx = torch.from_numpy(local.logits_local).to(hidden.device)
    rows[owned] = hidden[idx[owned]]
    return cp.all_reduce(rows)  # one supplier per row: the sum is its value, exactly
