"""``kv_aware``: route a request to the worker whose KV cache holds the longest prefix of its
prompt, unless that worker is too busy.

For each request the router computes the prompt's token ids as the worker will (the model's
chat template and tokenizer, :mod:`router.prompt_tokens`), then the engine's chained block
hashes (:func:`clusterkit.kv_wire.block_hashes`), and asks the cluster-wide index
(:mod:`router.kv_index`) how many leading blocks each candidate holds. The choice:

    load(w)   = in-flight (all replicas) + waiting + 2 * KV usage     (policies.load_score)
    eligible  = workers with load(w) <= min(load) + kv_load_slack
    score(w)  = kv_hit_weight * cached_tokens(w) / prompt_tokens - load(w)
    pick      = the eligible worker with the highest score

so a request follows its cached prefix while that worker is within the slack of the least
loaded one, and a hot prefix spreads once its worker is busy (its next requests build the prefix
elsewhere, and from then on both workers hold it). Ties (an idle cluster, no hits) are broken by
rendezvous hashing on the request's longest block hash, not at random, so every router replica,
holding the same index and loads, sends the same request to the same worker.

Requests the router cannot tokenize as the worker would (the tokenizer not fetched yet, a
request's own chat template, images) are routed by load alone.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from clusterkit.kv_wire import block_hashes, cache_salt_bytes
from clusterkit.registry import WorkerInfo

from .kv_index import KVIndex
from .prompt_tokens import PromptTokens


@dataclass
class KVRequest:
    """What kv_aware needs of one request; hashes are computed once per engine root and reused
    by retries."""

    path: str
    body: dict
    prompt_tokens: int = 0
    _hashes: dict[tuple, list[bytes] | None] = field(default_factory=dict)


@dataclass
class KVStats:
    """How this replica's kv_aware decisions went (exported as metrics)."""

    by_cache: int = 0  # the chosen worker held part of the prompt
    by_load: int = 0  # no worker held any of it (or it could not be tokenized)
    untokenized: int = 0  # could not be tokenized (tokenizer not fetched yet, own template, images)
    cached_tokens: int = 0  # tokens the chosen workers held, summed
    prompt_tokens: int = 0  # tokens of the requests that were tokenized, summed
    route_seconds: float = 0.0  # CPU time spent choosing (tokenizing, hashing, index lookups)
    routed: int = 0


class KVAwareChooser:
    """The kv_aware choice over a model's candidates (see the module docstring for the score)."""

    def __init__(self, index: KVIndex, tokens: PromptTokens, hit_weight: float = 8.0, load_slack: float = 4.0,
                 rng: random.Random | None = None):
        self.index, self.tokens = index, tokens
        self.rng = rng or random.Random()
        self.hit_weight, self.load_slack = hit_weight, load_slack
        self.stats = KVStats()

    def _hashes(self, model: str, w: WorkerInfo, entry: dict, req: KVRequest) -> list[bytes] | None:
        root, bs, digest = entry.get("kv_root"), entry.get("kv_block_size"), entry.get("tokenizer_digest")
        if not root or not bs or not digest:
            return None
        key = (digest, root, bs)
        if key not in req._hashes:
            ids = self.tokens.token_ids(model, digest, w.url, req.path, req.body)
            if ids is None:
                req._hashes[key] = None
            else:
                req.prompt_tokens = len(ids)
                salt = req.body.get("cache_salt")
                req._hashes[key] = block_hashes(ids, int(bs), bytes.fromhex(root),
                                                cache_salt_bytes(salt if isinstance(salt, str) else None))
        return req._hashes[key]

    def choose(self, model: str, candidates: list[WorkerInfo], load: Callable[[WorkerInfo], float],
               req: KVRequest) -> WorkerInfo:
        t0 = time.process_time()
        loads = {w.id: load(w) for w in candidates}
        floor = min(loads.values())
        eligible = [w for w in candidates if loads[w.id] <= floor + self.load_slack]
        cached: dict[str, int] = {}
        tie_key = b""
        tokenized = False
        for w in eligible:
            entry = next((m for m in w.models if m.get("name") == model), None) or {}
            hashes = self._hashes(model, w, entry, req)
            if hashes is None:
                cached[w.id] = 0
                continue
            tokenized = True
            if hashes:
                tie_key = hashes[-1]
            n = self.index.match(w.id, entry.get("alias_of") or model, hashes)
            cached[w.id] = n * int(entry["kv_block_size"])
        total = max(1, req.prompt_tokens)
        # Ties: rendezvous on the prompt's longest block (every replica agrees); a prompt without
        # a full block (or not tokenized) ties at random, as least_load does.
        salt = tie_key or self.rng.randbytes(8)

        def rank(w: WorkerInfo):
            score = self.hit_weight * min(1.0, cached[w.id] / total) - loads[w.id]
            return (score, hashlib.blake2b(salt + w.id.encode(), digest_size=8).digest())

        chosen = max(eligible, key=rank)
        s = self.stats
        s.routed += 1
        if not tokenized:
            s.untokenized += 1
        else:
            s.prompt_tokens += req.prompt_tokens
            s.cached_tokens += cached[chosen.id]
        if cached[chosen.id] > 0:
            s.by_cache += 1
        else:
            s.by_load += 1
        s.route_seconds += time.process_time() - t0
        return chosen
