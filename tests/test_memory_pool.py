"""KVPool on the simulated backend: growth, shrinking with compaction (data checked), eviction, limits."""

from __future__ import annotations

import random

import numpy as np
import pytest

from valve.runtime.memory.errors import PoolExhausted, ReclaimImpossible
from valve.runtime.memory.evict import FIFO, SELECTIVE
from valve.runtime.memory.pool import KVPool
from valve.runtime.memory.sim import SimBackend
from valve.runtime.sim import SimGPU, SimOutOfMemory

MiB = 1 << 20
BLOCK, CHUNK = 1 * MiB, 4 * MiB


def make_pool(max_mb=64, block=BLOCK, chunk=CHUNK, gpu=None, record=False, policy=SELECTIVE):
    be = SimBackend(gpu=gpu, record=record, granularity=MiB)
    return KVPool(be, block_bytes=block, chunk_bytes=chunk, max_bytes=max_mb * MiB, policy=policy), be


def stamp(arr, pool, b, value):
    arr[b * pool.block_bytes:(b + 1) * pool.block_bytes] = value


def value_of(seq, i):
    key = seq if isinstance(seq, int) else sum(map(ord, seq))
    return (key * 31 + i * 7) % 251 + 1  # never 0: released memory reads as 0


def fill(pool, be, seqs):
    arr = be.byte_array(pool.max_bytes)
    for s, n in seqs.items():
        for i, b in enumerate(pool.allocate(s, n)):
            stamp(arr, pool, b, value_of(s, i))
    return arr


def check_data(pool, arr):
    """Every live block holds its sequence's pattern, all bytes of it."""
    B = pool.block_bytes
    for s in pool.sequences():
        for i, b in enumerate(pool.block_table(s)):
            blk = arr[b * B:(b + 1) * B]
            assert blk.min() == blk.max() == value_of(s, i), f"seq {s} block {i} (id {b}) corrupted"


def test_grows_on_demand_and_maps_whole_chunks():
    pool, be = make_pool()
    assert pool.mapped_bytes == 0 and be.mapped_bytes() == 0
    pool.allocate("a", 3)
    assert pool.mapped_bytes == CHUNK
    pool.allocate("a", 2)
    assert pool.mapped_bytes == 2 * CHUNK == be.mapped_bytes()
    assert len(pool.block_table("a")) == 5 and len(set(pool.block_table("a"))) == 5
    pool.free("a")
    assert pool.used_blocks() == 0 and pool.mapped_bytes == 2 * CHUNK  # freeing keeps chunks mapped
    pool.check()


def test_allocate_is_all_or_nothing_with_a_clear_message():
    pool, _ = make_pool(max_mb=16)
    pool.allocate("a", 10)
    with pytest.raises(PoolExhausted, match=r"needs 7 blocks .* 2 free, 4 more by growing"):
        pool.allocate("b", 7)
    assert pool.block_table("b") == [] and pool.used_blocks() == 10
    pool.set_limit(8 * MiB)
    with pytest.raises(PoolExhausted):
        pool.allocate("b", 3)  # 12 blocks mapped, 10 used: two fit, no growth past the limit
    pool.allocate("b", 2)
    pool.check()


def test_limit_stops_growth():
    pool, _ = make_pool(max_mb=64)
    pool.set_limit(2 * CHUNK)
    pool.allocate("a", 8)
    with pytest.raises(PoolExhausted, match="limit of 8388608"):
        pool.allocate("b", 1)
    pool.set_limit(3 * CHUNK)
    pool.allocate("b", 1)
    assert pool.mapped_bytes == 3 * CHUNK


def test_blocks_that_straddle_chunks_are_never_handed_out():
    pool, _ = make_pool(block=3 * MiB, chunk=4 * MiB, max_mb=48)
    blocks = pool.allocate("a", pool.free_blocks())
    for b in blocks:
        lo, hi = b * 3 * MiB, (b + 1) * 3 * MiB - 1
        assert lo // CHUNK == hi // CHUNK
    pool.check()


