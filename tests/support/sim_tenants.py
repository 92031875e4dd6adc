"""An online and an offline tenant on one simulated GPU with the real arbiter (enforcement on), for the enforced
gate's tests and the chaos suite. The offline tenant is ``gated`` (the sim gate backend), ``skip`` (launches
without any gate) or ``broken`` (calls the gate, whose waits do not wait)."""

from __future__ import annotations

import random

from valve.api.runtime import RuntimeSpec
from valve.runtime.arbiter.enforce import ContextBusySampler, Enforcement
from valve.runtime.arbiter.loop import Arbiter
from valve.runtime.arbiter.policy import MS, EnforcePolicy
from valve.runtime.control import ControlBlock
from valve.runtime.gate.offline import Gate
from valve.runtime.gate.sim import SimGateBackend
from valve.runtime.online.signal import OnlineSignal
from valve.runtime.sim import US, SimGPU

ROGUE_PID = 4242  # what a gate-skipping tenant publishes (the sim pauser never signals it)


class BrokenGateBackend(SimGateBackend):
    """Marks as usual, but the wait is gone: the tenant counts gates it never waits at."""

    def wait(self, stream=None) -> None:
        pass


class SimTenants:
    def __init__(self, offline: str = "gated", mode: str = "pause", seed: int = 0, grace_ms: float = 10.0,
                 period_ms: float = 2.0, busy: bool = True, sublayer_us: int = 300, queue: int = 2) -> None:
        self.gpu = SimGPU(seed=seed, jitter=0.05)
        self.rng = random.Random(seed)
        self.cb = ControlBlock.anonymous()
        self.off, self.on = self.gpu.context("offline"), self.gpu.context("online")
        self.policy = EnforcePolicy(mode, grace_ns=int(grace_ms * MS), busy_threshold=0.2)
        self.enforce = Enforcement(self.policy, ContextBusySampler(self.off) if busy else None, pauser=self,
                                   period_ns=int(period_ms * MS))
        self.arbiter = Arbiter(self.cb, RuntimeSpec(), enforce=self.enforce)
        self.sig = OnlineSignal(self.cb, clock=lambda: self.gpu.now)
        self.kind, self.sublayer_ns, self.queue = offline, sublayer_us * US, queue
        self.paused = False
        self.pauses: list[tuple[str, int]] = []  # ("pause" | "resume", time)
        self.queued = 0
        self.gate = None
        if offline in ("gated", "broken"):
            backend = (SimGateBackend if offline == "gated" else BrokenGateBackend)(self.off, on_mark=self.enqueue)
            self.gate = Gate(self.cb, backend=backend, queue_ahead=queue)
        else:
            self.cb.fields.offline_pid = ROGUE_PID
        self.bursts: list[tuple[int, int]] = []  # (begin, end) of each online burst
        self.gpu.at(0, self._arbiter_step)
        self.gpu.at(0, self.enqueue)

    # ---- the sim pauser (Enforcement calls it in place of signals) -----------------------------------------
    def pause(self, pid: int) -> str | None:
        self.paused = True
        self.pauses.append(("pause", self.gpu.now))
        return None

    def resume(self, pid: int) -> str | None:
        self.paused = False
        self.pauses.append(("resume", self.gpu.now))
        self.gpu.after(0, self.enqueue)
        return None

    # ---- tenants -------------------------------------------------------------------------------------------
    def _arbiter_step(self, now: int) -> None:
        self.arbiter.step(now)
        self.gpu.after(MS, self._arbiter_step)

    def enqueue(self, now: int) -> None:
        if self.paused:
            return
        if self.gate is not None:
            while self.gate.poll():
                self.gate()
                self.off.launch(self.sublayer_ns, "offline")
            return
        while self.queued < self.queue:
            self.queued += 1
            self.off.launch(self.sublayer_ns, "offline", on_done=self._done)

    def _done(self, now: int) -> None:
        self.queued -= 1
        self.enqueue(now)

    def burst(self, at_ns: int, kernels: int, kernel_us: int = 500) -> None:
        """An online request at ``at_ns``: ``kernels`` back-to-back kernels, signalled begin to end."""

        def begin(now: int) -> None:
            self.sig.begin()
            for i in range(kernels):
                self.on.launch(kernel_us * US, "online", on_done=end if i == kernels - 1 else None)

        def end(now: int) -> None:
            self.sig.end()
            self.bursts.append((at_ns, now))

        self.gpu.at(at_ns, begin)

    def random_bursts(self, n: int, start_ns: int = 20 * MS) -> int:
        """``n`` bursts of 5..40 kernels with 10..40 ms gaps; returns when the last one is due to have ended."""
        t = start_ns
        for _ in range(n):
            kernels = self.rng.randint(5, 40)
            self.burst(t, kernels)
            t += kernels * 600 * US + self.rng.randint(10, 40) * MS
        return t

    def violations(self) -> list[tuple[int, str]]:
        return [(t, a.reason) for t, a in self.enforce.events if a.kind == "violation"]
