"""Choosing a worker for a request."""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from clusterkit.registry import WorkerInfo

if TYPE_CHECKING:
    from .kv_policy import KVAwareChooser, KVRequest

POLICIES = ("least_load", "round_robin", "power_of_two", "prefix_affinity", "kv_aware")


def load_score(w: WorkerInfo, model: str, inflight: int) -> float:
    """Live load of a worker for a model: this cluster's in-flight requests plus the worker's own
    waiting queue and KV usage from its last heartbeat."""
    m = w.load.get(model, {}) if isinstance(w.load, dict) else {}
    return inflight + float(m.get("num_waiting", 0)) + 2.0 * float(m.get("kv_cache_usage", 0.0))


class PrefixIndex:
    """Bounded LRU map from prompt-prefix hashes to the worker that last served them.

    A prompt is cut at every ``chunk`` characters; the hash of each whole prefix (not of the chunk
    alone) is a key, so a hit means the entire prefix up to there was seen on that worker.
    """

    def __init__(self, capacity: int = 100_000, chunk: int = 64):
        self.capacity = capacity
        self.chunk = chunk
        self._map: OrderedDict[bytes, str] = OrderedDict()

    def _keys(self, model: str, text: str) -> list[bytes]:
        h = hashlib.blake2b(model.encode(), digest_size=16)
        keys = []
        for i in range(0, len(text), self.chunk):
            h.update(text[i:i + self.chunk].encode())
            keys.append(h.copy().digest())
        return keys

    def lookup(self, model: str, text: str) -> tuple[str | None, int]:
        """(worker of the longest known prefix, its length in chunks)."""
        keys = self._keys(model, text)
        for n in range(len(keys), 0, -1):
            wid = self._map.get(keys[n - 1])
            if wid is not None:
                return wid, n
        return None, 0

    def record(self, model: str, text: str, wid: str) -> None:
        for k in self._keys(model, text):
            self._map[k] = wid
            self._map.move_to_end(k)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def __len__(self) -> int:
        return len(self._map)


class Picker:
    """Applies the configured policy over the live candidates of a model."""

    def __init__(self, policy: str, inflight: Callable[[str], int], prefix_index: PrefixIndex | None = None,
                 affinity_slack: float = 4.0, rng: random.Random | None = None,
                 kv: KVAwareChooser | None = None):
        """``kv``: the kv_aware chooser (required by that policy; router/kv_policy.py)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        if policy == "kv_aware" and kv is None:
            raise ValueError("the kv_aware policy needs its chooser")
        self.kv = kv
        self.policy = policy
        self.inflight = inflight
        self.prefix = prefix_index or PrefixIndex()
        self.affinity_slack = affinity_slack  # load guard: how much busier the sticky worker may be
        self.rng = rng or random.Random()
        self._rr: dict[str, int] = {}

    def pick(self, model: str, candidates: list[WorkerInfo], prompt_text: str = "",
             kv_request: KVRequest | None = None) -> WorkerInfo:
        """``prompt_text``: what prefix_affinity keys on; ``kv_request``: what kv_aware reads."""
        assert candidates
        score = lambda w: load_score(w, model, self.inflight(w.id))
        if len(candidates) == 1:
            chosen = candidates[0]
        elif self.policy == "kv_aware" and kv_request is not None:
            chosen = self.kv.choose(model, candidates, score, kv_request)
        elif self.policy == "round_robin":
            i = self._rr.get(model, 0)
            self._rr[model] = i + 1
            chosen = sorted(candidates, key=lambda w: w.id)[i % len(candidates)]
        elif self.policy == "power_of_two":
            a, b = self.rng.sample(candidates, 2)
            chosen = a if score(a) <= score(b) else b
        elif self.policy == "prefix_affinity" and prompt_text:
            chosen = self._least(candidates, score)
            wid, depth = self.prefix.lookup(model, prompt_text)
            sticky = next((w for w in candidates if w.id == wid), None)
            if sticky is not None and score(sticky) <= score(chosen) + self.affinity_slack:
                chosen = sticky
        else:
            chosen = self._least(candidates, score)
        if self.policy == "prefix_affinity" and prompt_text:
            self.prefix.record(model, prompt_text, chosen.id)
        return chosen

    def _least(self, candidates, score) -> WorkerInfo:
        best = min(score(w) for w in candidates)
        return self.rng.choice([w for w in candidates if score(w) == best])
