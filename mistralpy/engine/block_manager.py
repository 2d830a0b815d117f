"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, prefix caching.

Prefix caching: every FULL block of a sequence whose K/V have been computed gets a key that
chains the previous block's key, the block's token ids and the content hashes of the images
whose tokens fall in the block (same text with a different image is a different key). A new
sequence reuses the longest run of cached blocks matching its own chain. Freed blocks keep
their key and stay reusable until the allocator needs them (least recently freed first; freed
blocks without a key are handed out before any cached one).

Plain Python; no tensors. Block ids index the per-layer KV-cache tensors of the runner.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from mistralpy.engine.sequence import Sequence


def chain_hash(parent: bytes | None, token_ids: list[int], image_hashes: tuple[str, ...]) -> bytes:
    """Key of one full block: sha256 over the parent key, the tokens and the image hashes."""
    h = hashlib.sha256(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    for image_hash in image_hashes:
        h.update(b"|img:" + image_hash.encode())
    return h.digest()


class BlockManager:
    """Allocates KV blocks to sequences; reference-counts blocks shared through the cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks >= 1 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block holding those tokens' K/V
        # Blocks with ref_count 0, in eviction order (front is reused first).
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.tables: dict[str, list[int]] = {}
        self.num_keyed: dict[str, int] = {}  # leading blocks of a table already keyed

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def block_table(self, seq_id: str) -> list[int]:
        return self.tables.get(seq_id, [])

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of `seq` (at most num_tokens - 1 tokens, so
        that at least the last token is computed and yields logits)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for key in self._keys(seq, max_blocks):
            block = self.cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(
        self, seq_id: str, num_tokens: int, cached_prefix: list[int] | tuple[int, ...] = ()
    ) -> bool:
        """Grow the sequence's table to hold `num_tokens` tokens, first taking `cached_prefix`
        (only for a sequence with an empty table). Returns False, changing nothing, if blocks
        run out."""
        table = self.tables.get(seq_id, [])
        assert not cached_prefix or not table, "a cached prefix only starts a new table"
        needed = -(-num_tokens // self.block_size) - len(table) - len(cached_prefix)
        reclaimed = sum(1 for b in cached_prefix if self.ref_counts[b] == 0)
        if needed > len(self.free_blocks) - reclaimed:
            return False
        for block in cached_prefix:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
        table = self.tables.setdefault(seq_id, table)
        table.extend(cached_prefix)
        if seq_id not in self.num_keyed:
            self.num_keyed[seq_id] = len(cached_prefix)
        for _ in range(max(0, needed)):
            table.append(self._take_free_block())
        return True

    def trim(self, seq_id: str, num_tokens: int) -> None:
        """Free the blocks of the sequence's table past the first `num_tokens` tokens (grown
        for drafted tokens that were rejected; never keyed, since they held no computed
        block)."""
        table = self.tables.get(seq_id, [])
        keep = -(-num_tokens // self.block_size)
        while len(table) > keep:
            block = table.pop()
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] == 0 and self.block_keys[block] is None
            self.free_blocks[block] = None
            self.free_blocks.move_to_end(block, last=False)

    def free(self, seq_id: str) -> None:
        """Release all blocks of the sequence; keyed ones stay cached until reused."""
        table = self.tables.pop(seq_id, [])
        self.num_keyed.pop(seq_id, None)
        # Reverse order: a sequence's later blocks are evicted before its earlier ones, which
        # are shared by more prompts.
        for block in reversed(table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.block_keys[block] is None:
                    self.free_blocks.move_to_end(block, last=False)

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Key every full block of `seq` whose tokens are all computed (call after each step)."""
        if not self.enable_prefix_caching or seq.seq_id not in self.tables:
            return
        table = self.tables[seq.seq_id]
        done = self.num_keyed[seq.seq_id]
        full = min(seq.num_computed_tokens // self.block_size, len(table))
        for i, key in enumerate(self._keys(seq, full)[done:], start=done):
            block = table[i]
            # Another sequence may have computed the same block at the same time: keep the
            # first copy cached, leave this one unkeyed.
            if self.block_keys[block] is None and key not in self.cached:
                self.block_keys[block] = key
                self.cached[key] = block
        self.num_keyed[seq.seq_id] = max(done, full)

    def reset_prefix_cache(self) -> None:
        """Forget all keys of unreferenced blocks (e.g. after new weights are loaded)."""
        for block in self.free_blocks:
            key = self.block_keys[block]
            if key is not None:
                del self.cached[key]
                self.block_keys[block] = None

    def _take_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        key = self.block_keys[block]
        if key is not None:  # evict: its contents are about to be overwritten
            del self.cached[key]
            self.block_keys[block] = None
        self.ref_counts[block] = 1
        return block

    def _keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Chain keys of the first `num_blocks` full blocks of `seq`, extending its memo."""
        keys = seq.block_hashes
        bs = self.block_size
        while len(keys) < num_blocks:
            i = len(keys)
            start, end = i * bs, (i + 1) * bs
            assert end <= seq.num_tokens
            image_hashes = tuple(
                seq.images[j].content_hash for j, _, _ in seq.images_in(start, end)
            )
            keys.append(
                chain_hash(keys[-1] if keys else None, seq.all_token_ids[start:end], image_hashes)
            )
        return keys[:num_blocks]
