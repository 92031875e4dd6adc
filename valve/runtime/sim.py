"""Simulated GPU: a discrete-event model of one GPU shared by several contexts (processes).

What it models, and why each part is there:
- Each context has one in-order stream of operations: kernels (with a duration), stream waits on a 32-bit word
  (``cuStreamWaitValue32``: the stream front blocks until the word equals a value) and markers (a callback when
  the stream reaches it, like an event the host polls).
- One context owns the GPU at a time. When another context also has runnable work, the GPU switches after a time
  slice (default 2 ms, measured on an H100 without a gate); a running kernel is suspended and resumes later. A
  context whose stream is empty or blocked on a wait gives the GPU up at once. Every switch costs ``switch_ns``.
- Kernel durations can carry seeded log-normal jitter, so runs are random but reproducible.
- Memory: allocations per context against a capacity; going over raises :class:`SimOutOfMemory`.
- Host code runs as callbacks at virtual times (``at``/``after``); the clock only moves inside ``run_until``.

Interference appears because an online kernel that arrives while offline owns the GPU waits for the slice to
end; a closed gate removes it because the offline stream stops at its next wait and yields the GPU.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MS = 1_000_000
US = 1_000


class SimOutOfMemory(MemoryError):
    """An allocation did not fit in the simulated GPU's free memory."""


@dataclass
class Kernel:
    duration_ns: int
    tag: str = ""
    on_start: Callable[[int], None] | None = None
    on_done: Callable[[int], None] | None = None
    remaining_ns: int = 0
    start_ns: int = -1
    end_ns: int = -1


@dataclass
class Wait:
    read: Callable[[], int]
    value: int


@dataclass
class Marker:
    callback: Callable[[int], None]


@dataclass
class Allocation:
    context: SimContext
    nbytes: int
    freed: bool = False


@dataclass
class SimContext:
    gpu: SimGPU
    name: str
    queue: deque = field(default_factory=deque)
    busy_ns: int = 0
    kernels_done: int = 0
    mem_used: int = 0

    def launch(
        self,
        duration_ns: int,
        tag: str = "",
        on_start: Callable[[int], None] | None = None,
        on_done: Callable[[int], None] | None = None,
    ) -> Kernel:
        """Enqueue a kernel; its duration gets the GPU's seeded jitter."""
        if duration_ns <= 0:
            raise ValueError(f"kernel duration must be positive, got {duration_ns} ns")
        d = self.gpu.jittered(duration_ns)
        k = Kernel(d, tag, on_start, on_done, remaining_ns=d)
        self.queue.append(k)
        return k

    def wait_value(self, read: Callable[[], int], value: int) -> None:
        """Enqueue a stream wait: later operations run only once ``read() == value``."""
        self.queue.append(Wait(read, value))

    def marker(self, callback: Callable[[int], None]) -> None:
        """Enqueue a marker: ``callback(now)`` runs when the stream reaches it."""
        self.queue.append(Marker(callback))

    def pending(self) -> int:
        return len(self.queue)

    def runnable(self) -> bool:
        return bool(self.queue) and isinstance(self.queue[0], Kernel)

    def blocked(self) -> bool:
        """True when the stream front is a wait that is not satisfied."""
        return bool(self.queue) and isinstance(self.queue[0], Wait)

    def malloc(self, nbytes: int) -> Allocation:
        return self.gpu.malloc(self, nbytes)


