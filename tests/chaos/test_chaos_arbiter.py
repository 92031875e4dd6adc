"""Chaos: the arbiter process killed (SIGKILL) with the gate closed and with it open, then restarted; its control
file truncated, replaced or re-versioned under it and its clients. Offline never stalls past the lease, online
requests are never lost from the count, and the pieces find each other again."""

from __future__ import annotations

import os
import time

import pytest
from chaos import LEASE_MS, ArbiterProc, OfflineLoop, gate_open, ms, valid
from waiting import until

from valve.runtime.control import FILE_SIZE, VERSION, Layout
from valve.runtime.online.signal import OnlineSignal


@pytest.fixture
def running(tmp_path):
    """An arbiter process, an offline gate loop and an online signal on its block, offline running."""
    arb = ArbiterProc(tmp_path)
    arb.start()
    cb = arb.wait_ready()
    off, sig = OfflineLoop(cb), OnlineSignal(arb.path)
    try:
        until(lambda: off.count() > 10, "offline running")
        yield arb, cb, off, sig
    finally:
        off.stop()
        sig.close()
        arb.stop()


def test_arbiter_killed_with_the_gate_closed(running, figures):
    arb, cb, off, sig = running
    sig.begin()
    until(lambda: not gate_open(cb) and off.parked(), "offline parked at the closed gate")
    forced = cb.fields.forced_opens  # a loaded machine may have held the live arbiter past the lease already
    killed = arb.kill()
    # the lease runs from the dead arbiter's last heartbeat, which a loaded machine may have written well before
    # the kill: offline passes no earlier than that, and only then
    last_beat = int(cb.fields.heartbeat_ns)
    until(lambda: off.passed_after(killed), "offline past the lease", timeout=20)
    stall = off.passed_after(killed) - killed
    assert off.passed_after(killed) - last_beat > LEASE_MS * 1e6
    assert cb.fields.forced_opens == forced + 1
    started = arb.start()  # the request is still in flight: the new arbiter closes the gate for it
    until(lambda: not gate_open(cb), "the restarted arbiter closing the gate", timeout=20)
    closed_ns = time.monotonic_ns()
    sig.end()
    until(lambda: gate_open(cb), "the gate reopened after the request")
    n = off.count()
    until(lambda: off.count() > n + 10, "offline running again")
    assert cb.fields.online_requests >= 1 and cb.inflight() == 0
    figures.update(lease_ms=LEASE_MS, offline_stall_after_kill_ms=ms(stall),
                   restart_to_gate_closed_ms=ms(closed_ns - started))


def test_arbiter_killed_with_the_gate_open(running, figures):
    arb, cb, off, sig = running
    killed = arb.kill()
    n = off.count()
    until(lambda: off.count() > n + 100, "offline running with the arbiter dead")
    window = [t for t in off.passes if t > killed]
    gap = max(b - a for a, b in zip(window, window[1:], strict=False))
    # never parked: nothing closed the gate, so the lease never had to open it (the gap itself is a figure: a
    # loaded machine can pause the thread longer than a lease)
    assert gate_open(cb) and cb.fields.forced_opens == 0
    until(lambda: time.monotonic_ns() - cb.fields.heartbeat_ns > LEASE_MS * 1e6, "a stale heartbeat")
    sig.begin()  # a request while the arbiter is dead: served, the stale flag closes nothing
    assert gate_open(cb)
    started = arb.start()
    until(lambda: not gate_open(cb), "the restarted arbiter closing the gate for the request", timeout=20)
    closed_ns = time.monotonic_ns()
    sig.end()
    until(lambda: gate_open(cb), "the gate reopened")
    assert cb.inflight() == 0
    figures.update(max_offline_gap_after_kill_ms=ms(gap), restart_to_gate_closed_ms=ms(closed_ns - started))


def truncate(path) -> None:
    os.truncate(path, 0)


def replace(path) -> None:
    tmp = path.with_name("garbage")
    tmp.write_bytes(b"\xff" * FILE_SIZE)
    os.rename(tmp, path)


def bump_version(path) -> None:
    with open(path, "r+b") as f:
        f.seek(Layout.version.offset)
        f.write((VERSION + 1).to_bytes(4, "little"))


@pytest.mark.parametrize("damage", [truncate, replace, bump_version])
def test_control_file_damaged_under_a_running_arbiter_and_clients(running, figures, damage):
    arb, cb, off, sig = running
    sig.begin()
    sig.end()
    generation, ino, sig_generation = cb.generation, arb.path.stat().st_ino, sig.cb.generation
    damaged = time.monotonic_ns()
    damage(arb.path)
    fresh = until(lambda: (b := valid(arb.path)) and arb.path.stat().st_ino != ino and b, "a re-created file")
    recreated = time.monotonic_ns()
    until(lambda: cb.healthy() and cb.generation > generation, "the offline client re-attached")
    reattached = time.monotonic_ns()
    n = off.count()
    until(lambda: off.count() > n + 10, "offline running on the new file")
    # the online client sees a replaced file at its next path check (every RECHECK_NS), not at once
    until(lambda: sig.cb.healthy() and sig.cb.generation > sig_generation, "the online client re-attached")
    # the client closes the gate itself while the arbiter's heartbeat is within the lease, else the arbiter does
    # at its next step: a loaded machine can hold the arbiter past this test's short lease
    sig.begin()
    until(lambda: not gate_open(fresh), "online closing the gate in the new file")
    until(off.parked, "offline parked at the new file's closed gate")
    sig.end()
    until(lambda: gate_open(fresh), "the gate reopened")
    assert arb.proc.poll() is None
    assert fresh.fields.online_requests >= 1 and fresh.inflight() == 0
    figures.update(damage_to_recreated_ms=ms(recreated - damaged), damage_to_reattached_ms=ms(reattached - damaged),
                   offline_ungated_boundaries=off.gate.ungated)
