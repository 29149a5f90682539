"""Per-sequence block tables on top of a :class:`BlockPool`: prefix lookup, slots, fork, COW."""

from __future__ import annotations

from dataclasses import dataclass

from .block_pool import BlockPool, chain_hash, root_hash
from .kv_events import BlockStored, KVEvent
from .sequence import Sequence


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens served from cache


class KVCacheManager:
    """Maps sequences to KV blocks. Knows nothing about tensors: the runner owns those."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_salt: str = "", enable_events: bool = False):
        self.pool = BlockPool(num_blocks)
        if enable_events:
            self.pool.enable_events()
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._root = root_hash(hash_salt)
        self.stats = PrefixCacheStats()

    # -- hashing ---------------------------------------------------------------------------------
    def _update_hashes(self, seq: Sequence, upto_tokens: int) -> None:
        """Extend ``seq.block_hashes`` to cover every full block within the first ``upto_tokens``."""
        bs = self.block_size
        n_full = upto_tokens // bs
        while len(seq.block_hashes) < n_full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else self._chain_root(seq)
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))

    @property
    def model_root(self) -> bytes:
        """Seed of every unsalted hash chain of this engine (``root_hash(f"{model}|{dtype}")``)."""
        return self._root

    def _chain_root(self, seq: Sequence) -> bytes:
        """Seed of ``seq``'s hash chain: the model root, salted by the request's prefix salt."""
        return root_hash(self._root + seq.prefix_salt) if seq.prefix_salt else self._root

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of a new sequence.

        Never covers the last token: its logits must be computed in the forward pass.
        """
        if not self.enable_prefix_caching:
            return []
        usable = seq.num_tokens - 1
        self._update_hashes(seq, usable)
        hits = []
        for h in seq.block_hashes[:usable // self.block_size]:
            bid = self.pool.lookup(h)
            if bid is None:
                break
            hits.append(bid)
        return hits

    # -- allocation ------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size) - len(seq.block_table)
        return max(need, 0) + int(self._needs_cow(seq))

    def _needs_cow(self, seq: Sequence) -> bool:
        """The next write lands in a partially filled block that another sequence shares."""
        pos = seq.num_computed_tokens
        if pos % self.block_size == 0 or pos // self.block_size >= len(seq.block_table):
            return False
        return self.pool.blocks[seq.block_table[pos // self.block_size]].ref_cnt > 1

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       copies: list[tuple[int, int]], cached_blocks: list[int] | None = None) -> bool:
        """Give ``seq`` room for ``num_new_tokens`` more tokens; False (and no change) if the pool
        cannot. ``cached_blocks`` are prefix hits for a new sequence; copy-on-write pairs
        ``(src, dst)`` are appended to ``copies`` for the runner to apply before the forward."""
        cached_blocks = cached_blocks or []
        if cached_blocks:
            assert not seq.block_table and seq.num_computed_tokens == 0
            # Hit blocks sitting in the free queue stop being free once we take them.
            revived = sum(1 for b in cached_blocks if self.pool.blocks[b].ref_cnt == 0)
            total = len(cached_blocks) * self.block_size + num_new_tokens
            need = -(-total // self.block_size) - len(cached_blocks)
            if need + revived > self.pool.num_free_blocks:
                return False
            self.pool.acquire(cached_blocks)
            seq.block_table = list(cached_blocks)
            seq.num_computed_tokens = len(cached_blocks) * self.block_size
            seq.block_table += self.pool.allocate(need)
            return True
        if self.blocks_needed(seq, num_new_tokens) > self.pool.num_free_blocks:
            return False
        if self._needs_cow(seq):
            i = seq.num_computed_tokens // self.block_size
            src = seq.block_table[i]
            (dst,) = self.pool.allocate(1)
            copies.append((src, dst))
            self.pool.release([src])
            seq.block_table[i] = dst
        total = seq.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size) - len(seq.block_table)
        if need > 0:
            seq.block_table += self.pool.allocate(need)
        return True

    def record_prefix_query(self, seq: Sequence, num_hit_tokens: int) -> None:
        self.stats.queries += seq.num_tokens
        self.stats.hits += num_hit_tokens

    def cache_computed_blocks(self, seq: Sequence, from_token: int = 0) -> None:
        """Publish the full blocks whose K/V became complete after ``from_token``."""
        if not self.enable_prefix_caching:
            return
        self._update_hashes(seq, seq.num_computed_tokens)
        first, end = from_token // self.block_size, seq.num_computed_tokens // self.block_size
        if self.pool.events is not None:
            self._cache_blocks_recording(seq, first, end)
            return
        for i in range(first, end):
            self.pool.set_hash(seq.block_table[i], seq.block_hashes[i])

    def _cache_blocks_recording(self, seq: Sequence, first: int, end: int) -> None:
        """``cache_computed_blocks`` that records a BlockStored per run of newly findable blocks."""
        bs, events = self.block_size, self.pool.events
        run: BlockStored | None = None  # the event of the run that block i may extend
        for i in range(first, end):
            if not self.pool.set_hash(seq.block_table[i], seq.block_hashes[i]):
                run = None
                continue
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            if run is None or events[-1] is not run:
                if i == 0:
                    run = BlockStored([], None, [], bs, root=self._chain_root(seq),
                                      salt=seq.prefix_salt)
                else:
                    run = BlockStored([], seq.block_hashes[i - 1], [], bs)
                events.append(run)
            run.block_hashes.append(seq.block_hashes[i])
            run.token_ids.extend(tokens)

    def take_events(self) -> list[KVEvent]:
        """KV events recorded since the last call, oldest first ([] when disabled)."""
        return self.pool.take_events()

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share all of ``parent``'s blocks (copy-on-write for the partial tail)."""
        self.pool.acquire(parent.block_table)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks, tail first, so the tail is evicted before the shared head."""
        self.pool.release(list(reversed(seq.block_table)))
        seq.block_table = []
        seq.num_computed_tokens = 0
        # Hashes past the prompt depend on sampled tokens that will be replayed identically,
        # so they stay valid; keep them to avoid rehashing on resume.

    @property
    def usage(self) -> float:
        return self.pool.usage
