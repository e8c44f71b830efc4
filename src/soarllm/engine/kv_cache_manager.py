"""Per-request KV block tables on top of the BlockPool, with prefix caching.

A full block's hash covers its tokens and, through its parent's hash, every token before it, so two
requests share a block only when their whole prefixes agree.
"""

from __future__ import annotations

import hashlib
from array import array

from soarllm.engine.block_pool import BlockPool, KVBlock
from soarllm.engine.request import Request


def hash_block(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.sha256(parent or b"root")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_hashes: dict[str, list[bytes]] = {}
        self.req_num_cached: dict[str, int] = {}  # leading blocks already registered in the cache
        # Counted in tokens, over requests that asked the cache.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def _hashes(self, req: Request, upto_tokens: int) -> list[bytes]:
        hashes = self.req_hashes.setdefault(req.request_id, [])
        bs = self.block_size
        tokens = req.all_token_ids
        while (len(hashes) + 1) * bs <= upto_tokens:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """Blocks already holding this request's leading tokens, and how many tokens they cover.

        At least one token is always left to compute, so the step that finishes the prompt has
        logits to sample from.
        """
        max_full = (req.num_tokens - 1) // self.block_size
        if req.fork_of is not None and req.fork_of.request_id in self.req_blocks:
            # n > 1: siblings share the leader's full prompt blocks.
            # Only blocks made entirely of prompt tokens are common to both.
            leader_blocks = self.req_blocks[req.fork_of.request_id]
            n = min(
                (min(req.num_tokens - 1, req.num_prompt_tokens)) // self.block_size,
                req.fork_of.num_computed_tokens // self.block_size,
                len(leader_blocks),
            )
            return leader_blocks[:n], n * self.block_size
        if not self.enable_prefix_caching or req.wants_prompt_logprobs:
            return [], 0
        self.prefix_cache_queries += req.num_tokens
        blocks = []
        for h in self._hashes(req, max_full * self.block_size):
            b = self.pool.lookup(h)
            if b is None:
                break
            blocks.append(b)
        n_tokens = len(blocks) * self.block_size
        self.prefix_cache_hits += n_tokens
        return blocks, n_tokens

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed: list[KVBlock] | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens (after ``computed`` cache hits); False if
        the pool has too few free blocks (nothing is changed then)."""
        computed = computed or []
        blocks = self.req_blocks.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed) * self.block_size
        total = num_computed + num_new_tokens
        need = -(-total // self.block_size) - len(blocks) - len(computed)
        # Cache hits sitting in the free queue stop being free once we take them.
        if need + self.pool.num_free_among(computed) > self.pool.num_free_blocks:
            return False
        if computed:
            self.pool.touch(computed)
            blocks.extend(computed)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        if self.enable_prefix_caching:
            # Blocks that are full once this step's tokens are written become findable now: the
            # runner writes every token's KV before any attention reads it in the same step.
            full = min(total, req.num_tokens) // self.block_size
            done = self.req_num_cached.get(req.request_id, 0)
            hashes = self._hashes(req, full * self.block_size)
            for i in range(done, full):
                self.pool.cache(blocks[i], hashes[i])
            self.req_num_cached[req.request_id] = max(done, full)
        return True

    def trim(self, req: Request, num_tokens: int) -> int:
        """Give back the blocks past the first ``num_tokens`` tokens (rejected draft slots, which no
        other request shares nor the prefix cache knows); returns the blocks left."""
        blocks = self.req_blocks.get(req.request_id)
        if blocks is None:
            return 0
        keep = -(-num_tokens // self.block_size)
        if len(blocks) > keep:
            extra = blocks[keep:]
            del blocks[keep:]
            self.pool.free(list(reversed(extra)))
        return len(blocks)

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, [])
        self.pool.free(list(reversed(blocks)))
        self.req_hashes.pop(req.request_id, None)
        self.req_num_cached.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