def test_device_out_of_memory_is_reported_and_nothing_is_mapped():
    gpu = SimGPU(capacity_bytes=10 * MiB)
    pool, be = make_pool(gpu=gpu)
    pool.allocate("a", 8)  # two chunks
    with pytest.raises(PoolExhausted, match="growing failed: .*out of memory"):
        pool.allocate("b", 8)  # two more chunks do not fit in 2 MiB
    assert be.mapped_bytes() == 2 * CHUNK and gpu.mem_used == 2 * CHUNK
    pool.check()


@pytest.mark.parametrize("policy", [FIFO, SELECTIVE])
def test_reclaim_compacts_and_keeps_every_value(policy):
    rng = random.Random(3)
    pool, be = make_pool(max_mb=128, policy=policy)
    arr = fill(pool, be, {s: rng.randint(1, 6) for s in range(30)})
    for s in rng.sample(range(30), 15):
        pool.free(s)
    live_before = pool.used_blocks()
    mapped_before = pool.mapped_bytes
    live = pool._live[pool._mapped]
    k = int((live == 0).sum()) + 2  # more than the empty chunks: live blocks must move
    assert (len(live) - k) * 4 >= live_before
    res = pool.reclaim(k * CHUNK)
    assert res.released_bytes == k * CHUNK and res.chunks == k
    assert pool.mapped_bytes == mapped_before - k * CHUNK == be.mapped_bytes()
    assert res.evicted == [] and pool.used_blocks() == live_before
    assert res.copied_bytes == len(res.moved) * BLOCK > 0
    check_data(pool, arr)
    pool.check()
    # the released chunks read as zeros: nothing live was left there
    for off in range(0, pool.max_bytes, CHUNK):
        if not be.is_mapped(off, CHUNK):
            assert not arr[off:off + CHUNK].any()


def test_moved_maps_old_to_new_ids_and_tables_follow():
    pool, be = make_pool(max_mb=32)
    arr = fill(pool, be, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 4})  # chunks 0, 1, 2 full
    pool.free("a")
    pool.free("c")
    old_e, old_d = pool.block_table("e"), pool.block_table("d")
    res = pool.reclaim(CHUNK, policy=FIFO)  # FIFO releases the highest chunk: e's blocks move
    assert set(res.moved) == set(old_e) and res.evicted == []
    assert pool.block_table("e") == [res.moved[b] for b in old_e]
    check_data(pool, arr)
    pool, be = make_pool(max_mb=32)
    arr = fill(pool, be, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 4})
    pool.free("a")
    pool.free("c")
    res = pool.reclaim(CHUNK, policy=SELECTIVE)  # a chunk with the fewest live blocks: d's (2 blocks)
    assert set(res.moved) == set(old_d) and res.copied_bytes == 2 * BLOCK
    check_data(pool, arr)


def test_unmap_only_after_a_wait_on_a_fence_after_the_last_copy():
    pool, be = make_pool(record=True)
    fill(pool, be, {s: 2 for s in range(8)})
    for s in range(0, 8, 2):
        pool.free(s)
    be.log.clear()
    pool.reclaim(2 * CHUNK)
    ops = [op[0] for op in be.log]
    assert "copy" in ops and "unmap" in ops
    last_copy, first_unmap = max(i for i, o in enumerate(ops) if o == "copy"), ops.index("unmap")
    fence = next(i for i, o in enumerate(ops) if o == "fence" and i > last_copy)
    wait = ops.index("wait", fence)
    assert be.log[wait][1] == be.log[fence][1]
    assert last_copy < fence < wait < first_unmap


def test_reclaim_evicts_when_live_data_does_not_fit_and_reports_it():
    pool, be = make_pool(max_mb=16)
    arr = fill(pool, be, {"old": 6, "mid": 5, "new": 5})  # 16 blocks: 4 chunks full
    pool.set_progress("old", 90)
    pool.set_progress("mid", 5)
    pool.set_progress("new", 70)
    res = pool.reclaim(CHUNK)  # 4 blocks must go: selective evicts "mid" (least work per block)
    assert res.evicted == ["mid"] and res.evicted_tokens == 5
    assert sorted(pool.sequences()) == ["new", "old"]
    check_data(pool, arr)
    pool.check()


