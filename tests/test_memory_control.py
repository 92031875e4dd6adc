"""The reclaim protocol between MemoryController (arbiter) and ReclaimHandler (offline), on simulated memory."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

from valve.api.runtime import ReclaimLimits, ReservePolicy, RuntimeSpec
from valve.runtime.arbiter.memory_control import SECOND, MemoryController, PeakTracker, TokenBucket
from valve.runtime.control import ControlBlock
from valve.runtime.memory.backend import MemorySnapshot
from valve.runtime.memory.client import ReclaimHandler, install
from valve.runtime.memory.pool import KVPool
from valve.runtime.memory.sim import SimBackend, SimGpuInfo
from valve.runtime.sim import SimGPU

MiB, GiB = 1 << 20, 1 << 30
MS = 1_000_000
CHUNK = 32 * MiB


def spec(**kw):
    reserve = ReservePolicy(min_bytes=kw.pop("min_bytes", 1 * GiB), margin_ratio=kw.pop("margin", 0.1),
                            decay_seconds=kw.pop("decay", 10.0), hysteresis_bytes=kw.pop("hyst", 256 * MiB))
    limits = ReclaimLimits(bytes_per_second=kw.pop("bps", 64 * GiB), requests_per_second=kw.pop("rps", 50.0),
                           grow_bytes_per_second=kw.pop("grow", 8 * GiB))
    return RuntimeSpec(reserve=reserve, reclaim=limits, **kw)


class World:
    """One simulated GPU: an online context whose demand the test sets, an offline KVPool, the arbiter's
    controller and the offline handler, sharing an anonymous control block."""

    def __init__(self, capacity=16 * GiB, policy="selective", **kw):
        self.gpu = SimGPU(capacity_bytes=capacity)
        self.online = self.gpu.context("online")
        self.online_allocs = []
        self.cb = ControlBlock.anonymous()
        self.pool = KVPool(SimBackend(self.gpu, "offline", store=False), block_bytes=2 * MiB, chunk_bytes=CHUNK,
                           max_bytes=capacity, policy=policy)
        self.ctl = MemoryController(spec(**kw), SimGpuInfo(self.gpu), ack_timeout_s=kw.get("timeout", 2.0))
        self.handler = ReclaimHandler(self.pool, self.cb, on_reclaim=self.results.append)
        self.now = 0
        self.n = 0

    results: list = []

    def set_online(self, nbytes):
        """Online holds ``nbytes`` (allocated as far as free memory allows) and reports its demand."""
        self.cb.fields.online_mem_bytes = nbytes
        have = self.online.mem_used
        while have > nbytes and self.online_allocs:
            a = self.online_allocs.pop()
            self.gpu.free(a)
            have -= a.nbytes
        if nbytes > have:
            want = min(nbytes - have, self.gpu.mem_free)
            if want > 0:
                self.online_allocs.append(self.online.malloc(want))

    def offline_fill(self):
        """Offline grabs what its limit allows (one sequence per call, many blocks)."""
        free = self.pool.free_blocks()
        if free:
            self.n += 1
            self.pool.allocate(self.n, free)

    def tick(self, dt_ms=1, offline=True):
        self.now += dt_ms * MS
        self.ctl.step(self.now, self.cb)
        if offline:
            self.handler.poll()
            self.offline_fill()


def test_token_bucket_and_peak_tracker():
    b = TokenBucket(10.0, now_ns=0)
    assert b.take(25, 0) == 10 and b.take(1, 0) == 0
    assert b.take(100, SECOND // 2) == pytest.approx(5.0)
    p = PeakTracker(half_life_s=1.0)
    p.update(0, 100.0)
    assert p.update(SECOND, 20.0) == pytest.approx(60.0)  # halfway back to the current value
    assert p.update(SECOND + 1, 200.0) == 200.0


def test_offline_grows_into_free_memory_above_the_reserve():
    w = World(min_bytes=1 * GiB, hyst=256 * MiB)
    for _ in range(3000):
        w.tick()
    f = w.cb.fields
    assert w.ctl.reserve == 1 * GiB
    assert f.offline_pool_bytes == w.pool.mapped_bytes
    free = w.gpu.mem_free
    assert 1 * GiB <= free <= 1 * GiB + 256 * MiB + CHUNK  # grew up to reserve + hysteresis


def test_reclaim_request_is_acked_with_the_released_bytes():
    w = World(min_bytes=1 * GiB)
    for _ in range(3000):
        w.tick()
    pool_before = w.pool.mapped_bytes
    w.set_online(3 * GiB)  # online takes 3 GiB: 2+ GiB of it from what offline must give back
    w.tick(offline=False)
    req = w.ctl.outstanding
    assert req is not None and req.nbytes > 0
    assert w.cb.fields.reclaim_req_seq % 2 == 0 and w.cb.fields.reclaim_req_bytes == req.nbytes
    assert w.cb.fields.offline_limit_bytes == pool_before - req.nbytes
    res = w.handler.poll()
    assert res.released_bytes == math.ceil(req.nbytes / CHUNK) * CHUNK
    assert w.cb.fields.reclaim_ack_seq == req.seq and w.cb.fields.reclaim_ack_bytes == res.released_bytes
    assert w.pool.mapped_bytes == pool_before - res.released_bytes
    w.tick(offline=False)
    assert w.ctl.outstanding is None and w.ctl.reclaimed_bytes == res.released_bytes
    assert w.ctl.latencies_ns == [1 * MS]
    reg = w.ctl.metrics.registry
    assert reg.get_sample_value("valve_reclaimed_bytes_total", {"gpu": "0"}) == res.released_bytes
    assert reg.get_sample_value("valve_reclaim_latency_seconds_count", {"gpu": "0"}) == 1
    # online gets its memory now
    w.set_online(4 * GiB)
    assert w.online.mem_used == 4 * GiB


def test_request_rate_and_byte_rate_limits_hold():
    w = World(capacity=64 * GiB, min_bytes=1 * GiB, rps=5.0, bps=2 * GiB, grow=64 * GiB)
    for _ in range(2000):
        w.tick()
    assert w.pool.mapped_bytes > 50 * GiB
    # online grows by 512 MiB every 10 ms for 4 s: far more than 2 GiB/s
    for i in range(400):
        w.set_online(min(50 * GiB, (i + 1) * 512 * MiB))
        w.tick(dt_ms=10)
    t = 4.0 + 2.0  # the run, plus the buckets' start (one second's worth each, granted at t=0)
    assert 2 <= w.ctl.requests <= 5 * t
    asked = w.ctl.reclaimed_bytes
    assert asked <= 2 * GiB * t + w.ctl.requests * CHUNK  # acks round up to whole chunks
    assert w.ctl.shortfall == 0 or w.ctl.reserve > 0


def test_grow_rate_limit_holds():
    w = World(capacity=64 * GiB, min_bytes=1 * GiB, grow=1 * GiB)
    for _ in range(1000):  # 1 s
        w.tick()
    assert w.pool.mapped_bytes <= 2 * GiB + CHUNK  # one second: the bucket's 1 GiB plus 1 GiB/s
    assert w.pool.mapped_bytes >= 1.5 * GiB


def test_reserve_tracks_a_synthetic_online_demand_curve():
    w = World(capacity=40 * GiB, min_bytes=512 * MiB, margin=0.1, decay=5.0, hyst=256 * MiB, grow=64 * GiB)
    peaks, reserves, demand_at = [], [], []
    t = 0
    for _ in range(2000):
        w.tick()  # offline fills up first
    # bursts of 8 GiB every 10 s over a 2 GiB base, 1 s long
    for step in range(300):  # 100 ms steps, 30 s
        t = step * 0.1
        d = 2 * GiB + (8 * GiB if (t % 10.0) < 1.0 else 0)
        w.set_online(d)
        w.tick(dt_ms=100)
        peaks.append(w.ctl.peak.peak)
        reserves.append(w.ctl.reserve)
        demand_at.append(d)
    # during the burst: the reserve covers the peak's margin; right after it: the burst's size stays free
    after = [i for i in range(1, 300) if demand_at[i] < demand_at[i - 1]]
    assert len(after) == 3
    for i in after:
        assert reserves[i] >= 8 * GiB  # the memory the burst used is kept free
    # decays with the half-life: 5 s after a burst ends the excess over demand has halved (within a step)
    i = after[0]
    excess0 = peaks[i] - demand_at[i]
    excess5 = peaks[i + 50] - demand_at[i + 50]
    assert excess5 == pytest.approx(excess0 / 2, rel=0.05)
    assert w.ctl.requests >= 1
    assert all(r >= 512 * MiB for r in reserves)


def test_later_bursts_find_memory_free():
    w = World(capacity=40 * GiB, min_bytes=512 * MiB, decay=60.0, grow=64 * GiB)
    for _ in range(2000):
        w.tick()
    reclaimed = []
    for _burst in range(3):
        before = w.ctl.reclaimed_bytes
        for _step in range(20):  # 2 s burst of 8 GiB
            w.set_online(2 * GiB + 8 * GiB)
            w.tick(dt_ms=100)
        for _step in range(50):  # 5 s quiet
            w.set_online(2 * GiB)
            w.tick(dt_ms=100)
        reclaimed.append(w.ctl.reclaimed_bytes - before)
    assert reclaimed[0] >= 8 * GiB
    # the reserve kept the burst's memory free: later bursts need only what the peak decayed by
    assert reclaimed[1] == reclaimed[2] <= reclaimed[0] / 20
    assert w.online.mem_used == 2 * GiB


def test_impossible_demand_gets_a_clear_answer(caplog):
    w = World(capacity=8 * GiB, min_bytes=1 * GiB)
    for _ in range(200):
        w.tick()
    pool = w.pool.mapped_bytes
    w.cb.fields.online_mem_bytes = 20 * GiB  # more than the GPU has
    with caplog.at_level("WARNING"):
        w.tick()
        w.tick()
    assert w.ctl.shortfall > 0
    assert w.ctl.metrics.registry.get_sample_value("valve_memory_reserve_shortfall_bytes", {"gpu": "0"}) > 0
    assert "reserve cannot be met" in caplog.text
    assert w.ctl.requests >= 1 and w.ctl.reclaimed_bytes == pool  # everything it had
    assert w.pool.mapped_bytes == 0


def test_handler_answers_a_request_larger_than_the_pool_with_what_it_has(caplog):
    w = World()
    w.pool.set_limit(4 * CHUNK)
    w.offline_fill()
    f = w.cb.fields
    f.reclaim_req_bytes, f.reclaim_req_seq = 10 * GiB, 2
    with caplog.at_level("WARNING"):
        res = w.handler.poll()
    assert res.released_bytes == 4 * CHUNK and f.reclaim_ack_bytes == 4 * CHUNK and f.reclaim_ack_seq == 2
    assert "the pool held only" in caplog.text
    assert len(res.evicted) == 1 and f.evicted_sequences == 1
    assert w.handler.poll() is None  # answered once


def test_handler_ignores_a_request_being_written():
    w = World()
    w.pool.set_limit(2 * CHUNK)
    w.offline_fill()
    f = w.cb.fields
    f.reclaim_req_seq = 3  # odd: the arbiter is writing
    assert w.handler.poll() is None and f.reclaim_ack_seq == 0


def test_arbiter_restart_picks_up_a_half_written_request():
    w = World()
    f = w.cb.fields
    f.reclaim_req_seq, f.reclaim_req_bytes, f.reclaim_ack_seq = 5, 99, 2
    w.ctl.step(MS, w.cb)
    assert f.reclaim_req_seq == 6 and f.reclaim_req_bytes == 0
    assert w.ctl.outstanding is not None and w.ctl.outstanding.seq == 6


def test_install_registers_on_the_gate_boundary():
    class FakeGate:
        def __init__(self, cb):
            self.control, self.hooks = cb, []

        def on_boundary(self, fn):
            self.hooks.append(fn)

    w = World()
    gate = FakeGate(w.cb)
    h = install(w.pool, gate=gate)
    assert gate.hooks == [h] and h.cb is w.cb
    w.pool.set_limit(2 * CHUNK)
    w.offline_fill()
    w.cb.fields.reclaim_req_bytes, w.cb.fields.reclaim_req_seq = CHUNK, 2
    gate.hooks[0]()
    assert w.cb.fields.reclaim_ack_bytes == CHUNK


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from valve.runtime.control import ControlBlock
    from valve.runtime.memory.pool import KVPool
    from valve.runtime.memory.client import ReclaimHandler
    from valve.runtime.memory.sim import SimBackend

    class Dies(SimBackend):
        def unmap(self, offsets, nbytes):
            super().unmap(offsets[:1], nbytes)   # one chunk gone, then the process is killed mid-reclaim
            os.kill(os.getpid(), signal.SIGKILL)

    cb = ControlBlock.open(sys.argv[1])
    pool = KVPool(Dies(store=False), block_bytes=2 << 20, chunk_bytes=32 << 20, max_bytes=8 << 30)
    pool.allocate("s", 4 * 16)
    h = ReclaimHandler(pool, cb, follow_limit=False)
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        h.poll()
        time.sleep(0.001)
""")


