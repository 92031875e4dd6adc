"""The offline side: a stream-ordered gate before each sub-layer, with bounded queue-ahead and a lease.

``Gate()`` at a sub-layer boundary (or ``attach(model)`` to put one before every attention and MLP block with
forward pre-hooks, no engine patch; or the one-liner ``gate()``) does, in order:

1. runs the boundary hooks (``on_boundary``: the memory reclaim handler, engine bookkeeping),
2. waits (on the CPU) until at most ``queue_ahead`` gated sub-layers are queued that the GPU has not reached,
   so a closing gate stops offline within a bounded amount of already-queued work,
3. if the gate is not open (any word other than GATE_OPEN counts as closed) and the arbiter's heartbeat is older
   than the lease, opens it (offline never stalls on a dead arbiter; counted in ``forced_opens``),
4. enqueues the wait on the gate word in the stream (the backend) and a mark to see when the GPU passes it.

A watchdog thread (``Gate(watchdog=True)``, the default for blocking backends) runs the lease check every
quarter lease as well: an engine blocked in a device sync or a graph replay behind a closed gate never reaches
step 3. A control block that goes bad under the mapping (truncated, replaced, another version) is never touched:
offline runs ungated (one log line; ``ungated`` counts boundaries) until it is valid again; the backend is re-bound
to a re-attached mapping.

Under CUDA-graph capture only step 4's wait is recorded (a graph memop node or the spin kernel, see
``gate.cuda``); each replay then waits on the live gate word. Hooks and queue-ahead are the engine's business
around replays (e.g. one ``Gate()`` call before each replay). ``attach`` calls the gate through the
``valve::gate_`` custom op (``gate.op``), so ``torch.compile(fullgraph=True)`` and captured graphs keep it.

Backends (one interface): ``cuda`` (``gate.cuda``: ``cuStreamWaitValue32`` on the mapped control page; imported
lazily), ``host`` (CPU tensors: the calling thread waits for the gate itself), ``sim`` (``gate.sim``: a SimGPU
context). Nothing here imports torch or cuda at module import.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Protocol

from valve.api.contract import ENV_GPU_UUID
from valve.runtime.control import GATE_OPEN, ControlBlock, resolve_control_path

log = logging.getLogger(__name__)

DEFAULT_LEASE_MS = 1000.0
DEFAULT_QUEUE_AHEAD = 2  # RuntimeSpec's default, for a control block with no arbiter publishing one
DEFAULT_PATTERN = r"(^|\.)(self_attn|attn|mlp|feed_forward)$"
POLL_S = 50e-6  # CPU poll period while waiting for queue room or an open gate
# a host-side wait for the gate past this long polls slower, so a waiting tenant's CPU use stays low (the enforced
# gate's /proc samples must not read it as work); costs it at most that much after a reopen. Waits for queue room
# keep the fast poll: they keep a GPU fed.
POLL_SLOW_AFTER_S, POLL_SLOW_S = 0.005, 0.0005
WATCHDOG_MIN_S, WATCHDOG_MAX_S = 0.002, 0.25  # bounds of the watchdog's period (a quarter lease)


def lease_expired(gate_word: int, heartbeat_ns: int, lease_ns: int, now: int) -> bool:
    """Whether the offline side opens the gate itself: it is not open (a corrupted word counts as closed) and
    the arbiter's heartbeat is older than the lease."""
    return gate_word != GATE_OPEN and now - heartbeat_ns > lease_ns


class GateBusy(RuntimeError):
    """A non-blocking backend (the simulator) has no queue room: call again once ``Gate.room()`` is True."""


class GateBackend(Protocol):
    """What a Gate needs from its backend (``HostGateBackend``, ``gate.cuda.CudaGateBackend``,
    ``gate.sim.SimGateBackend``). Optional: ``host_wait`` (the Gate polls the word on the CPU too),
    ``capturing(stream)`` (CUDA-graph capture: only the wait is recorded), ``bind(cb)`` (told the Gate's block)."""

    name: str
    can_block: bool  # False: a full queue raises GateBusy instead of waiting

    def wait(self, stream=None) -> None: ...  # enqueue: later work runs once the gate word is GATE_OPEN

    def mark(self, stream=None) -> object: ...  # a marker after the wait, to see when the stream passes it

    def reached(self, mark) -> bool: ...

    def now_ns(self) -> int: ...  # the clock of the heartbeat lease


