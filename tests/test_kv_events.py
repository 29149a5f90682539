"""KV events: replaying an engine's batches reproduces its prefix-cache hash map exactly."""

import random

from engine.block_pool import chain_hash, root_hash
from engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from engine.sampling_params import SamplingParams


class Replay:
    """A consumer of KV event batches, checking what a cluster index would rely on."""

    def __init__(self, model_root: bytes):
        self.model_root = model_root
        self.hashes: set[bytes] = set()
        self.next_seq = 0
        self.stored = self.removed = 0

    def apply(self, batch: KVEventBatch | None) -> None:
        if batch is None:
            return
        assert isinstance(batch, KVEventBatch) and batch.events
        assert batch.seq == self.next_seq, "sequence numbers must grow by one per batch"
        self.next_seq += 1
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self._check_chain(ev)
                for h in ev.block_hashes:
                    assert h not in self.hashes, "stored a hash the cache already held"
                    self.hashes.add(h)
                self.stored += len(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    assert h in self.hashes, "removed a hash that was never stored"
                    self.hashes.discard(h)
                self.removed += len(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                self.hashes.clear()
            else:
                raise AssertionError(f"unknown event {ev!r}")

    def _check_chain(self, ev: BlockStored) -> None:
        """Recompute every hash from the tokens, starting at the parent or the documented root."""
        bs = ev.block_size
        assert ev.block_hashes and len(ev.token_ids) == bs * len(ev.block_hashes)
        if ev.parent_block_hash is None:
            want_root = root_hash(self.model_root + ev.salt) if ev.salt else self.model_root
            assert ev.root == want_root
            prev = ev.root
        else:
            assert ev.root is None
            prev = ev.parent_block_hash
        for k, h in enumerate(ev.block_hashes):
            prev = chain_hash(prev, ev.token_ids[k * bs:(k + 1) * bs])
            assert h == prev


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_replayed_events_equal_the_cache_hash_map(make_llm):
    # 24 blocks of 16 tokens for ~14 requests of 50-100 tokens: blocks are evicted and reused,
    # requests preempted; shared system prompts make prefix hits; some requests are aborted.
    llm = make_llm("llama", num_kv_blocks=24, max_model_len=256, max_num_batched_tokens=48,
                   enable_kv_events=True)
    eng = llm.engine
    rng = random.Random(7)
    vocab = min(eng.vocab_size, 500)
    systems = [[rng.randrange(3, vocab) for _ in range(40)] for _ in range(3)]
    replay = Replay(root_hash(f"{eng.config.model}|{eng.runner.dtype}"))
    assert replay.model_root == eng.kv.model_root
    assert eng.take_kv_events() is None  # nothing happened yet
    pending = []
    for i in range(14):
        prompt = systems[i % 3] + [rng.randrange(3, vocab) for _ in range(rng.randint(5, 30))]
        salt = b"tenant-b" if i % 5 == 4 else b""
        pending.append((f"r{i}", prompt, salt, rng.randint(10, 40)))
    abort_after = {"r3": 4, "r8": 3}  # request -> steps after its arrival when it is aborted
    added_at: dict[str, int] = {}
    steps = aborted = 0
    while pending or eng.has_unfinished_requests():
        # Waves of three keep some prefixes cached between requests and the pool under pressure.
        if pending and len(eng.requests) < 6:
            for rid, prompt, salt, n in pending[:3]:
                eng.add_request(rid, prompt_token_ids=prompt, params=greedy(n), prefix_salt=salt)
                added_at[rid] = steps
            del pending[:3]
        eng.step()
        steps += 1
        for rid, k in abort_after.items():
            if added_at.get(rid, -1) + k == steps and rid in eng.requests:
                eng.abort(rid)
                aborted += 1
        replay.apply(eng.take_kv_events())
        assert replay.hashes == eng.kv.pool.cached_hashes()
    assert aborted == 2
    assert eng.scheduler.num_preemptions > 0
    assert eng.kv.stats.hits > 0, "the workload should hit the prefix cache"
    assert replay.removed > 0, "the workload should evict cached blocks"
    assert replay.stored > 24
    assert eng.take_kv_events() is None  # drained: nothing new since the last step
    assert replay.hashes == eng.kv.pool.cached_hashes() and replay.hashes


def test_consecutive_blocks_of_a_prompt_are_one_event(make_llm):
    llm = make_llm("llama", enable_kv_events=True)
    eng = llm.engine
    prompt = list(range(10, 10 + 16 * 3 + 5))  # three full blocks and a partial one
    eng.add_request("a", prompt_token_ids=prompt, params=greedy(1))
    eng.step()
    batch = eng.take_kv_events()
    assert batch is not None and batch.seq == 0
    (ev,) = batch.events
    assert isinstance(ev, BlockStored)
    assert ev.parent_block_hash is None and ev.salt == b"" and ev.block_size == 16
    assert ev.token_ids == prompt[:48] and len(ev.block_hashes) == 3
    # A second request extending the same prompt stores only its new block, chained to the third.
    eng.add_request("b", prompt_token_ids=prompt[:48] + list(range(900, 920)), params=greedy(1))
    while eng.has_unfinished_requests():
        eng.step()
    batch = eng.take_kv_events()
    assert batch.seq == 1
    (ev2,) = batch.events
    assert ev2.parent_block_hash == ev.block_hashes[-1] and ev2.root is None
    assert ev2.token_ids == list(range(900, 916))
    assert ev2.block_hashes == [chain_hash(ev.block_hashes[-1], ev2.token_ids)]


def test_disabled_events_are_never_recorded(make_llm):
    llm = make_llm("llama", num_kv_blocks=24, max_model_len=256)
    eng = llm.engine
    assert eng.kv.pool.events is None
    prompts = [[5 + i] * 40 + list(range(100, 140)) for i in range(8)]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), prompt_token_ids=p, params=greedy(20))
    while eng.has_unfinished_requests():
        eng.step()
        assert eng.take_kv_events() is None
    assert eng.kv.pool.cached_hashes(), "prefix caching itself still works"
    assert eng.kv.pool.events is None
