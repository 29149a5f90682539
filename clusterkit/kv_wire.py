"""KV-aware routing's shared contract: how block hashes are computed, what a worker sends the
manager about its engines' prefix caches, and how that lives in Redis for every router replica.

Block hashes (the engine's, ``engine/block_pool.py``; a test keeps the two equal, since the engine
may not import this kit):

- ``chain_hash(parent, tokens) = blake2b(parent, digest_size=16)`` over the block's token ids as
  decimal ASCII joined by ``b","``; ``root_hash(salt) = blake2b(b"kv-root:" + salt, 16)``.
- Each engine has a model root (``root_hash(f"{model path}|{dtype}")``, advertised by the worker
  in its registry entry as ``kv_root``, hex); a request with a prefix salt (vLLM's ``cache_salt``:
  ``sha256(cache_salt)``) starts its chain at ``root_hash(model_root + salt)``.

Flow: engine ``KVEventBatch`` -> worker (``POST /workers/{id}/kv-events`` to the manager, worker
token) -> :class:`KVStore` writes (one Lua step per batch) -> every router replica reads the
stream (and, on start or after a gap, the per-engine sets) into its own index.

Redis layout (prefix ``llmc:kv:``); ``{e}`` is an engine key, :func:`engine_key` of (worker, model):
  stream          stream of changes, capped (MAXLEN ~ :data:`STREAM_MAXLEN`); fields:
                    k: "ops" | "snapshot" | "gone", w: worker id, m: model, e: epoch,
                    f, s: first and last batch seq of the entry, t: when the worker took them
                    (unix seconds), d: the ops as JSON (``[["+", [hex...]], ["-", [hex...]],
                    ["*"]]``: stored, removed, all cleared; in order)
  blocks:{e}      set of the hex hashes the engine's prefix cache can hit now
  meta:{e}        hash: w, m, epoch, seq (the last batch applied)
A worker's ``epoch`` is new every time its engines start; a batch whose ``f`` is not the stored
seq + 1, or whose epoch differs, is refused (409) and the worker sends a snapshot instead
(the whole set at a seq), so a gap can never leave a wrong set. Readers apply an ``ops`` entry
only when its ``f`` follows the seq they hold, and otherwise read the set again.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Annotated, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

KV_PREFIX = "llmc:kv:"
STREAM = KV_PREFIX + "stream"
STREAM_MAXLEN = 100_000
HASH_HEX_LEN = 32  # 16-byte digests


# -- hashes (equal to engine/block_pool.py's) -------------------------------------------------------
def chain_hash(parent: bytes, token_ids) -> bytes:
    """Hash of a full block given its parent's hash."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


def root_hash(salt: str | bytes) -> bytes:
    """Chain seed of a model (salt ``f"{model}|{dtype}"``) or of a salted prefix."""
    data = salt.encode() if isinstance(salt, str) else salt
    return hashlib.blake2b(b"kv-root:" + data, digest_size=16).digest()


def cache_salt_bytes(cache_salt: str | None) -> bytes:
    """The engine prefix salt of a request's ``cache_salt`` (the worker's rule)."""
    return hashlib.sha256(cache_salt.encode()).digest() if cache_salt else b""


def block_hashes(token_ids, block_size: int, model_root: bytes, salt: bytes = b"",
                 limit: int | None = None) -> list[bytes]:
    """Hashes of the full blocks of ``token_ids`` (at most ``limit``), as the engine chains them."""
    parent = root_hash(model_root + salt) if salt else model_root
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, limit)
    out = []
    for i in range(n):
        parent = chain_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


# -- wire (worker -> manager) -----------------------------------------------------------------------
HexHash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


class KVEventsBody(BaseModel):
    """``POST /workers/{id}/kv-events``: one model's batches ``first_seq..last_seq`` as ops in
    order (``last_seq == first_seq - 1`` and no ops: a probe that only checks the store still
    follows on), or (``snapshot`` set) every hash its cache holds after batch ``last_seq`` (-1: none yet),
    which replaces whatever the store held for that engine."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    epoch: str = Field(min_length=1, max_length=64)
    first_seq: int = Field(ge=0)
    last_seq: int = Field(ge=-1)
    time: float
    ops: list[tuple[Literal["+", "-"], list[HexHash]] | tuple[Literal["*"]]] = Field(default_factory=list)
    snapshot: list[HexHash] | None = None


def engine_key(wid: str, model: str) -> str:
    """Unambiguous (worker, model) key part: the id's length first, since both may hold ':'."""
    return f"{len(wid)}:{wid}:{model}"


def blocks_key(wid: str, model: str) -> str:
    return f"{KV_PREFIX}blocks:{engine_key(wid, model)}"


def meta_key(wid: str, model: str) -> str:
    return f"{KV_PREFIX}meta:{engine_key(wid, model)}"


