"""The online side: tell the arbiter when online requests start and end. Never blocks, never fails a request.

``with online_request():`` around each request (sync or async code: it only writes shared memory), or
``OnlineSignal(cb).begin()`` / ``.end()`` where start and end are in different places (the proxy).
A server on several GPUs (tensor parallel: every request uses all of them) signals each GPU's block:
``MultiGpuSignal`` (``VALVE_GPU_UUID`` lists them comma-separated, as the device plugin sets it).

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
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from valve.api.contract import ENV_GPU_UUID
from valve.runtime.control import (
    FLAG_CLOSE_ALLOWED,
    GATE_CLOSED,
    GATE_OPEN,
    ControlBlock,
    ControlBlockError,
    control_path,
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


class MultiGpuSignal:
    """Start/end of online requests of a server spanning several GPUs: one ``OnlineSignal`` (one control block,
    one slot) per GPU, and each request begins and ends on all of them, so every GPU's gate closes for it (a
    tensor-parallel request keeps all its GPUs busy). A GPU whose block is missing or bad is skipped as a single
    signal skips it; the others are still signalled."""

    def __init__(self, blocks: Sequence[ControlBlock | Path | str],
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        if not blocks:
            raise ValueError("MultiGpuSignal: no control block given")
        self.signals = [OnlineSignal(b, clock) for b in blocks]

    def begin(self) -> bool:
        """An online request starts on every GPU. Returns True if it closed any GPU's gate."""
        begun: list[OnlineSignal] = []
        closed = False
        try:
            for sig in self.signals:
                closed = sig.begin() or closed
                begun.append(sig)
        except BaseException:  # all or none: the caller does not end() a begin() that raised
            for sig in begun:
                sig.end()
            raise
        return closed

    def end(self) -> None:
        if self.inflight <= 0:
            raise ValueError("MultiGpuSignal.end() without a matching begin()")
        for sig in self.signals:
            sig.end()

    def close(self) -> None:
        for sig in self.signals:
            sig.close()

    @property
    def inflight(self) -> int:
        return self.signals[0].inflight

    @property
    def closes(self) -> int:
        return sum(sig.closes for sig in self.signals)

    @property
    def ungated(self) -> int:
        """Requests begun while some GPU's block was bad (the proxy counts ungated requests by last_gated)."""
        return max(sig.ungated for sig in self.signals)

    @property
    def last_gated(self) -> bool:
        """Whether the last begin() reached every GPU's control block."""
        return all(sig.last_gated for sig in self.signals)

    def __call__(self) -> _Request:
        return _Request(self)


def control_paths(gpus: str | None, root: Path | str | None = None) -> list[Path]:
    """The control files of a comma-separated GPU list (``VALVE_GPU_UUID`` when None) under ``root``; [] when no
    GPU is known. ValueError on an empty or unsafe UUID in the list."""
    gpus = gpus or os.environ.get(ENV_GPU_UUID)
    if not gpus:
        return []
    return [control_path(g.strip(), root) for g in gpus.split(",")]


def signal_on(paths: Sequence[ControlBlock | Path | str],
              clock: Callable[[], int] = time.monotonic_ns) -> OnlineSignal | MultiGpuSignal:
    """One GPU's signal, or one over several GPUs."""
    return OnlineSignal(paths[0], clock) if len(paths) == 1 else MultiGpuSignal(paths, clock)


class _Request:
    __slots__ = ("sig",)

    def __init__(self, sig: OnlineSignal | MultiGpuSignal) -> None:
        self.sig = sig

    def __enter__(self) -> _Request:
        self.sig.begin()
        return self

    def __exit__(self, *exc) -> None:
        self.sig.end()


_signals: dict[object, OnlineSignal | MultiGpuSignal] = {}
_signals_lock = threading.Lock()


def signal_for(control: ControlBlock | None = None, gpu_uuid: str | None = None) -> OnlineSignal | MultiGpuSignal:
    """The process's signal for a control block (or for the GPUs of ``gpu_uuid``, else ``VALVE_GPU_UUID``,
    comma-separated, under ``VALVE_RUNTIME_DIR``); one slot per process and block."""
    if control is not None:
        key: object = id(control)
        paths: list[Path] = []
    else:
        paths = control_paths(gpu_uuid)
        if not paths:
            raise ValueError(f"online_request: no GPU given and {ENV_GPU_UUID} is not set (the device plugin sets "
                             "it in Valve pods)")
        key = tuple(paths)
    with _signals_lock:
        sig = _signals.get(key)
        if sig is None:
            sig = _signals[key] = OnlineSignal(control) if control is not None else signal_on(paths)
        return sig


def online_request(control: ControlBlock | None = None, gpu_uuid: str | None = None) -> _Request:
    """Context manager around one online request: ``with online_request(): ...``."""
    return _Request(signal_for(control, gpu_uuid))
