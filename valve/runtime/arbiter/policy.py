"""The arbiter's gate decisions as a pure state machine over a clock (real or simulated).

Close the gate when online goes from idle to busy (at most ``max_preemptions_per_second`` closures in any
one-second window), keep it closed while online requests are in flight, reopen after ``idle_hysteresis`` of
online idleness. A request that arrives while the gate is still closed (within the hysteresis) costs no new
preemption: one preemption per burst.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SECOND = 1_000_000_000


@dataclass
class GatePolicy:
    idle_hysteresis_ns: int = 5_000_000
    max_preemptions_per_second: float = 100.0
    gate_open: bool = True
    inflight: int = 0
    idle_since: int = 0
    preemptions: int = 0
    capped: int = 0  # online bursts that found the cap reached and ran with the gate open
    closed_ns: int = 0
    _closed_at: int = 0
    _recent: deque = field(default_factory=deque)

    def may_close(self, now: int) -> bool:
        """Whether a closure now stays within the rate cap."""
        while self._recent and now - self._recent[0] >= SECOND:
            self._recent.popleft()
        return len(self._recent) < self.max_preemptions_per_second

    def _close(self, now: int) -> bool:
        if not self.gate_open:
            return False
        if not self.may_close(now):
            self.capped += 1
            return False
        self.adopt_close(now)
        return True

    def adopt_close(self, t: int) -> None:
        """The gate was closed at ``t`` (by this policy, or by an online client it allowed to)."""
        self._recent.append(t)
        self.gate_open = False
        self.preemptions += 1
        self._closed_at = t

    def resume(self, now: int, gate_open: bool, inflight: int) -> bool:
        """A (re)started arbiter's first look: adopt a closed gate; with requests already in flight and the gate
        open, close it within the cap (they started before us, so no arrival would). True: close it now."""
        self.inflight = inflight
        if not gate_open:
            self.adopt_close(now)
            return False
        return inflight > 0 and self._close(now)

    def adopt_open(self, now: int) -> None:
        """The gate was opened behind the policy's back (an offline client on a stale heartbeat)."""
        if not self.gate_open:
            self.gate_open = True
            self.closed_ns += max(0, now - self._closed_at)

    def observe(self, now: int, arrivals: int, inflight: int, last_end: int | None = None) -> bool:
        """The arbiter's polled view: ``arrivals`` requests started since the last call, ``inflight`` in flight
        now, the last one ended at ``last_end``. Returns True if this call closed the gate."""
        closed = self._close(now) if arrivals else False
        was_busy = self.inflight > 0 or arrivals > 0
        self.inflight = inflight
        if inflight == 0 and was_busy:
            self.idle_since = min(now, last_end) if last_end else now
        return closed

    def reopen_at(self) -> int | None:
        """When the gate should reopen if nothing else happens, or None if it stays as it is."""
        if self.gate_open or self.inflight:
            return None
        return self.idle_since + self.idle_hysteresis_ns

    def tick(self, now: int) -> bool:
        """Reopen the gate if online has been idle long enough. Returns True if it reopened."""
        due = self.reopen_at()
        if due is None or now < due:
            return False
        self.gate_open = True
        self.closed_ns += now - self._closed_at
        return True

    def closed_time(self, now: int) -> int:
        return self.closed_ns + (0 if self.gate_open else now - self._closed_at)