class HostGateBackend:
    """For work the calling thread runs synchronously (CPU tensors): the thread itself waits for the gate."""

    name = "host"
    can_block = True
    host_wait = True

    def wait(self, stream=None) -> None:  # the Gate polls the word
        pass

    def mark(self, stream=None):
        return None

    def reached(self, mark) -> bool:
        return True

    def now_ns(self) -> int:
        return time.monotonic_ns()


def make_backend(kind: str, cb: ControlBlock) -> GateBackend:
    if kind == "auto":
        try:
            import torch
        except ImportError:
            return HostGateBackend()
        kind = "cuda" if torch.cuda.is_available() else "host"
    if kind == "cuda":
        from valve.runtime.gate.cuda import CudaGateBackend

        return CudaGateBackend(cb)
    if kind == "host":
        return HostGateBackend()
    if kind == "sim":
        raise ValueError("the sim backend needs a SimGPU context: Gate(cb, backend=SimGateBackend(context))")
    raise ValueError(f"unknown gate backend {kind!r}; expected auto, cuda, host, sim or a backend object")


_global_hooks: list[Callable[[], object]] = []


def on_boundary(fn: Callable[[], object]) -> Callable[[], object]:
    """Run ``fn()`` at every sub-layer boundary of every Gate in this process (e.g. the reclaim handler)."""
    _global_hooks.append(fn)
    return fn


