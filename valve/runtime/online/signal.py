"""The online side: tell the arbiter when online requests start and end. Never blocks, never fails a request.

``with online_request():`` around each request (sync or async code: it only writes shared memory), or
``OnlineSignal(cb).begin()`` / ``.end()`` where start and end are in different places (the proxy).

Each process claims one writer slot in the control block and only ever writes its own slot (no shared
read-modify-write across processes). When the arbiter allows it (``FLAG_CLOSE_ALLOWED``: it runs and the
preemption rate cap is not reached) the client closes an open gate itself at request start, so the gate closes
with no arbiter round trip; the arbiter accounts that closure and decides when to reopen. Not when the heartbeat is
older than the lease: a dead arbiter's flag is stale, and nobody would reopen the gate before the lease.

A block that goes bad under the mapping (truncated, replaced, another layout version) is never touched: requests
are served ungated (``ungated`` counts them, one log line per problem) until the block is valid again, then the
signal claims a slot in the new mapping with its requests in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from valve.api.contract import ENV_GPU_UUID
from valve.runtime.control import (
    FLAG_CLOSE_ALLOWED,
    GATE_CLOSED,
    GATE_OPEN,
    ControlBlock,
    ControlBlockError,
    resolve_control_path,
)

log = logging.getLogger(__name__)
RETRY_NS = 1_000_000_000  # how often a signal with no control block tries to open it again
DEFAULT_LEASE_NS = 1_000_000_000  # the lease when the arbiter publishes none (as the offline client's default)


def may_close(gate: int, flags: int, heartbeat_ns: int, lease_ns: int, now: int) -> bool:
    """Whether an online client starting a request closes the gate itself: it is open, the arbiter allows it,
    and the arbiter is alive (its heartbeat within the lease), so it will reopen the gate."""
    return gate == GATE_OPEN and bool(flags & FLAG_CLOSE_ALLOWED) and now - heartbeat_ns <= (lease_ns or
                                                                                            DEFAULT_LEASE_NS)


class OnlineSignal:
    """Start/end of online requests for one control block, from one process (thread safe).

    ``cb`` may be a path: the block is opened lazily and, while it cannot be (no arbiter yet), the signal is a
    no-op that retries once a second and logs once. ``clock`` gives monotonic ns (the simulator passes its own).
    """

    def __init__(self, cb: ControlBlock | Path | str, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._lock = threading.Lock()
        self.clock = clock
        self.cb: ControlBlock | None = cb if isinstance(cb, ControlBlock) else None
        self.path = None if isinstance(cb, ControlBlock) else Path(cb)
        self._claim = None
        self._next_try = 0
        self._warned = False
        self.inflight = 0  # this process's requests in flight
        self.closes = 0  # gate closures this process made
        self.ungated = 0  # requests begun while the control block was bad (served, not signalled)
        self.last_gated = True  # whether the last begin() reached the control block

    def _slot(self):
        if self.cb is not None and not self.cb.healthy():
            return None
        if self._claim is not None and self._claim.stale:  # re-attached to a new file: claim a slot there
            self._claim.release()
            self._claim = None
        if self._claim is not None:
            return self._claim.slot
        if self.cb is None:
            now = self.clock()
            if now < self._next_try:
                return None
            self._next_try = now + RETRY_NS
            try:
                self.cb = ControlBlock.open(self.path)
            except ControlBlockError as e:
                if not self._warned:
                    log.warning("online signal disabled until the control block appears: %s", e)
                    self._warned = True
                return None
        try:
            self._claim = self.cb.claim_slot()
        except (ControlBlockError, OSError) as e:
            if not self._warned:
                log.warning("online signal disabled: %s", e)
                self._warned = True
            return None
        self._claim.slot.started = self.inflight  # requests already in flight (begun before this claim) count
        return self._claim.slot

    def begin(self) -> bool:
        """An online request starts. Returns True if this call closed the gate."""
        with self._lock:
            self.inflight += 1
            s = self._slot()
            self.last_gated = s is not None
            if s is None:
                if self.cb is not None and self.cb.problem:
                    self.ungated += 1
                return False
            if s.started - s.ended < self.inflight:  # else the claim counted this request already (fresh slot)
                s.started += 1
            f = self.cb.fields
            now = self.clock()
            if may_close(f.gate, f.flags, f.heartbeat_ns, f.lease_ns, now):
                f.gate = GATE_CLOSED
                s.close_ns = now
                s.closes += 1
                self.closes += 1
                return True
            return False

    def end(self) -> None:
        """The online request ended (finished, failed or cancelled)."""
        with self._lock:
            if self.inflight <= 0:
                raise ValueError("OnlineSignal.end() without a matching begin()")
            s = self._slot() if self._claim is not None else None  # re-claims in a re-attached block
            self.inflight -= 1
            if s is None:
                return
            if s.ended < s.started:  # a begin() while the block was missing has no slot count
                s.end_ns = self.clock()
                s.ended += 1

    def close(self) -> None:
        """Release the slot (in-flight requests of this process no longer count)."""
        with self._lock:
            if self._claim is not None:
                self._claim.release()
                self._claim = None

    def __call__(self) -> _Request:
        return _Request(self)


class _Request:
    __slots__ = ("sig",)

    def __init__(self, sig: OnlineSignal) -> None:
        self.sig = sig

    def __enter__(self) -> _Request:
        self.sig.begin()
        return self

    def __exit__(self, *exc) -> None:
        self.sig.end()


_signals: dict[object, OnlineSignal] = {}
_signals_lock = threading.Lock()


def signal_for(control: ControlBlock | None = None, gpu_uuid: str | None = None) -> OnlineSignal:
    """The process's signal for a control block (or for the GPU of ``VALVE_GPU_UUID`` under
    ``VALVE_RUNTIME_DIR``); one slot per process and block."""
    if control is not None:
        key: object = id(control)
    else:
        key = resolve_control_path(gpu_uuid)
        if key is None:
            raise ValueError(f"online_request: no GPU given and {ENV_GPU_UUID} is not set (the device plugin sets "
                             "it in Valve pods)")
    with _signals_lock:
        sig = _signals.get(key)
        if sig is None:
            sig = _signals[key] = OnlineSignal(control if control is not None else key)
        return sig


def online_request(control: ControlBlock | None = None, gpu_uuid: str | None = None) -> _Request:
    """Context manager around one online request: ``with online_request(): ...``."""
    return _Request(signal_for(control, gpu_uuid))