def test_fifo_evicts_the_oldest():
    pool, be = make_pool(max_mb=16, policy=FIFO)
    fill(pool, be, {"old": 6, "mid": 5, "new": 5})
    res = pool.reclaim(CHUNK)
    assert res.evicted == ["old"]


def test_impossible_request_gets_a_clear_answer_and_releases_nothing():
    pool, be = make_pool()
    fill(pool, be, {"a": 6})
    with pytest.raises(ReclaimImpossible, match=r"cannot release 100000000 bytes: the pool holds 8388608"):
        pool.reclaim(100_000_000)
    assert pool.mapped_bytes == 2 * CHUNK and pool.sequences() == ["a"]
    res = pool.reclaim(100_000_000, allow_partial=True)
    assert res.released_bytes == 2 * CHUNK and res.shortfall_bytes == 100_000_000 - 2 * CHUNK
    assert res.evicted == ["a"] and pool.mapped_bytes == 0
    pool.check()


def test_freed_bytes_can_be_allocated_by_another_context():
    gpu = SimGPU(capacity_bytes=64 * MiB)
    pool, be = make_pool(gpu=gpu)
    fill(pool, be, {s: 4 for s in range(14)})  # 56 MiB mapped
    online = gpu.context("online")
    with pytest.raises(SimOutOfMemory):
        online.malloc(20 * MiB)
    res = pool.reclaim(20 * MiB)
    assert res.released_bytes == 20 * MiB
    online.malloc(20 * MiB)
    assert gpu.mem_free == 8 * MiB and len(res.evicted) == 5


def test_regrow_after_reclaim_needs_the_limit_raised():
    pool, be = make_pool()
    fill(pool, be, {"a": 4, "b": 4})
    pool.reclaim(CHUNK)
    assert pool.limit_bytes == pool.mapped_bytes == CHUNK  # the request lowered it
    with pytest.raises(PoolExhausted):
        pool.allocate("b", 1)
    pool.set_limit(pool.max_bytes)
    pool.allocate("b", 1)
    pool.check()


