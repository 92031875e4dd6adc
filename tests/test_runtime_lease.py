"""The heartbeat lease: a gate word other than open counts as closed, the online client does not trust a dead
arbiter's "close allowed" flag, a restarted arbiter gates requests already in flight, and a watchdog enforces the
lease while the engine thread is blocked."""

from __future__ import annotations

import threading
import time

from support.waiting import until

from valve.api.runtime import RuntimeSpec
from valve.runtime.arbiter.loop import Arbiter
from valve.runtime.arbiter.policy import GatePolicy
from valve.runtime.control import FLAG_ARBITER, FLAG_CLOSE_ALLOWED, GATE_CLOSED, GATE_OPEN, ControlBlock
from valve.runtime.gate.offline import Gate, HostGateBackend, lease_expired
from valve.runtime.online.signal import OnlineSignal, may_close

MS = 1_000_000


def test_lease_expired_counts_any_word_but_open_as_closed():
    assert lease_expired(GATE_CLOSED, 0, 100 * MS, 101 * MS)
    assert lease_expired(7, 0, 100 * MS, 101 * MS)
    assert lease_expired(0xFFFFFFFF, 0, 100 * MS, 101 * MS)
    assert not lease_expired(GATE_OPEN, 0, 100 * MS, 101 * MS)
    assert not lease_expired(7, 0, 100 * MS, 100 * MS)  # within the lease


def test_a_corrupted_gate_word_with_a_dead_arbiter_does_not_stall_offline():
    cb = ControlBlock.anonymous()
    cb.fields.gate = 7
    cb.fields.heartbeat_ns = time.monotonic_ns() - 10 * 1000 * MS  # dead for 10 s
    gate = Gate(cb, backend=HostGateBackend(), lease_ms=100, watchdog=False)
    done = threading.Event()  # the host backend waits for GATE_OPEN: gate() returns only if the lease opened it
    threading.Thread(target=lambda: (gate(), done.set()), daemon=True).start()
    assert done.wait(30), "offline stalled on a corrupted gate word"
    assert cb.fields.gate == GATE_OPEN and gate.forced_opens == 1 and cb.fields.forced_opens == 1


def test_online_client_does_not_close_on_a_stale_flag():
    cb = ControlBlock.anonymous()
    f = cb.fields
    f.flags, f.lease_ns = FLAG_ARBITER | FLAG_CLOSE_ALLOWED, 100 * MS
    f.heartbeat_ns = time.monotonic_ns() - 200 * MS  # the arbiter died with the flag set
    sig = OnlineSignal(cb)
    assert sig.begin() is False and f.gate == GATE_OPEN
    sig.end()
    f.heartbeat_ns = time.monotonic_ns()  # alive again
    assert sig.begin() is True and f.gate == GATE_CLOSED
    sig.end()


def test_may_close_needs_an_open_gate_the_flag_and_a_live_heartbeat():
    now = 10_000 * MS
    assert may_close(GATE_OPEN, FLAG_CLOSE_ALLOWED, now - 50 * MS, 100 * MS, now)
    assert not may_close(GATE_OPEN, FLAG_CLOSE_ALLOWED, now - 150 * MS, 100 * MS, now)
    assert not may_close(GATE_OPEN, FLAG_ARBITER, now, 100 * MS, now)
    assert not may_close(GATE_CLOSED, FLAG_CLOSE_ALLOWED, now, 100 * MS, now)
    assert not may_close(GATE_OPEN, FLAG_CLOSE_ALLOWED, now - 1500 * MS, 0, now)  # default lease 1 s


def test_restarted_arbiter_closes_the_gate_for_requests_already_in_flight():
    cb = ControlBlock.anonymous()
    sig = OnlineSignal(cb)
    sig.begin()  # started while no arbiter ran: nobody closed the gate
    assert cb.fields.gate == GATE_OPEN
    arb = Arbiter(cb, RuntimeSpec(idle_hysteresis_ms=1))
    now = time.monotonic_ns()
    arb.step(now)
    assert cb.fields.gate == GATE_CLOSED and cb.fields.preemptions == 1
    arb.step(now + 10 * MS)
    assert cb.fields.gate == GATE_CLOSED  # still in flight
    sig.end()
    arb.step(now + 20 * MS)
    arb.step(now + 30 * MS)
    assert cb.fields.gate == GATE_OPEN


def test_restarted_arbiter_closes_again_after_a_stale_lease_opened_the_gate():
    """The offline client read the dead arbiter's heartbeat just before the new one wrote its own, saw the gate
    closed and opened it on the lease: with the request still in flight the arbiter closes it again."""
    cb = ControlBlock.anonymous()
    sig = OnlineSignal(cb)
    sig.begin()
    now = time.monotonic_ns()
    cb.fields.heartbeat_ns = now - 5_000 * MS  # the dead arbiter's
    arb = Arbiter(cb, RuntimeSpec(idle_hysteresis_ms=1))
    arb.step(now)
    assert cb.fields.gate == GATE_CLOSED and cb.fields.heartbeat_ns == now  # the beat came with the closure
    cb.fields.gate = GATE_OPEN  # the offline client's forced open
    cb.fields.forced_opens += 1
    arb.step(now + 1 * MS)
    assert cb.fields.gate == GATE_CLOSED and cb.fields.preemptions == 2
    sig.end()
    arb.step(now + 10 * MS)
    arb.step(now + 20 * MS)
    assert cb.fields.gate == GATE_OPEN


def test_resume_respects_the_rate_cap():
    p = GatePolicy(max_preemptions_per_second=1)
    p.adopt_close(0)
    p.adopt_open(1)
    assert p.resume(2, gate_open=True, inflight=1) is False and p.capped == 1  # cap reached: stays open
    fresh = GatePolicy()
    assert fresh.resume(2, gate_open=True, inflight=0) is False and fresh.gate_open
    assert fresh.resume(2, gate_open=True, inflight=3) is True and not fresh.gate_open and fresh.inflight == 3


def test_watchdog_opens_the_gate_while_the_engine_is_blocked():
    cb = ControlBlock.anonymous()
    cb.fields.gate = GATE_CLOSED
    cb.fields.heartbeat_ns = time.monotonic_ns()
    gate = Gate(cb, backend=HostGateBackend(), lease_ms=50)  # the engine never calls it: blocked in a sync
    try:
        assert gate.watchdog is not None and gate.watchdog.is_alive()
        until(lambda: cb.fields.gate == GATE_OPEN, "the watchdog to enforce the lease")
        assert gate.forced_opens == 1
        assert time.monotonic_ns() - cb.fields.heartbeat_ns > 50 * MS  # not before the lease ran out
    finally:
        gate.close()
    until(lambda: not gate.watchdog.is_alive(), "the watchdog to stop")


def test_watchdog_is_off_for_non_blocking_backends_and_ends_with_the_gate():
    from valve.runtime.gate.sim import SimGateBackend
    from valve.runtime.sim import SimGPU

    cb = ControlBlock.anonymous()
    assert Gate(cb, backend=SimGateBackend(SimGPU(seed=0).context("offline"))).watchdog is None
    g = Gate(cb, backend=HostGateBackend())
    t = g.watchdog
    del g  # garbage: the thread ends by itself
    until(lambda: not t.is_alive(), "the watchdog of a collected gate to stop")