class FakeInfo:
    def __init__(self, total, free):
        self.total, self.free = total, free

    def snapshot(self):
        return MemorySnapshot(self.total, self.free, None)


def test_offline_killed_mid_reclaim_leaves_the_arbiter_consistent(tmp_path):
    cb = ControlBlock.create(tmp_path / "control")
    info = FakeInfo(16 * GiB, 512 * MiB)
    ctl = MemoryController(spec(min_bytes=1 * GiB, hyst=256 * MiB), info, ack_timeout_s=0.5)
    f = cb.fields
    f.offline_pool_bytes, f.offline_limit_bytes = 4 * CHUNK, 4 * CHUNK
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "control")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        f.online_mem_bytes = 12 * GiB  # online holds 12 GiB; 0.5 GiB free, the reserve is 1 GiB
        now = 10 * MS
        ctl.step(now, cb)
        req = ctl.outstanding
        assert req is not None and req.nbytes == 4 * CHUNK  # capped at what the pool holds
        assert child.wait(timeout=120) == -9  # killed while reclaiming
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert f.reclaim_ack_seq < req.seq  # never answered
    # no answer: the arbiter gives up after the timeout, keeps the offline limit down and counts it
    for _ in range(60):
        now += 10 * MS
        ctl.step(now, cb)
    assert ctl.abandoned == 1 and f.offline_limit_bytes <= f.offline_pool_bytes
    assert ctl.metrics.timeouts._value.get() == 1  # what the reclaim-failure alert counts
    assert ctl.outstanding is not None and ctl.outstanding.seq > req.seq  # asked again (rate-limited)
    # the driver frees the dead process's memory: the gap closes, the request is withdrawn
    info.free = 2 * GiB + 4 * CHUNK + 2 * GiB
    f.offline_pool_bytes = 0
    now += 10 * MS
    ctl.step(now, cb)
    assert ctl.outstanding is None and ctl.withdrawn == 1
    assert f.reclaim_req_seq % 2 == 0 and f.reclaim_req_bytes == 0
    # a restarted offline client answers the 0-byte request, the arbiter takes it, all counters agree
    pool = KVPool(SimBackend(store=False), block_bytes=2 * MiB, chunk_bytes=CHUNK, max_bytes=4 * GiB)
    h = ReclaimHandler(pool, cb)
    res = h.poll()
    assert res is not None and res.released_bytes == 0 and f.reclaim_ack_seq == f.reclaim_req_seq
    now += 10 * MS
    ctl.step(now, cb)
    assert ctl.outstanding is None and ctl.reclaimed_bytes == 0
    assert f.offline_limit_bytes > 0  # offline may grow again
    pool.set_limit(int(f.offline_limit_bytes))
    pool.allocate("x", 1)