class SimGPU:
    """One simulated GPU. All times are integer nanoseconds of virtual time."""

    def __init__(
        self,
        name: str = "sim-gpu-0",
        uuid: str = "GPU-00000000-0000-4000-8000-000000000000",
        slice_ns: int = 2 * MS,
        switch_ns: int = 25 * US,
        capacity_bytes: int = 80 << 30,
        jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        if slice_ns <= 0 or switch_ns < 0 or capacity_bytes <= 0 or jitter < 0:
            raise ValueError("slice_ns and capacity_bytes must be positive; switch_ns and jitter non-negative")
        self.name, self.uuid = name, uuid
        self.slice_ns, self.switch_ns, self.capacity_bytes, self.jitter = slice_ns, switch_ns, capacity_bytes, jitter
        self.rng = random.Random(seed)
        self.now = 0
        self.contexts: list[SimContext] = []
        self.owner: SimContext | None = None
        self.slice_end = 0
        self.switch_until = 0
        self.switches = 0
        self._owner_running = False
        self._timers: list[tuple[int, int, Callable[[int], None]]] = []
        self._seq = itertools.count()

    # ---- setup -------------------------------------------------------------------------------------------
    def context(self, name: str) -> SimContext:
        ctx = SimContext(self, name)
        self.contexts.append(ctx)
        return ctx

    def jittered(self, duration_ns: int) -> int:
        if not self.jitter:
            return int(duration_ns)
        return max(1, int(duration_ns * math.exp(self.rng.gauss(-self.jitter**2 / 2, self.jitter))))

    # ---- host callbacks ----------------------------------------------------------------------------------
    def at(self, t_ns: int, fn: Callable[[int], None]) -> None:
        """Run ``fn(now)`` on the host at virtual time ``t_ns`` (not before now)."""
        heapq.heappush(self._timers, (max(int(t_ns), self.now), next(self._seq), fn))

    def after(self, dt_ns: int, fn: Callable[[int], None]) -> None:
        self.at(self.now + int(dt_ns), fn)

    # ---- memory ------------------------------------------------------------------------------------------
    @property
    def mem_used(self) -> int:
        return sum(c.mem_used for c in self.contexts)

    @property
    def mem_free(self) -> int:
        return self.capacity_bytes - self.mem_used

    def malloc(self, ctx: SimContext, nbytes: int) -> Allocation:
        if nbytes <= 0:
            raise ValueError(f"allocation size must be positive, got {nbytes}")
        if nbytes > self.mem_free:
            raise SimOutOfMemory(
                f"{self.name}: out of memory: {ctx.name} asked for {nbytes} bytes, "
                f"{self.mem_free} of {self.capacity_bytes} free"
            )
        ctx.mem_used += nbytes
        return Allocation(ctx, nbytes)

    def free(self, alloc: Allocation) -> None:
        if alloc.freed:
            raise ValueError("double free of a simulated allocation")
        alloc.freed = True
        alloc.context.mem_used -= alloc.nbytes

    # ---- the event loop ----------------------------------------------------------------------------------
    def _settle(self) -> None:
        """Retire instantaneous stream operations, then make sure a runnable context owns the GPU."""
        progressed = True
        while progressed:
            progressed = False
            for ctx in self.contexts:
                q = ctx.queue
                while q and not isinstance(q[0], Kernel):
                    op = q[0]
                    if isinstance(op, Wait):
                        if op.read() != op.value:
                            break
                        q.popleft()
                    else:
                        q.popleft()
                        op.callback(self.now)
                    progressed = True
        if self.owner is None or not self.owner.runnable():
            nxt = self._next_runnable()
            if nxt is not None:
                self._switch_to(nxt)
        elif not self._owner_running:  # the owner had gone idle and has work again: a fresh slice
            self._switch_to(self.owner)

    def _next_runnable(self) -> SimContext | None:
        n = len(self.contexts)
        start = self.contexts.index(self.owner) + 1 if self.owner in self.contexts else 0
        for i in range(n):
            ctx = self.contexts[(start + i) % n]
            if ctx.runnable() and ctx is not self.owner:
                return ctx
        return self.owner if self.owner is not None and self.owner.runnable() else None

    def _switch_to(self, ctx: SimContext) -> None:
        if ctx is not self.owner:
            if self.owner is not None:
                self.switches += 1
                self.switch_until = self.now + self.switch_ns
            self.owner = ctx
        self.slice_end = max(self.now, self.switch_until) + self.slice_ns
        self._owner_running = True

    def _contended(self) -> bool:
        return any(c.runnable() for c in self.contexts if c is not self.owner)

    def run_until(self, t_end: int) -> None:
        """Advance virtual time to ``t_end``, running kernels and host callbacks in order."""
        while True:
            self._settle()
            owner = self.owner
            running = owner is not None and owner.runnable()
            self._owner_running = running
            t_next = t_end
            if self._timers:
                t_next = min(t_next, self._timers[0][0])
            if running:
                k = owner.queue[0]
                begin = max(self.now, self.switch_until)
                t_next = min(t_next, begin + k.remaining_ns)
                if self._contended():
                    t_next = min(t_next, self.slice_end)
                elif self.slice_end <= self.now:  # uncontended: slices roll on, so a newcomer waits 0..slice
                    self.slice_end += -(-(self.now - self.slice_end + 1) // self.slice_ns) * self.slice_ns
            if t_next < self.now:
                t_next = self.now
            if running:
                begin = max(self.now, self.switch_until)
                if t_next > begin:
                    k = owner.queue[0]
                    if k.start_ns < 0:
                        k.start_ns = begin
                        if k.on_start:
                            k.on_start(begin)
                    ran = t_next - begin
                    k.remaining_ns -= ran
                    owner.busy_ns += ran
            self.now = t_next
            if running and owner.queue and owner.queue[0].remaining_ns <= 0:
                k = owner.queue.popleft()
                k.end_ns = self.now
                owner.kernels_done += 1
                if k.on_done:
                    k.on_done(self.now)
            elif running and self.now >= self.slice_end and self._contended():
                self._switch_to(self._next_runnable())
            fired = False
            while self._timers and self._timers[0][0] <= self.now:
                _, _, fn = heapq.heappop(self._timers)
                fn(self.now)
                fired = True
            if self.now >= t_end and not fired and not self._due_now():
                self._settle()
                return

    def _due_now(self) -> bool:
        """Whether anything can still happen at this instant (an instant op or a zero-length kernel)."""
        return any(c.queue and not isinstance(c.queue[0], Kernel) and not c.blocked() for c in self.contexts)

    def idle(self) -> bool:
        return not any(c.runnable() for c in self.contexts)
