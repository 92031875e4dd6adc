"""Continuous batching: admission, token budget, preemption by recompute, eviction (pure Python)."""

import pytest

from valve.engine.kvcache import OutOfBlocks
from valve.engine.scheduler import FINISHED, RUNNING, WAITING, Scheduler, Sequence


class FakeCache:
    """Block accounting only (what the scheduler sees of a PagedKVCache)."""

    def __init__(self, num_blocks, block_size=4):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.tables = {}

    def used(self):
        return sum(self.tables.values())

    def ensure(self, seq_id, n_tokens):
        need = -(-n_tokens // self.block_size) - self.tables.get(seq_id, 0)
        if need > self.num_blocks - self.used():
            raise OutOfBlocks("full")
        if need > 0:
            self.tables[seq_id] = self.tables.get(seq_id, 0) + need

    def free(self, seq_id):
        self.tables.pop(seq_id, None)

    def drop(self, seq_id):
        self.tables.pop(seq_id, None)


def run(sched, max_steps=10_000):
    """Drive the scheduler like the engine does (every sampled token is 7); return each step's plan."""
    steps = []
    for _ in range(max_steps):
        if not sched.has_work():
            return steps
        plan = sched.schedule()
        assert plan, "work pending but nothing scheduled"
        assert sum(p.n_tokens for p in plan) <= sched.max_batch_tokens
        assert len(sched.running) <= sched.max_seqs
        steps.append([(p.seq.req_id, p.n_tokens) for p in plan])
        sched.commit(plan, {p.seq.req_id: 7 for p in plan if p.samples})
    raise AssertionError("did not finish")


def test_admits_in_order_and_finishes_everything():
    cache = FakeCache(100)
    s = Scheduler(cache, max_batch_tokens=16, max_seqs=2)
    seqs = [Sequence(i, [1] * n, max_tokens=m) for i, (n, m) in enumerate([(10, 3), (5, 2), (3, 4)])]
    for q in seqs:
        s.add(q)
    steps = run(s)
    # step 1: seq 0 prefill (10) + seq 1 prefill (5) within 16 tokens; max_seqs keeps seq 2 waiting
    assert steps[0] == [(0, 10), (1, 5)]
    assert steps[1] == [(0, 1), (1, 1)]
    assert all(2 not in dict(st) for st in steps[:2])
    assert all(q.state == FINISHED and q.output == [7] * q.max_tokens for q in seqs)
    assert cache.used() == 0


def test_chunked_prefill_respects_budget():
    s = Scheduler(FakeCache(100), max_batch_tokens=8, max_seqs=4)
    q = Sequence("a", list(range(20)), max_tokens=2)
    s.add(q)
    steps = run(s)
    assert steps[:3] == [[("a", 8)], [("a", 8)], [("a", 4)]]  # the third chunk samples the first token
    assert q.output == [7, 7] and len(steps) == 4


def test_preemption_recomputes_without_losing_tokens():
    cache = FakeCache(6, block_size=4)  # 24 tokens of cache
    s = Scheduler(cache, max_batch_tokens=64, max_seqs=8)
    a, b = Sequence("a", [1] * 8, max_tokens=8), Sequence("b", [1] * 8, max_tokens=8)
    s.add(a)
    s.add(b)
    run(s)
    assert s.preemptions > 0 and b.preemptions > 0 and a.preemptions == 0  # the youngest gives way
    assert a.output == b.output == [7] * 8
    assert b.recomputed > 0 and cache.used() == 0


def test_eviction_requeues_at_the_front():
    cache = FakeCache(100)
    s = Scheduler(cache, max_batch_tokens=64, max_seqs=8)
    a, b, c = (Sequence(x, [1] * 5, max_tokens=3) for x in "abc")
    for q in (a, b, c):
        s.add(q)
    s.commit(s.schedule(), {})  # prefill of all three, no sampling recorded
    assert [q.state for q in (a, b, c)] == [RUNNING] * 3
    hit = s.evict(["c", "a"])
    assert {q.req_id for q in hit} == {"a", "c"}
    assert list(s.waiting) == [a, c] and a.computed == 0 and a.recomputed == 5
    assert a.state == WAITING and "a" not in cache.tables and "b" in cache.tables
    run(s)
    assert all(q.state == FINISHED for q in (a, b, c))


def test_rejects_impossible_requests():
    s = Scheduler(FakeCache(4), max_batch_tokens=8, capacity_tokens=16)
    with pytest.raises(ValueError):
        s.add(Sequence("x", [], max_tokens=1))
    with pytest.raises(ValueError):
        s.add(Sequence("x", [1], max_tokens=0))
    with pytest.raises(ValueError):
        s.add(Sequence("x", [1] * 10, max_tokens=10))