class Gate:
    def __init__(
        self,
        control: ControlBlock | None = None,
        *,
        gpu_uuid: str | None = None,
        backend="auto",
        queue_ahead: int | None = None,
        lease_ms: float | None = None,
        watchdog: bool | None = None,
    ) -> None:
        if queue_ahead is not None and queue_ahead < 1:
            raise ValueError(f"queue_ahead must be at least 1, got {queue_ahead}")
        if control is None:
            path = resolve_control_path(gpu_uuid)
            if path is None:
                raise ValueError(f"Gate: no control block given and {ENV_GPU_UUID} is not set")
            control = ControlBlock.open(path)
        self.cb = control
        self.backend: GateBackend = make_backend(backend, control) if isinstance(backend, str) else backend
        if hasattr(self.backend, "bind"):
            self.backend.bind(control)
        self._queue_ahead = queue_ahead
        self.lease_ms = lease_ms
        self.hooks: list[Callable[[], object]] = []
        self.marks: deque = deque()
        self.boundaries = 0  # gates enqueued
        self.passed = 0  # gates the stream has passed (marks reached)
        self.forced_opens = 0
        self.ungated = 0  # boundaries passed ungated because the control block was bad
        self._lock = threading.Lock()
        self._lease_lock = threading.Lock()  # the watchdog and the engine thread both check the lease
        self._generation = control.generation
        if control.healthy():
            self._publish_pid()
        self._stop = threading.Event()
        self.watchdog: threading.Thread | None = None
        if watchdog if watchdog is not None else self.backend.can_block:
            self.watchdog = threading.Thread(target=_watch, args=(weakref.ref(self), self._stop), daemon=True,
                                             name="valve-gate-watchdog")
            self.watchdog.start()

    def close(self) -> None:
        """Stop the watchdog (it also stops once the Gate is garbage)."""
        self._stop.set()

    def attached(self) -> bool:
        """Whether the control block may be touched now (re-binds the backend after a re-attach)."""
        if not self.cb.healthy():
            return False
        if self.cb.generation != self._generation:
            self._generation = self.cb.generation
            if hasattr(self.backend, "bind"):
                self.backend.bind(self.cb)
            self._publish_pid()
        return True

    def _publish_pid(self) -> None:
        # the arbiter's enforcement pauses this pid when it works behind a closed gate
        self.cb.fields.offline_pid = os.getpid()

    # ---- hooks and state -----------------------------------------------------------------------------
    def on_boundary(self, fn: Callable[[], object]) -> Callable[[], object]:
        """Run ``fn()`` on the offline CPU thread at each boundary of this gate."""
        self.hooks.append(fn)
        return fn

    @property
    def queue_ahead(self) -> int:
        """Gated sub-layers allowed past the last gate: the argument, else what the arbiter publishes from its
        RuntimeSpec (read at every boundary, so a changed spec applies without restarting the engine)."""
        if self._queue_ahead is not None:
            return self._queue_ahead
        if not self.attached():
            return DEFAULT_QUEUE_AHEAD
        published = int(self.cb.fields.queue_ahead)
        return published if published >= 1 else DEFAULT_QUEUE_AHEAD

    def lease_ns(self) -> int:
        if self.lease_ms is not None:
            return int(self.lease_ms * 1e6)
        if not self.attached():
            return int(DEFAULT_LEASE_MS * 1e6)
        published = int(self.cb.fields.lease_ns)
        return published if published else int(DEFAULT_LEASE_MS * 1e6)

    def is_open(self) -> bool:
        """The gate word is open, or the block is bad (offline then runs ungated, as with a dead arbiter)."""
        return not self.attached() or self.cb.fields.gate == GATE_OPEN

    def check_lease(self, now: int | None = None) -> bool:
        """Open a gate that is not open when the arbiter heartbeat is older than the lease. True if it did."""
        with self._lease_lock:
            if not self.attached():
                return False
            f = self.cb.fields
            now = self.backend.now_ns() if now is None else now
            word, lease = int(f.gate), self.lease_ns()
            if not lease_expired(word, int(f.heartbeat_ns), lease, now):
                return False
            f.gate = GATE_OPEN
            f.forced_opens += 1
            self.forced_opens += 1
        log.warning("arbiter heartbeat is %.0f ms old (lease %.0f ms) with the gate word %d: opening it",
                    (now - int(f.heartbeat_ns)) / 1e6, lease / 1e6, word)
        return True

    def _reap(self) -> None:
        m = self.marks
        reached = 0
        while m and self.backend.reached(m[0]):
            m.popleft()
            reached += 1
        self.passed += reached
        if reached and self.attached():
            self.cb.fields.offline_progress += reached

    def room(self) -> bool:
        """Whether another gated sub-layer may be queued now."""
        self._reap()
        return len(self.marks) < self.queue_ahead

    def poll(self) -> bool:
        """Lease check plus :meth:`room` (for drivers of non-blocking backends)."""
        self.check_lease()
        return self.room()

    def _wait_until(self, ready: Callable[[], bool], slow: bool = False) -> None:
        slow_at = time.monotonic() + POLL_SLOW_AFTER_S if slow else float("inf")
        while not ready():
            if not self.backend.can_block:
                raise GateBusy("no queue room: the stream has not reached the earlier gates yet")
            self.check_lease()
            time.sleep(POLL_SLOW_S if time.monotonic() >= slow_at else POLL_S)

    # ---- the boundary ------------------------------------------------------------------------------------
    def gate(self, stream=None) -> None:
        """One sub-layer boundary: hooks, bounded queue-ahead, lease, then the wait in the stream."""
        capturing = getattr(self.backend, "capturing", None)
        if capturing is not None and capturing(stream):  # CUDA-graph capture: only the wait goes into the graph
            self.backend.wait(stream)
            return
        with self._lock:
            if not self.attached():  # a bad block: run ungated rather than touch it (or stall)
                self.ungated += 1
                self._reap()
                return
            for fn in _global_hooks:
                fn()
            for fn in self.hooks:
                fn()
            self._wait_until(self.room)
            self.check_lease()
            if getattr(self.backend, "host_wait", False):
                self._wait_until(lambda: self.check_lease() or self.is_open(), slow=True)
            self.backend.wait(stream)
            self.marks.append(self.backend.mark(stream))
            self.boundaries += 1
            self._reap()

    __call__ = gate

    def drain(self) -> None:
        """Wait (on the CPU) until the stream has passed every gate enqueued so far (lease still applies)."""
        def empty() -> bool:
            self._reap()
            return not self.marks

        self._wait_until(empty)


