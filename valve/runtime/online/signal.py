"""The online side: tell the arbiter when online requests start and end. Never blocks, never fails a request.

``with online_request():`` around each request (sync or async code: it only writes shared memory), or
``OnlineSignal(cb).begin()`` / ``.end()`` where start and end are in different places (the proxy).

Each process claims one writer slot in the control block and only ever writes its own slot (no shared
read-modify-write across processes). When the arbiter allows it (``FLAG_CLOSE_ALLOWED``: it runs and the
preemption rate cap is not reached) the client closes an open gate itself at request start, so the gate closes
with no arbiter round trip; the arbiter accounts that closure and decides when to reopen.
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

    def _slot(self):
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
        return self._claim.slot

    def begin(self) -> bool:
        """An online request starts. Returns True if this call closed the gate."""
        with self._lock:
            self.inflight += 1
            s = self._slot()
            if s is None:
                return False
            s.started += 1
            f = self.cb.fields
            if f.gate == GATE_OPEN and f.flags & FLAG_CLOSE_ALLOWED:
                f.gate = GATE_CLOSED
                s.close_ns = self.clock()
                s.closes += 1
                self.closes += 1
                return True
            return False

    def end(self) -> None:
        """The online request ended (finished, failed or cancelled)."""
        with self._lock:
            if self.inflight <= 0:
                raise ValueError("OnlineSignal.end() without a matching begin()")
            self.inflight -= 1
            if self._claim is None:
                return
            s = self._claim.slot
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
