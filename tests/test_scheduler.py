"""Model-free scheduler tests: budgets, chunked prefill, preemption by recompute, resumption."""

from engine.kv_cache_manager import KVCacheManager
from engine.scheduler import Scheduler
from engine.sequence import SeqStatus, Sequence


def seq(n_tokens, sid):
    return Sequence(seq_id=sid, request=None, token_ids=[sid * 1000 + i for i in range(n_tokens)],
                    num_prompt_tokens=n_tokens)


def run_step(sched):
    out = sched.schedule()
    sched.update_after_step(out)
    # Pretend to sample one token for every sequence whose tokens are all computed now.
    for s in out.scheduled:
        if s.completes:
            s.seq.token_ids.append(7)
    return out


def test_decodes_first_then_chunked_prefill_within_budget():
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10)
    a = seq(6, 1)
    sched.add(a)
    out = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(1, 6)]
    b, c = seq(9, 2), seq(5, 3)
    sched.add(b)
    sched.add(c)
    out = run_step(sched)
    # a decodes (1 token) first; b gets the remaining 9 tokens; c waits for budget.
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(1, 1), (2, 9)]
    out = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(1, 1), (2, 1), (3, 5)]
    sched3 = Scheduler(KVCacheManager(64, 4, False), max_num_seqs=8, max_num_batched_tokens=4)
    d = seq(10, 4)
    sched3.add(d)
    chunks = [run_step(sched3).scheduled[0].num_new_tokens for _ in range(3)]
    assert chunks == [4, 4, 2]
    assert d.num_output_tokens == 1  # sampled only after the last chunk


def test_max_num_seqs_is_respected():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(seq(3, i + 1))
    out = run_step(sched)
    assert [s.seq.seq_id for s in out.scheduled] == [1, 2]
    assert sched.num_waiting == 1


def test_preempts_newest_and_resumes_at_front():
    # 4 blocks of 4 tokens. Two sequences of 7 tokens take 2 blocks each; growing past 8 tokens
    # needs a third block, so the newer one must give its blocks up.
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    old, new = seq(7, 1), seq(7, 2)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # both prefilled, each sampled 1 token: 8 tokens, 2 full blocks each
    assert old.block_table == [0, 1] and new.block_table == [2, 3]
    out = run_step(sched)  # decode the 8th token: fits in the existing blocks
    assert not out.preempted
    out = run_step(sched)  # the 9th token needs a new block: preempt the newest
    assert out.preempted == [new]
    assert new.status is SeqStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert list(sched.waiting) == [new]
    assert [s.seq.seq_id for s in out.scheduled] == [1]
    assert old.block_table == [0, 1, 2]  # reuses a block the preempted sequence gave back
    assert sched.num_preemptions == 1
    # Finish the old one: the preempted one resumes by recomputing prompt + generated tokens.
    tokens_before = list(new.token_ids)
    sched.finish(old)
    out = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(2, len(tokens_before))]
    assert new.token_ids[:len(tokens_before)] == tokens_before
    sched.finish(new)
    assert kv.pool.num_free_blocks == 4
    kv.pool.check_consistency()


def test_no_new_admissions_in_a_step_that_preempted():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = seq(4, 1), seq(3, 2)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 4 of 5 tokens computed (1 block), b: 3 of 4 (1 block)
    out = run_step(sched)  # a's 5th token takes the last free block; b's 4th fits its block
    assert not out.preempted and kv.pool.num_free_blocks == 0
    waiting = seq(2, 3)
    sched.add(waiting)
    out = run_step(sched)  # b's 5th token needs a block: preempt b, the newest
    assert out.preempted == [b]
    assert all(s.seq is not waiting for s in out.scheduled)
    assert list(sched.waiting) == [b, waiting]
