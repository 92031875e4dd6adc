"""The arbiter's gate decisions as a pure state machine over a clock (real or simulated).

Close the gate when online goes from idle to busy (at most ``max_preemptions_per_second`` closures in any
one-second window), keep it closed while online requests are in flight, reopen after ``idle_hysteresis`` of
online idleness. A request that arrives while the gate is still closed (within the hysteresis) costs no new
preemption: one preemption per burst.

:class:`EnforcePolicy` (with :func:`violation`) decides whether the offline tenant works behind a closed gate,
from the evidence the arbiter's shell gathers (gate marks passed, GPU-busy samples), and what to do about it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SECOND = 1_000_000_000
MS = 1_000_000
ENFORCE_MODES = ("off", "report", "pause")
# RuntimeSpec.queue_ahead's bound: a gated client can have at most this many passed gates not yet counted when
# the gate closes, whatever queue-ahead it chose within the spec
MAX_QUEUED_MARKS = 64


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

    @property
    def closed_at(self) -> int | None:
        """When the gate closed, None while it is open."""
        return None if self.gate_open else self._closed_at

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


def violation(closed_at: int | None, marks_since_close: int, busy: float | None, busy_since: int,
              grace_ns: int, busy_threshold: float, max_marks: int = MAX_QUEUED_MARKS) -> str | None:
    """Why the offline tenant is working behind the closed gate, None when it is not (or cannot be told).

    ``marks_since_close``: gates the offline client counted as passed since the closure. A gated client can
    count only the ones it had queued before the closure (at most ``max_marks``), so more means its waits do
    not wait. ``busy``: the offline process's share of GPU time over a sample starting at ``busy_since``
    (None: no sample). Work queued before the closure drains within ``grace_ns``; a sample that starts after it
    and is busy means work that no gate holds (a tenant that skips the gate)."""
    if closed_at is None:
        return None
    if marks_since_close > max_marks:
        return f"passed {marks_since_close} gates since the gate closed (at most {max_marks} could be queued)"
    if busy is not None and busy >= busy_threshold and busy_since >= closed_at + grace_ns:
        return (f"busy {busy:.0%} of the GPU {(busy_since - closed_at) / MS:.0f} ms after the gate closed "
                f"(grace {grace_ns / MS:.0f} ms)")
    return None


@dataclass(frozen=True)
class Action:
    """What the arbiter's shell does: ``violation`` (count, log, control block), ``pause`` or ``resume`` ``pid``."""

    kind: str
    pid: int = 0
    reason: str = ""


@dataclass
class EnforcePolicy:
    """One violation per closed-gate period at most; in ``pause`` mode the offline pid is stopped until the gate
    opens again. Feed it every arbiter step (:meth:`observe`): it snapshots the gate-mark counter at the
    closure."""

    mode: str = "report"
    grace_ns: int = 50 * MS
    busy_threshold: float = 0.2
    max_marks: int = MAX_QUEUED_MARKS
    violations: int = 0
    paused_pid: int = 0
    _period: int | None = None  # closed_at of the closed period being watched
    _marks_at_close: int = 0
    _flagged: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ENFORCE_MODES:
            raise ValueError(f"enforce mode {self.mode!r}: expected one of {', '.join(ENFORCE_MODES)}")

    def observe(self, closed_at: int | None, marks: int, pid: int, busy: float | None = None,
                busy_since: int = 0) -> list[Action]:
        """``closed_at``: the gate's closure time (None: open); ``marks``: the offline client's cumulative gate
        count; ``pid``: the offline pid it published (0: unknown)."""
        if closed_at is None:
            self._period = None
            return self.opened()
        if closed_at != self._period:
            self._period, self._marks_at_close, self._flagged = closed_at, marks, False
        if marks < self._marks_at_close:  # the counter restarted (a re-created control block)
            self._marks_at_close = marks
        if self._flagged or self.mode == "off":
            return []
        reason = violation(closed_at, marks - self._marks_at_close, busy, busy_since, self.grace_ns,
                           self.busy_threshold, self.max_marks)
        if reason is None:
            return []
        self._flagged = True
        self.violations += 1
        actions = [Action("violation", pid, reason)]
        if self.mode == "pause" and pid > 1 and not self.paused_pid:
            self.paused_pid = pid
            actions.append(Action("pause", pid, reason))
        return actions

    def opened(self) -> list[Action]:
        """The gate is open: a paused tenant may run again."""
        if not self.paused_pid:
            return []
        pid, self.paused_pid = self.paused_pid, 0
        return [Action("resume", pid)]

    def pause_failed(self) -> None:
        """The pause did not happen (no such process, not permitted): nothing to resume later."""
        self.paused_pid = 0