# KEYS: blocks, meta, stream, worker hash; ARGV: wid, model, epoch, first, last, time, ops JSON, maxlen
_APPLY = """
if redis.call('EXISTS', KEYS[4]) == 0 then return -2 end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '-2')
if epoch ~= ARGV[3] or tonumber(ARGV[4]) ~= seq + 1 then return -1 end
for _, op in ipairs(cjson.decode(ARGV[7])) do
  local kind, hashes = op[1], op[2]
  if kind == '*' then
    redis.call('DEL', KEYS[1])
  else
    for i = 1, #hashes, 4000 do
      local j = math.min(i + 3999, #hashes)
      if kind == '+' then redis.call('SADD', KEYS[1], unpack(hashes, i, j))
      else redis.call('SREM', KEYS[1], unpack(hashes, i, j)) end
    end
  end
end
if tonumber(ARGV[5]) < tonumber(ARGV[4]) then return 1 end  -- an idle worker's probe: nothing to add
redis.call('HSET', KEYS[2], 'seq', ARGV[5])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'k', 'ops', 'w', ARGV[1], 'm', ARGV[2],
           'e', ARGV[3], 'f', ARGV[4], 's', ARGV[5], 't', ARGV[6], 'd', ARGV[7])
return 1
"""


# KEYS: blocks, meta, stream, worker hash; ARGV: wid, model, epoch, seq, time, maxlen, hashes...
# One step, so a worker dropped concurrently never gets its keys back.
_SNAPSHOT = """
if redis.call('EXISTS', KEYS[4]) == 0 then return -2 end
redis.call('DEL', KEYS[1], KEYS[2])
for i = 7, #ARGV, 4000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
end
redis.call('HSET', KEYS[2], 'w', ARGV[1], 'm', ARGV[2], 'epoch', ARGV[3], 'seq', ARGV[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'k', 'snapshot', 'w', ARGV[1], 'm', ARGV[2],
           'e', ARGV[3], 'f', ARGV[4], 's', ARGV[4], 't', ARGV[5], 'd', '')
return 1
"""


class KVStore:
    """The manager's writes and every router's reads of the Redis layout above (a
    ``decode_responses=True`` client)."""

    APPLIED, RESYNC, UNKNOWN_WORKER = 1, -1, -2

    def __init__(self, client: aioredis.Redis, worker_key_of, maxlen: int = STREAM_MAXLEN):
        """``worker_key_of(wid)``: the registry's key of a worker's record (batches for a worker
        the registry does not hold are refused)."""
        self.r = client
        self.maxlen = maxlen
        self._worker_key = worker_key_of
        self._apply = client.register_script(_APPLY)
        self._snapshot_script = client.register_script(_SNAPSHOT)

    async def apply(self, wid: str, body: KVEventsBody) -> int:
        """Store one body: :data:`APPLIED`, :data:`RESYNC` (the worker must send a snapshot) or
        :data:`UNKNOWN_WORKER`."""
        if body.snapshot is not None:
            return await self._snapshot(wid, body)
        ops = json.dumps([list(op) for op in body.ops], separators=(",", ":"))
        return int(await self._apply(
            keys=[blocks_key(wid, body.model), meta_key(wid, body.model), STREAM, self._worker_key(wid)],
            args=[wid, body.model, body.epoch, body.first_seq, body.last_seq, repr(body.time), ops, self.maxlen]))

    async def _snapshot(self, wid: str, body: KVEventsBody) -> int:
        return int(await self._snapshot_script(
            keys=[blocks_key(wid, body.model), meta_key(wid, body.model), STREAM, self._worker_key(wid)],
            args=[wid, body.model, body.epoch, body.last_seq, repr(body.time), self.maxlen, *(body.snapshot or [])]))

    async def drop_worker(self, wid: str) -> None:
        """Forget every engine of a worker that left (deregistered or evicted) and tell readers."""
        keys = [k async for k in self.r.scan_iter(match=f"{KV_PREFIX}meta:{len(wid)}:{wid}:*", count=200)]
        pipe = self.r.pipeline(transaction=True)
        for mkey in keys:
            pipe.delete(mkey, KV_PREFIX + "blocks:" + mkey[len(KV_PREFIX + "meta:"):])
        pipe.xadd(STREAM, {"k": "gone", "w": wid, "m": "", "e": "", "f": -1, "s": -1, "t": repr(time.time()),
                           "d": ""}, maxlen=self.maxlen, approximate=True)
        await pipe.execute()

    async def engines(self) -> list[tuple[str, str]]:
        """(worker, model) of every engine the store holds."""
        out = []
        async for mkey in self.r.scan_iter(match=f"{KV_PREFIX}meta:*", count=200):
            h = await self.r.hmget(mkey, "w", "m")
            if h[0] is not None and h[1] is not None:
                out.append((h[0], h[1]))
        return out

    async def read_engine(self, wid: str, model: str) -> tuple[str | None, int, set[str]]:
        """(epoch, seq, hex hashes) of one engine, read in one transaction; (None, -2, empty)
        when the store holds nothing for it."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hmget(meta_key(wid, model), "epoch", "seq")
        pipe.smembers(blocks_key(wid, model))
        (epoch, seq), members = await pipe.execute()
        if epoch is None:
            return None, -2, set()
        return epoch, int(seq), set(members)

    async def last_id(self) -> str:
        """The newest stream entry's id ("0-0" when empty): read after it to see what comes next."""
        last = await self.r.xrevrange(STREAM, count=1)
        return last[0][0] if last else "0-0"
