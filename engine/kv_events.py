"""KV cache events: what enters and leaves an engine's prefix-cache hash map, batched per step.

A consumer (the worker publishing to a cluster-wide index) replays the batches in ``seq`` order:
starting from an empty set, ``BlockStored`` adds its hashes, ``BlockRemoved`` drops its hashes,
``AllBlocksCleared`` empties the set. The result is exactly the set of hashes the engine's cache
can hit at that moment. ``seq`` grows by one per batch, so a gap means lost events (resync).

Hashes (engine/block_pool.py, reproducible without the engine):

- ``chain_hash(parent, tokens) = blake2b(parent, digest_size=16)`` updated with the block's
  token ids as decimal ASCII joined by ``b","``.
- ``root_hash(salt) = blake2b(b"kv-root:" + salt, digest_size=16)``.
- The model root is ``root_hash(f"{model}|{dtype}")``; a request without a prefix salt starts its
  chain at the model root, one with a salt (image hashes, ``cache_salt``) at
  ``root_hash(model_root + salt)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlockStored:
    """Full blocks of one sequence that became findable in the prefix cache, in chain order.

    ``block_hashes[k]`` is ``chain_hash(previous, token_ids[k*block_size:(k+1)*block_size])``,
    where ``previous`` is ``block_hashes[k-1]`` and, for ``k == 0``, ``parent_block_hash``, or,
    when that is None (the first block of a chain), ``root``: the chain seed. ``salt`` is the
    request's prefix salt (b"" if none), so ``root`` is the model root when ``salt`` is empty and
    ``root_hash(model_root + salt)`` otherwise. ``root`` is None when ``parent_block_hash`` is set.
    """

    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    root: bytes | None = None
    salt: bytes = b""


@dataclass
class BlockRemoved:
    """Hashes that left the prefix cache (their blocks were handed out again)."""

    block_hashes: list[bytes]


@dataclass
class AllBlocksCleared:
    """The whole prefix cache was dropped; a consumer forgets every hash of this engine."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass
class KVEventBatch:
    """The events of one engine since the previous batch, in the order they happened.

    ``seq`` starts at 0 and grows by exactly one per batch handed out by that engine.
    """

    seq: int
    events: list[KVEvent] = field(default_factory=list)