def test_restarted_client_does_not_grow_into_its_dead_predecessors_pool():
    """The arbiter granted "pool it read + room" with the pool figure of a process that died: a new client takes
    only the room, until the arbiter writes a limit built on the new client's own figure."""
    gpu = SimGPU(capacity_bytes=16 * GiB)
    cb = ControlBlock.anonymous()
    f = cb.fields
    f.reserve_target_bytes = 1 * GiB
    f.offline_pool_bytes, f.offline_limit_bytes = 4 * CHUNK, 5 * CHUNK  # the dead client's 4 chunks + 1 of room
    pool = KVPool(SimBackend(gpu, "offline", store=False), block_bytes=2 * MiB, chunk_bytes=CHUNK, max_bytes=GiB)
    h = ReclaimHandler(pool, cb)
    h.poll()
    assert pool.limit_bytes == CHUNK and f.offline_pool_bytes == 0
    h.poll()  # its own figure (0) is there now, the limit is still the one built on the dead pool
    assert pool.limit_bytes == CHUNK
    pool.allocate("s", CHUNK // (2 * MiB))
    with pytest.raises(Exception, match="(?i)exhaust|fit"):
        pool.allocate("t", 1)  # one chunk mapped: the room, not the dead pool's memory
    f.offline_limit_bytes = 3 * CHUNK  # the arbiter's next limit, built on this client's figure
    h.poll()
    assert pool.limit_bytes == 3 * CHUNK
    # a live client's own figure never discounts its limit
    f.offline_limit_bytes = 4 * CHUNK
    h.poll()
    assert pool.limit_bytes == 4 * CHUNK


def test_a_limit_built_on_a_dead_figure_after_the_client_wrote_its_own_grants_only_the_room():
    """The race the basis closes: the arbiter read the dead client's figure (4 chunks), the restarted client then
    wrote its own (0), and the arbiter's limit built on the old figure arrived after. Without the basis the client
    saw its own figure beside a 5-chunk limit and took the dead pool's memory; with it, only the room."""
    gpu = SimGPU(capacity_bytes=16 * GiB)
    cb = ControlBlock.anonymous()
    f = cb.fields
    f.reserve_target_bytes = 1 * GiB
    pool = KVPool(SimBackend(gpu, "offline", store=False), block_bytes=2 * MiB, chunk_bytes=CHUNK, max_bytes=GiB)
    h = ReclaimHandler(pool, cb)
    f.offline_pool_bytes = 0  # the restarted client's own figure is already there
    f.offline_limit_bytes, f.offline_limit_basis = 5 * CHUNK, 4 * CHUNK  # built on the dead figure: 1 chunk of room
    h.poll()
    assert pool.limit_bytes == CHUNK
    pool.allocate("s", CHUNK // (2 * MiB))
    with pytest.raises(Exception, match="(?i)exhaust|fit"):
        pool.allocate("t", 1)
    # the next limit is built on this client's figure (1 chunk) with 2 of room
    f.offline_limit_bytes, f.offline_limit_basis = 3 * CHUNK, CHUNK
    h.poll()
    assert pool.limit_bytes == 3 * CHUNK


class Torn:
    """Control-block fields whose basis word changes between two reads (an arbiter writing a new pair)."""

    def __init__(self, fields, bases):
        object.__setattr__(self, "_f", fields)
        object.__setattr__(self, "_bases", list(bases))

    def __getattr__(self, name):
        if name == "offline_limit_basis" and self._bases:
            return self._bases.pop(0)
        return getattr(self._f, name)

    def __setattr__(self, name, value):
        setattr(self._f, name, value)


def test_a_pair_read_while_the_arbiter_writes_it_is_not_used():
    cb = ControlBlock.anonymous()
    f = cb.fields
    f.reserve_target_bytes = 1 * GiB
    pool = KVPool(SimBackend(store=False), block_bytes=2 * MiB, chunk_bytes=CHUNK, max_bytes=GiB)
    h = ReclaimHandler(pool, cb)
    f.offline_limit_bytes, f.offline_limit_basis = 3 * CHUNK, CHUNK  # 2 chunks of room
    h.poll()
    assert pool.limit_bytes == 2 * CHUNK
    f.offline_limit_bytes = 6 * CHUNK  # the new limit is written, its basis is changing under the read
    h.cb = type("CB", (), {"fields": Torn(f, [CHUNK, 4 * CHUNK])})()
    h.poll()
    assert pool.limit_bytes == 2 * CHUNK  # the torn pair (6 over 1: 5 chunks) was not used
    h.cb = cb
    f.offline_limit_basis = 4 * CHUNK
    h.poll()
    assert pool.limit_bytes == 2 * CHUNK  # a limit of 6 over a figure of 4: 2 chunks of room over 0 mapped


def test_every_limit_the_arbiter_writes_names_its_basis():
    w = World(min_bytes=1 * GiB, hyst=256 * MiB)
    for _ in range(200):  # offline grows into the free memory
        w.tick()
    f = w.cb.fields
    w.now += MS
    w.ctl.step(w.now, w.cb)  # a grant: on top of the figure the arbiter read
    assert f.offline_limit_basis == f.offline_pool_bytes == w.pool.mapped_bytes > 0
    assert f.offline_limit_bytes >= f.offline_limit_basis
    w.set_online(14 * GiB)  # online takes most of what is free: the arbiter asks offline to shrink
    w.now += MS
    w.ctl.step(w.now, w.cb)
    req = w.ctl.outstanding
    assert req is not None and f.offline_limit_basis == w.pool.mapped_bytes
    assert f.offline_limit_bytes == w.pool.mapped_bytes - req.nbytes
