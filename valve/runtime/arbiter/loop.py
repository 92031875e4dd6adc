"""The per-GPU arbiter: owns the control block, keeps the heartbeat, decides when the offline gate opens.

Each :meth:`Arbiter.step` (a loop every ``period_s``, or a simulated clock in tests and the demo):

1. heartbeat and published lease; every ``reap_ms`` frees the online slots of dead processes,
2. reads the online writer slots: new requests, in-flight count, last end, closures the clients made,
3. feeds them to :class:`~valve.runtime.arbiter.policy.GatePolicy` (close on idle -> busy within the rate cap, stay
   closed while busy, reopen after the idle hysteresis) and writes the gate word,
4. sets ``FLAG_CLOSE_ALLOWED`` while a closure would be within the cap, so online clients close the gate
   themselves at request start with no arbiter round trip,
5. updates counters and metrics, and runs the memory controller (``memory.step``) every ``memory_ms``; while its
   reclaim request is unanswered the gate is held open (``reclaim_opens`` counts it): the offline client answers
   between engine steps, and an online request waiting for that memory keeps the gate closed, so a closed gate
   would hold the answer back until the request gave up (the policy still counts the gate as closed),
6. with ``enforce`` (``arbiter/enforce.py``): looks for offline work behind the closed gate, reports it and, in
   ``pause`` mode, stops the offline process until the gate opens.

Before each step it checks the block (:meth:`ControlBlock.healthy`): a truncated, replaced or re-versioned file is
never touched; the arbiter re-attaches to a valid replacement or re-creates the file (clients follow the new inode).
A gate word other than open or closed counts as closed. On start, requests already in flight in the slots close
an open gate (within the rate cap): a restarted arbiter must not leave them ungated.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
import time

from valve.api.runtime import RuntimeSpec
from valve.runtime.arbiter.metrics import GateMetrics
from valve.runtime.arbiter.policy import GatePolicy
from valve.runtime.control import (
    EVICTION_CODES,
    FLAG_ARBITER,
    FLAG_CLOSE_ALLOWED,
    GATE_CLOSED,
    GATE_OPEN,
    GRANULARITY_CODES,
    SLOTS,
    ControlBlock,
    Layout,
    OnlineSlot,
)

log = logging.getLogger(__name__)
MS = 1_000_000
SLOT = struct.Struct("=IIQQQQQ")  # OnlineSlot: state, pid, started, ended, close_ns, end_ns, closes
SLOTS_AT = Layout.slots.offset
SLOTS_END = SLOTS_AT + SLOT.size * SLOTS
assert SLOT.size == ctypes.sizeof(OnlineSlot) and [n for n, _ in OnlineSlot._fields_] == [
    "state", "pid", "started", "ended", "close_ns", "end_ns", "closes"]


class Arbiter:
    def __init__(self, control: ControlBlock, spec: RuntimeSpec | None = None, memory=None,
                 metrics: GateMetrics | None = None, reap_ms: float = 100.0, memory_ms: float = 10.0,
                 enforce=None) -> None:
        self.cb, self.spec = control, spec or RuntimeSpec()
        self.memory, self.metrics, self.enforce = memory, metrics, enforce
        self.policy = GatePolicy(int(self.spec.idle_hysteresis_ms * MS), self.spec.max_preemptions_per_second)
        self.lease_ns = int(self.spec.heartbeat_lease_ms * MS)
        self.eviction_code = EVICTION_CODES[str(getattr(self.spec.eviction_policy, "value", self.spec.eviction_policy))]
        self.granularity_code = GRANULARITY_CODES[str(getattr(self.spec.gate_granularity, "value",
                                                              self.spec.gate_granularity))]
        self.reap_ns, self.memory_ns = int(reap_ms * MS), int(memory_ms * MS)
        self._next_reap = self._next_memory = 0
        f = control.fields
        self._seen = {i: (s.pid, s.started, s.closes) for i, s in enumerate(f.slots) if s.state == 1}
        self._seen_progress, self._seen_forced = int(f.offline_progress), int(f.forced_opens)
        self._seen_parked = int(f.parked_seq)
        self._reported = {"preemptions": 0, "capped": 0, "closed_ns": 0}
        self._measured_close = int(f.last_close_ns)
        self._started = False
        self.recreated = 0  # times the control file was bad and re-created
        self.steps = 0
        self.preemption_latencies_ns: list[int] = []
        self.reclaim_open = False  # the gate is open for an unanswered reclaim request, closed for the policy
        self.reclaim_opens = 0

    # ---- reading the online slots ------------------------------------------------------------------------
    def _collect(self) -> tuple[int, int, int, int]:
        """(requests started since the last call, latest client closure time or 0, in flight, last end).
        One copy of the slot table per call: ctypes attribute reads of 32 slots cost ~50 us."""
        arrivals = close_ns = inflight = last_end = 0
        seen = self._seen
        for i, (state, pid, st, en, cl_ns, end_ns, cl) in enumerate(SLOT.iter_unpack(self.cb.mm[SLOTS_AT:SLOTS_END])):
            if state != 1:
                if i in seen:
                    del seen[i]
                continue
            old_pid, started, closes = seen.get(i, (pid, 0, 0))
            if old_pid != pid or st < started or cl < closes:  # slot claimed anew
                started = closes = 0
            arrivals += st - started
            if cl > closes:
                close_ns = max(close_ns, cl_ns)
            inflight += max(0, st - en)
            last_end = max(last_end, end_ns)
            seen[i] = (pid, st, cl)
        return arrivals, close_ns, inflight, last_end

    def _decide(self, now: int) -> None:
        f, p = self.cb.fields, self.policy
        arrivals, client_close, inflight, last_end = self._collect()
        if p.gate_open and f.gate != GATE_OPEN:  # an online client closed it (or an arbiter before us)
            t = min(now, client_close) if client_close else now
            p.adopt_close(t)
            f.last_close_ns = t
        elif not p.gate_open and f.gate == GATE_OPEN and not self.reclaim_open:  # offline, on a stale heartbeat
            log.warning("the gate was opened behind the arbiter's back (heartbeat lease); following it")
            p.adopt_open(now)
            if p.resume(now, True, inflight):  # requests still in flight: they need it closed (our beat is fresh)
                f.gate = GATE_CLOSED
                f.last_close_ns = now
                log.info("%d online request(s) in flight: closed the gate again", inflight)
        if p.observe(now, arrivals, inflight, last_end):
            f.gate = GATE_CLOSED
            f.last_close_ns = now
        f.online_requests += arrivals

    # ---- one loop ----------------------------------------------------------------------------------------
    def step(self, now: int) -> int | None:
        """Run one decision at monotonic time ``now`` (ns). Returns when the gate is due to reopen, if it is."""
        self._ensure_block()
        f, p = self.cb.fields, self.policy
        # the heartbeat first: an offline client that sees the gate closed beside a dead arbiter's stale heartbeat
        # opens it again on the lease
        f.heartbeat_ns = now
        f.lease_ns = self.lease_ns
        if not self._started:
            self._started = True
            for i in self.cb.reap_dead_slots():
                log.info("online slot %d: its process died before this arbiter started", i)
            inflight = self.cb.inflight()
            if p.resume(now, f.gate == GATE_OPEN, inflight):
                f.gate = GATE_CLOSED
                f.last_close_ns = now
                log.info("%d online request(s) in flight at start: closed the gate", inflight)
            if self.enforce is not None:
                self.enforce.start(f, now)
        f.queue_ahead = self.spec.queue_ahead
        f.gate_granularity = self.granularity_code
        f.near_online_ns = int(self.spec.near_online.window_ms * MS)
        f.near_online_tokens = self.spec.near_online.max_batch_tokens
        f.eviction_policy = self.eviction_code
        if now >= self._next_reap:
            self._next_reap = now + self.reap_ns
            for i in self.cb.reap_dead_slots():
                log.info("online slot %d: its process died; dropping its in-flight requests", i)
        self._decide(now)
        if p.tick(now):
            f.gate = GATE_OPEN
            f.reopen_ns = now
            self._decide(now)  # a request that started while we reopened closes it again
        f.flags = FLAG_ARBITER | (FLAG_CLOSE_ALLOWED if p.gate_open and p.may_close(now) else 0)
        f.online_inflight = p.inflight
        self._account(f, p.closed_time(now))
        if self.enforce is not None:
            self.enforce.step(now, f, p)
        if self.memory is not None and now >= self._next_memory:
            self._next_memory = now + self.memory_ns
            self.memory.step(now, self.cb)
        self._hold_for_reclaim(f, p)
        self.steps += 1
        return p.reopen_at()

    def _hold_for_reclaim(self, f, p) -> None:
        """Open the gate while a reclaim request is unanswered; close it again after if the policy has it closed."""
        waiting = getattr(self.memory, "outstanding", None) is not None
        if waiting and not p.gate_open and not self.reclaim_open:
            self.reclaim_open = True
            self.reclaim_opens += 1
            f.gate = GATE_OPEN
        elif self.reclaim_open and (not waiting or p.gate_open):
            self.reclaim_open = False
            if not p.gate_open:
                f.gate = GATE_CLOSED

    def _ensure_block(self) -> None:
        """A bad block (truncated, replaced, another version) is re-attached or re-created before it is touched."""
        cb = self.cb
        if cb.path is None or cb.healthy():
            return
        problem = cb.problem
        cb.recreate()
        self._seen.clear()
        self._seen_progress = self._seen_forced = self._seen_parked = 0
        self.recreated += 1
        if self.metrics is not None:
            self.metrics.recreated.inc()
        log.error("control block %s was %s: re-created it (clients re-attach)", cb.path, problem)

    def _account(self, f, closed: int) -> None:
        p, r, m = self.policy, self._reported, self.metrics
        d_preemptions, d_closed = p.preemptions - r["preemptions"], closed - r["closed_ns"]
        f.preemptions += d_preemptions
        f.gate_closed_ns += d_closed
        progress, forced, parked = int(f.offline_progress), int(f.forced_opens), int(f.parked_seq)
        d_progress = progress - self._seen_progress if progress >= self._seen_progress else progress
        d_forced = max(0, forced - self._seen_forced)
        latency = None
        if parked != self._seen_parked and f.last_close_ns != self._measured_close and f.parked_ns >= f.last_close_ns:
            latency = int(f.parked_ns - f.last_close_ns)  # first park after this closure
            self._measured_close = int(f.last_close_ns)
            self.preemption_latencies_ns.append(latency)
        self._seen_progress, self._seen_forced, self._seen_parked = progress, forced, parked
        if m is not None:
            m.preemptions.inc(d_preemptions)
            m.capped.inc(p.capped - r["capped"])
            m.closed_seconds.inc(d_closed / 1e9)
            m.inflight.set(p.inflight)
            m.offline_progress.inc(d_progress)
            m.forced_opens.inc(d_forced)
            if latency is not None:
                m.preemption_latency.observe(latency / 1e9)
        r["preemptions"], r["capped"], r["closed_ns"] = p.preemptions, p.capped, closed

    def shutdown(self) -> None:
        """Leave offline free to run: open the gate and clear the flags (also on a clean exit)."""
        if not self.cb.healthy():
            return
        f = self.cb.fields
        if self.enforce is not None:
            self.enforce.shutdown(f, time.monotonic_ns())
        f.flags = 0
        f.gate = GATE_OPEN

    def run(self, stop: threading.Event, period_s: float = 0.001, clock=time.monotonic_ns) -> None:
        """Step every ``period_s`` (sooner when the gate is due to reopen) until ``stop`` is set."""
        try:
            while not stop.is_set():
                now = clock()
                due = self.step(now)
                delay = period_s if due is None else min(period_s, max(0.0, (due - now) / 1e9))
                stop.wait(delay)
        finally:
            self.shutdown()
