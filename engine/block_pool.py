"""Ref-counted KV blocks with a prefix cache of full blocks and LRU eviction.

Blocks that reach ref count 0 go to the free queue. A freed block that holds a prefix hash stays
findable until it is handed out again; the queue pops from its front, so the least recently freed
(least recently used) cached blocks are reused first. Freed blocks without a hash go to the front,
since nothing can ever hit them.

With events enabled (``enable_events``) the pool records every hash that leaves its hash map as
a :class:`~engine.kv_events.BlockRemoved`; stores are recorded by the KV cache manager, which knows
the tokens and the chain of each block.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from .kv_events import BlockRemoved, KVEvent


def chain_hash(parent: bytes, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """Hash of a full block given its parent's hash: equal hashes mean equal whole prefixes."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


def root_hash(salt: str | bytes) -> bytes:
    """Chain seed; salting with the model keeps engines' caches (and hashes) disjoint."""
    data = salt.encode() if isinstance(salt, str) else salt
    return hashlib.blake2b(b"kv-root:" + data, digest_size=16).digest()


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """All KV blocks of one engine."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # KV events since the last take_events(); None = disabled, nothing is recorded.
        self.events: list[KVEvent] | None = None

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (including evictable cached ones)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks held by live sequences; cached-but-free blocks count as free."""
        return self.num_used_blocks / self.num_blocks

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def cached_hashes(self) -> set[bytes]:
        """Every hash the prefix cache can hit now."""
        return set(self._cached)

    def free_order(self) -> list[int]:
        """Block ids in the order they would be handed out (for tests and debugging)."""
        return list(self._free)

    # -- mutations -------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the front of the free queue, evicting their cached hashes."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, only {len(self._free)} free")
        out = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            blk = self.blocks[bid]
            if blk.block_hash is not None:
                if self._cached.get(blk.block_hash) == bid:
                    del self._cached[blk.block_hash]
                    if self.events is not None:
                        self._record_removed(blk.block_hash)
                blk.block_hash = None
            blk.ref_cnt = 1
            out.append(bid)
        return out

    def acquire(self, block_ids: list[int]) -> None:
        """Take another reference on existing blocks (prefix hits, forks)."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_cnt == 0:
                del self._free[bid]
            blk.ref_cnt += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference on each block, in the order given."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_cnt <= 0:
                raise RuntimeError(f"block {bid} released more often than acquired")
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self._free[bid] = None
                if blk.block_hash is None:
                    self._free.move_to_end(bid, last=False)

    def set_hash(self, block_id: int, block_hash: bytes) -> bool:
        """Make a full, computed block findable by its prefix hash (first writer wins).

        True when the hash entered the hash map."""
        blk = self.blocks[block_id]
        if blk.block_hash is not None:
            return False
        if block_hash in self._cached:
            return False
        blk.block_hash = block_hash
        self._cached[block_hash] = block_id
        return True

    # -- events ----------------------------------------------------------------------------------
    def enable_events(self) -> None:
        """Start recording KV events (see engine/kv_events.py)."""
        if self.events is None:
            self.events = []

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call, oldest first ([] when disabled)."""
        if not self.events:
            return []
        out, self.events = self.events, []
        return out

    def _record_removed(self, block_hash: bytes) -> None:
        # Consecutive evictions share one event; order against stores is kept.
        last = self.events[-1] if self.events else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(block_hash)
        else:
            self.events.append(BlockRemoved([block_hash]))

    def check_consistency(self) -> None:
        """Raise if the free queue, ref counts and hash map disagree."""
        for blk in self.blocks:
            in_free = blk.block_id in self._free
            if (blk.ref_cnt == 0) != in_free:
                raise AssertionError(f"block {blk.block_id}: ref {blk.ref_cnt}, in free queue {in_free}")
            if blk.ref_cnt < 0:
                raise AssertionError(f"block {blk.block_id}: negative ref count")
        for h, bid in self._cached.items():
            if self.blocks[bid].block_hash != h:
                raise AssertionError(f"hash map points at block {bid} which holds another hash")