def _watch(ref: weakref.ref, stop: threading.Event) -> None:
    """The lease watchdog: a quarter-lease period, bounded; ends with the Gate."""
    while True:
        g = ref()
        if g is None:
            return
        try:
            g.check_lease()
            period = min(WATCHDOG_MAX_S, max(WATCHDOG_MIN_S, g.lease_ns() / 4e9))
        except Exception:  # noqa: BLE001 - the watchdog must outlive a bad moment; the engine thread reports
            log.exception("gate watchdog")
            period = WATCHDOG_MAX_S
        del g
        if stop.wait(period):
            return


# ---- module-level helpers ------------------------------------------------------------------------------------
_default: Gate | None = None
_default_lock = threading.Lock()


def default_gate() -> Gate:
    """The process's Gate for ``VALVE_GPU_UUID`` (under ``VALVE_RUNTIME_DIR``), created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Gate()
        return _default


def gate(stream=None) -> None:
    """One-line gate for engines that mark sub-layer boundaries themselves."""
    default_gate().gate(stream)


class AttachHandle:
    def __init__(self, handles: list, names: list[str], gate: Gate) -> None:
        self.handles, self.names, self.gate = handles, names, gate

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def published_granularity(g: Gate) -> str:
    """The published ``gate_granularity`` (the arbiter's RuntimeSpec), ``block`` when unset or unreadable."""
    from valve.runtime.control import GRANULARITY_NAMES

    return GRANULARITY_NAMES.get(int(g.cb.fields.gate_granularity), "block") if g.attached() else "block"


def attach(model, pattern: str | None = None, gate: Gate | None = None, granularity: str | None = None
           ) -> AttachHandle:
    """Put a gate before every sub-module of ``model`` whose qualified name matches ``pattern`` (``re.search``),
    with forward pre-hooks that call the ``valve::gate_`` op (``gate.op``) on the module's first tensor input, so
    ``torch.compile(fullgraph=True)`` and CUDA-graph captures keep the gates. Without a pattern, the granularity
    (the argument, else what the arbiter publishes from ``RuntimeSpec.gate_granularity``) picks: ``block``, every
    attention and MLP block (``DEFAULT_PATTERN``), or ``linear``, every ``torch.nn.Linear``. Raises if nothing
    matches (a gate that is never hit would silently do nothing)."""
    g = gate if gate is not None else default_gate()
    kind = "pattern" if pattern is not None else (granularity or published_granularity(g))
    if kind not in ("pattern", "block", "linear"):
        raise ValueError(f"attach: granularity {kind!r}; expected block or linear")
    names: list[str] = []
    if kind == "linear":
        import torch

        names = [name for name, m in model.named_modules() if name and isinstance(m, torch.nn.Linear)]
    else:
        rx = re.compile(pattern if pattern is not None else DEFAULT_PATTERN)
        for name, _ in model.named_modules():  # parents come first: skip matches nested in a gated module
            if name and rx.search(name) and not any(name.startswith(n + ".") for n in names):
                names.append(name)
    if not names:
        what = "has no torch.nn.Linear" if kind == "linear" else \
            f"has no sub-module name matching {pattern if pattern is not None else DEFAULT_PATTERN!r}"
        raise ValueError(f"attach: {type(model).__name__} {what}")
    mods = dict(model.named_modules())
    from valve.runtime.gate import op  # imports torch: the model is a torch module anyway

    gid = op.register(g)

    def hook(module, args, kwargs):
        x = op.first_tensor(args, kwargs)
        if x is None:  # nothing to order against: eager only (Dynamo would trace the lock in Gate.gate)
            g.gate()
        else:  # the custom op: stays in compiled graphs and CUDA-graph captures
            op.gate_(x, gid)

    handles = [mods[n].register_forward_pre_hook(hook, with_kwargs=True) for n in names]
    return AttachHandle(handles, names, g)
