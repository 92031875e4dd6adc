"""The simulated gate backend: the offline client's waits and marks on a :class:`~valve.runtime.sim.SimGPU` context.

The wait reads the same control block's gate word as the CUDA backend does, so the arbiter, the online signal and
the offline :class:`~valve.runtime.gate.offline.Gate` run unchanged on the simulator. A marker before each wait
records when the stream reaches a closed gate (``parked_seq``/``parked_ns``: offline has yielded the GPU), which
the arbiter turns into the preemption latency.
"""

from __future__ import annotations

from collections.abc import Callable

from valve.runtime.control import GATE_OPEN, ControlBlock
from valve.runtime.sim import SimContext


class SimGateBackend:
    name = "sim"
    can_block = False  # the simulator is single-threaded: drivers call Gate.room()/poll() from timers

    def __init__(self, ctx: SimContext, cb: ControlBlock | None = None,
                 on_mark: Callable[[int], None] | None = None) -> None:
        self.ctx, self.gpu, self.cb = ctx, ctx.gpu, cb
        self.on_mark = on_mark  # called when the stream reaches a mark: the offline driver queues more there

    def bind(self, cb: ControlBlock) -> SimGateBackend:
        self.cb = cb
        return self

    def wait(self, stream=None) -> None:
        f = self.cb.fields

        def arrive(now: int) -> None:
            if f.gate != GATE_OPEN:
                f.parked_ns = now
                f.parked_seq += 1

        self.ctx.marker(arrive)
        self.ctx.wait_value(lambda: f.gate, GATE_OPEN)

    def mark(self, stream=None) -> list[bool]:
        flag = [False]

        def reached(now: int) -> None:
            flag[0] = True
            if self.on_mark is not None:
                self.on_mark(now)

        self.ctx.marker(reached)
        return flag

    def reached(self, mark: list[bool]) -> bool:
        return mark[0]

    def now_ns(self) -> int:
        return self.gpu.now
