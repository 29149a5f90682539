"""Async front of the pooling engine: encoder forwards run in a worker thread, one at a time."""

from __future__ import annotations

import asyncio
import threading

from .pooling import PoolingEngine


class AsyncPoolingEngine:
    """Embeddings off the event loop; a lock serialises forwards (the model is not re-entrant)."""

    def __init__(self, engine: PoolingEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self.is_alive = True

    def _run(self, batch: list[list[int]]) -> list[list[float]]:
        with self._lock:
            return self.engine.embed_token_ids(batch)

    async def embed(self, batch: list[list[int]]) -> list[list[float]]:
        for ids in batch:
            self.engine.validate(ids)
        return await asyncio.to_thread(self._run, batch)

    def shutdown(self) -> None:
        self.is_alive = False