def test_random_workload_keeps_bookkeeping_and_data():
    rng = random.Random(11)
    pool, be = make_pool(max_mb=96)
    arr = be.byte_array(pool.max_bytes)
    counts: dict[int, int] = {}
    for step in range(300):
        r = rng.random()
        if r < 0.55:
            s = rng.randrange(40)
            n = rng.randint(1, 3)
            try:
                new = pool.allocate(s, n)
            except PoolExhausted:
                continue
            start = counts.get(s, 0)
            for i, b in enumerate(new):
                stamp(arr, pool, b, value_of(s, start + i))
            counts[s] = start + n
        elif r < 0.8:
            s = rng.randrange(40)
            pool.free(s)
            counts.pop(s, None)
        else:
            want = rng.randint(1, max(1, pool.mapped_bytes // MiB)) * MiB if pool.mapped_bytes else MiB
            res = pool.reclaim(want, allow_partial=True)
            for s in res.evicted:
                counts.pop(s)
            pool.set_limit(pool.max_bytes)
        pool.check()
        assert set(pool.sequences()) == set(counts)
        if step % 25 == 0:
            check_data(pool, arr)
    check_data(pool, arr)


def test_torch_view_sees_the_same_bytes():
    torch = pytest.importorskip("torch")
    pool, be = make_pool()
    view = pool.tensor(torch.float16, (2, 256, 1024))  # 1 MiB blocks
    assert view.shape == (pool.max_blocks, 2, 256, 1024)
    [b0, b1] = pool.allocate("a", 2)
    view[b0].fill_(1.5)
    view[b1].fill_(-2.0)
    pool.allocate("b", 4)
    pool.free("b")
    res = pool.reclaim(CHUNK, policy=FIFO)
    for old, want in ((b0, 1.5), (b1, -2.0)):
        new = res.moved.get(old, old)
        assert torch.all(view[new] == want)
    with pytest.raises(ValueError, match="the pool's blocks are 1048576"):
        pool.tensor(torch.float32, (2, 256, 1024))


def test_bad_settings_are_rejected():
    be = SimBackend(granularity=2 * MiB)
    with pytest.raises(ValueError, match="multiple of the sim backend's allocation granularity 2097152"):
        KVPool(be, block_bytes=MiB, chunk_bytes=3 * MiB, max_bytes=64 * MiB)
    with pytest.raises(ValueError, match="larger than chunk_bytes"):
        KVPool(SimBackend(), block_bytes=8 * MiB, chunk_bytes=4 * MiB, max_bytes=64 * MiB)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        KVPool(SimBackend(), block_bytes=MiB, chunk_bytes=4 * MiB, max_bytes=64 * MiB, policy="lru")


def test_close_releases_device_memory():
    gpu = SimGPU(capacity_bytes=64 * MiB)
    pool, be = make_pool(gpu=gpu)
    pool.allocate("a", 9)
    assert gpu.mem_used == 3 * CHUNK
    pool.close()
    assert gpu.mem_used == 0
    assert np.all(pool._mapped == 0)


def test_cuda_backend_without_a_device_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from valve.runtime.memory.cuda import CudaBackend

    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CudaBackend()


def test_match_runs_keeps_runs_together_and_uses_each_free_block_once():
    from valve.runtime.memory.pool import match_runs

    src = np.array([10, 11, 12, 13, 20, 30, 31])
    free = np.array([0, 1, 2, 3, 4, 5, 7, 40, 41])
    s, d = match_runs(src, free)
    assert sorted(s.tolist()) == src.tolist()  # every source block once
    assert len(set(d.tolist())) == len(d) and set(d.tolist()) <= set(free.tolist())
    runs = 1 + int(np.sum((np.diff(s) != 1) | (np.diff(d) != 1)))
    assert runs == 3  # 4-run into the 6-run, 2-run into its rest or 40-41, single block anywhere


def test_compaction_copies_whole_runs_and_keeps_data():
    pool, be = make_pool(max_mb=32, block=MiB, chunk=8 * MiB)  # 4 chunks of 8 blocks
    seqs = {f"a{i}": 1 for i in range(16)} | {f"r{i}": 4 for i in range(4)}  # singles 0-15, runs 16-31
    arr = fill(pool, be, seqs)
    for s in ["a1", "a3", "a5", "a7", *[f"a{i}" for i in range(8, 16)], "r0", "r3"]:
        pool.free(s)
    # live: chunk 0 holds 0,2,4,6; chunk 1 nothing; chunk 2 holds 20-23; chunk 3 holds 24-27
    res = pool.reclaim(16 * MiB)  # chunk 1 (empty) and chunk 3 go: 24-27 must move
    assert res.copied_bytes == 4 * MiB and sorted(res.moved) == [24, 25, 26, 27]
    assert sorted(res.moved.values()) == [16, 17, 18, 19] and res.copies == 1  # into the free run, one copy
    pool.check()
    check_data(pool, arr)


def test_default_chunk_is_128_mib_but_never_larger_than_the_pool():
    big = KVPool(SimBackend(store=False), block_bytes=MiB, max_bytes=1 << 30)
    small = KVPool(SimBackend(store=False), block_bytes=MiB, max_bytes=5 * MiB)
    assert big.chunk_bytes == 128 * MiB and small.chunk_bytes == 6 * MiB  # rounded up to the 2 MiB granularity


def test_cuda_runs_groups_adjacent_chunks():
    from valve.runtime.memory.cuda import runs

    assert runs([64, 0, 32, 128, 160, 256], 32) == [(0, 3), (128, 2), (256, 1)]
    assert runs([], 32) == []


def test_reclaim_pauses_the_garbage_collector_and_restores_it():
    import gc

    pool, be = make_pool()
    pool.allocate("a", 8)
    seen = []
    unmap = be.unmap
    be.unmap = lambda offs, n: (seen.append(gc.isenabled()), unmap(offs, n))
    assert gc.isenabled()
    pool.reclaim(4 * MiB)
    assert seen == [False] and gc.isenabled()
