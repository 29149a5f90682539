"""Joining the cluster: register with the manager, heartbeat load, re-register, deregister."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable

import httpx
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from clusterkit.registry import HeartbeatBody, ModelInfo, RegisterBody

log = logging.getLogger("worker.registration")

MAX_BACKOFF_S = 60.0


def registered_models(served: Iterable) -> list[dict]:
    """The registry entries of served models (:class:`worker.vllm_manager.ServedModel`): one per
    name each answers to, so the router routes every alias; an alias names its model's first name
    (``alias_of``). Model sources (local paths) stay on the worker. A generation model's entries
    carry what KV-aware routing needs: its engine's block size and hash root, and the digest of
    its ``/tokenizer_info``."""
    return [{"name": n, "kind": m.kind, "max_model_len": m.max_model_len,
             **({"alias_of": m.name} if n != m.name else {}), **_kv_fields(m)}
            for m in served for n in m.names]


def _kv_fields(m) -> dict:
    if m.kind != "generate":
        return {}
    fields = {"kv_block_size": m.kv_block_size, "kv_root": m.kv_root, "tokenizer_digest": m.tokenizer_digest}
    return {k: v for k, v in fields.items() if v is not None}


class Registrar:
    """Talks to the manager's registry endpoints (SPEC §3) on behalf of one worker.

    Registers once every model is ready, heartbeats from an apscheduler job every ``interval``
    seconds with per-model load, registers again when the manager answers 404 (it lost us, e.g.
    after a Redis restart), and deregisters on shutdown.

    A heartbeat that fails is retried at once on a fresh connection (a busy manager may close an
    idle keep-alive connection just as we reuse it), and later ones keep the normal cadence while
    the manager's TTL has not run out, so one slow answer never costs the worker its place. Only
    a manager that stays unreachable past the TTL gets exponential backoff, up to half the TTL
    (the worker keeps serving meanwhile).
    """

    def __init__(self, manager_url: str, public_url: str, models: list[dict],
                 load: Callable[[], dict[str, dict]], interval: float = 5.0,
                 worker_token: str | None = None, worker_id: str | None = None,
                 timeout: float = 5.0):
        self.manager_url = manager_url.rstrip("/")
        self.public_url = public_url
        self.models = [ModelInfo.model_validate(m) for m in models]
        self._load = load
        self.interval = interval
        self.worker_id = worker_id or uuid.uuid4().hex[:16]
        headers = {"Authorization": f"Bearer {worker_token}"} if worker_token else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout)
        self._scheduler = AsyncIOScheduler()
        self.registered = False
        self.ttl = 3 * interval  # until the manager tells us its own
        self.failures = 0
        self._next_try = 0.0
        self._last_ok = 0.0
        self.heartbeats_sent = 0

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._tick()
        self._scheduler.add_job(self._tick, "interval", seconds=self.interval, max_instances=1,
                                coalesce=True, misfire_grace_time=None, id="heartbeat")
        self._scheduler.start()

    async def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self.registered:
            try:
                r = await self._client.delete(f"{self.manager_url}/workers/{self.worker_id}")
                log.info("deregistered from %s (%s)", self.manager_url, r.status_code)
            except httpx.HTTPError as e:
                log.warning("could not deregister from %s: %s", self.manager_url, type(e).__name__)
            self.registered = False
        await self._client.aclose()

    # -- protocol --------------------------------------------------------------------------------
    def load(self) -> dict[str, dict]:
        """Per-name load: an alias reports its model's load, so routing by any name sees it."""
        load = self._load()
        for m in self.models:
            if m.alias_of is not None and m.alias_of in load:
                load[m.name] = load[m.alias_of]
        return load

    def registration_body(self) -> RegisterBody:
        return RegisterBody(id=self.worker_id, url=self.public_url, models=self.models, load=self.load())

    async def _post(self, path: str, body) -> httpx.Response:
        """POST once more on a fresh connection if the first attempt broke in transport: both
        registry writes are idempotent."""
        content = body.model_dump_json().encode()
        headers = {"content-type": "application/json"}
        try:
            return await self._client.post(self.manager_url + path, content=content, headers=headers)
        except httpx.TransportError as e:
            log.debug("%s to the manager failed (%s); retrying once", path, type(e).__name__)
            return await self._client.post(self.manager_url + path, content=content, headers=headers)

    async def register(self) -> None:
        r = await self._post("/workers", self.registration_body())
        r.raise_for_status()
        self.registered = True
        self.ttl = float(r.json().get("heartbeat_ttl") or self.ttl)
        log.info("registered with %s as %s (%s)", self.manager_url, self.worker_id, self.public_url)

    async def heartbeat(self) -> None:
        r = await self._post(f"/workers/{self.worker_id}/heartbeat", HeartbeatBody(load=self.load()))
        if r.status_code == 404:  # the manager forgot us: join again
            log.info("manager does not know %s any more; registering again", self.worker_id)
            self.registered = False
            await self.register()
            return
        r.raise_for_status()
        self.heartbeats_sent += 1

    async def _tick(self) -> None:
        now = time.monotonic()
        if now < self._next_try:
            return
        try:
            if self.registered:
                await self.heartbeat()
            else:
                await self.register()
            if self.failures:
                log.info("manager reachable again after %d failed attempts", self.failures)
            self.failures = 0
            self._next_try = 0.0
            self._last_ok = time.monotonic()
        except (httpx.HTTPError, OSError) as e:
            self.failures += 1
            status = getattr(getattr(e, "response", None), "status_code", None)
            if self.registered and time.monotonic() - self._last_ok < self.ttl:
                # Still within the TTL: keep beating at the normal cadence.
                log.warning("heartbeat to %s failed (%s%s); retrying in %.0fs", self.manager_url,
                            type(e).__name__, f" {status}" if status else "", self.interval)
                return
            # Never longer than half the TTL: a manager back from an outage gives the workers it
            # knew one TTL to heartbeat before it evicts them (clusterkit.registry.Registry.renew).
            delay = min(MAX_BACKOFF_S, self.ttl / 2, self.interval * 2 ** (self.failures - 1))
            self._next_try = now + delay
            log.warning("manager %s unreachable (%s%s); retrying in %.0fs, still serving",
                        self.manager_url, type(e).__name__, f" {status}" if status else "", delay)
