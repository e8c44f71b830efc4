"""The pool of fixed-size KV blocks: reference counts, an LRU queue of free blocks and the
hash -> block map of the prefix cache.

A freed block keeps its contents and its hash: it stays findable by the prefix cache until the
pool hands it out again, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front = evicted first). Insertion order = LRU.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks if self.num_blocks else 0.0

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:  # evict it from the prefix cache
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on blocks found in the cache (or shared with another request)."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1

    def num_free_among(self, blocks: list[KVBlock]) -> int:
        return sum(1 for b in blocks if b.ref_cnt == 0)

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block)

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference on each block; free blocks go to the back of the LRU queue.

        Callers pass a sequence's blocks tail first, so a sequence's last blocks are evicted before
        its first ones (which more requests are likely to share).
        """
        for b in blocks:
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, b
            if b.ref_cnt == 0:
                if b.block_hash is None:
                    # Uncached blocks are worthless: hand them out before cached ones.
                    self._free[b.block_id] = b
                    self._free.move_to_end(b.block_id, last=False)
                else:
                    self._free[b.block_id] = b

    def reset_prefix_cache(self) -> None:
        for b in self.blocks:
            b.block_hash = None
        self._cached.clear()
