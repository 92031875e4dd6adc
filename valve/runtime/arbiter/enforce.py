"""The enforced gate's I/O: evidence for :class:`~valve.runtime.arbiter.policy.EnforcePolicy` and its actions.

Evidence, gathered every arbiter step (marks) and every ``period_ns`` (busy samples):

- gate marks: the offline client's ``offline_progress`` counter (any gate backend, no GPU access needed);
- busy samples of the offline process, from one sampler: ``NvmlBusySampler`` (``nvmlDeviceGetProcessUtilization``,
  pids as NVML sees them), ``ContextBusySampler`` (a simulated GPU context), ``CpuTimeSampler`` (``/proc``: for
  the host gate backend, where the tenant's device is the CPU).

Actions: a violation adds to ``valve_gate_violations_total`` and the control block's ``violations`` /
``violation_ns`` and logs one line; a pause sends SIGSTOP to the pid the offline client published
(``offline_pid``), recorded in ``paused_pid`` so a restarted arbiter can send the SIGCONT a dead one owed.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

from valve.runtime.arbiter.policy import Action, EnforcePolicy, GatePolicy

log = logging.getLogger(__name__)
MS = 1_000_000


class ContextBusySampler:
    """Samplers return ``[(start_ns, busy share)]``: one entry per sample taken since the last call.

    A simulated GPU context's share of GPU time since the last sample."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self._last: tuple[int, int] | None = None

    def sample(self, now: int, pid: int) -> list[tuple[int, float]]:
        last, self._last = self._last, (now, self.ctx.busy_ns)
        if last is None or now <= last[0]:
            return []
        return [(last[0], (self.ctx.busy_ns - last[1]) / (now - last[0]))]


class CpuTimeSampler:
    """The pid's CPU time share since the last sample (``/proc/<pid>/stat``; clock-tick resolution, so use a
    period of 100 ms or more)."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self.tick = os.sysconf("SC_CLK_TCK")
        self._last: tuple[int, int, int] | None = None  # pid, time, cpu ticks

    def _ticks(self, pid: int) -> int | None:
        try:
            with open(f"{self.proc}/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)

    def sample(self, now: int, pid: int) -> list[tuple[int, float]]:
        ticks = self._ticks(pid) if pid > 0 else None
        last, self._last = self._last, (None if ticks is None else (pid, now, ticks))
        if ticks is None or last is None or last[0] != pid or now <= last[1]:
            return []
        return [(last[1], (ticks - last[2]) / self.tick * 1e9 / (now - last[1]))]


class NvmlBusySampler:
    """The offline pids' SM utilisation from ``nvmlDeviceGetProcessUtilization``: the highest ``smUtil`` among
    their samples newer than the last call. NVML stamps samples in wall-clock microseconds and averages each over
    its own sample period (driver-chosen), so a sample's start is taken as the previous sample's stamp (1 s before
    it for the first: never earlier evidence than there is)."""

    FIRST_PERIOD_NS = 1_000_000_000

    def __init__(self, gpu: str, nvml=None, pids: Callable[[int], set[int]] | None = None) -> None:
        if nvml is None:
            import pynvml as nvml

            nvml.nvmlInit()
        self.nvml = nvml
        self.handle = (nvml.nvmlDeviceGetHandleByUUID(gpu) if gpu.startswith(("GPU-", "MIG-"))
                       else nvml.nvmlDeviceGetHandleByIndex(int(gpu)))
        self.pids = pids or (lambda pid: {pid} if pid > 0 else set())
        self._seen_us = 0  # newest stamp read so far
        self._last_us: int | None = None  # the newest sample stamp, and the one before it
        self._before_us: int | None = None

    def sample(self, now: int, pid: int) -> list[tuple[int, float]]:
        nv = self.nvml
        try:
            samples = nv.nvmlDeviceGetProcessUtilization(self.handle, self._seen_us)
        except nv.NVMLError as e:
            if isinstance(e, getattr(nv, "NVMLError_NotFound", ())):  # no sample since the last call
                return []
            raise
        pids = self.pids(pid)
        wall_to_mono = time.time_ns() - time.monotonic_ns()
        out = []
        for s in sorted((s for s in samples if int(s.timeStamp) > self._seen_us), key=lambda s: int(s.timeStamp)):
            stamp = int(s.timeStamp)
            if self._last_us is None or stamp > self._last_us:
                self._before_us, self._last_us = self._last_us, stamp
            start_us = self._before_us if self._before_us is not None else stamp - self.FIRST_PERIOD_NS // 1000
            if int(s.pid) in pids:
                out.append((start_us * 1000 - wall_to_mono, int(s.smUtil) / 100.0))
        if self._last_us is not None:
            self._seen_us = self._last_us
        return out


class SignalPauser:
    """SIGSTOP / SIGCONT. Another uid's process needs CAP_KILL; a pid namespace shared with the tenant (the
    offline pod's ``shareProcessNamespace``) makes its pid visible."""

    def pause(self, pid: int) -> str | None:
        return self._send(pid, signal.SIGSTOP)

    def resume(self, pid: int) -> str | None:
        return self._send(pid, signal.SIGCONT)

    @staticmethod
    def _send(pid: int, sig: int) -> str | None:
        if pid <= 1 or pid == os.getpid():
            return f"refusing to signal pid {pid}"
        try:
            os.kill(pid, sig)
        except OSError as e:
            return f"{e.strerror} (pid {pid}, this process runs as uid {os.geteuid()})"
        return None


class Enforcement:
    """Runs inside :meth:`Arbiter.step`: reads the marks every step, a busy sample every ``period_ns``."""

    def __init__(self, policy: EnforcePolicy, sampler=None, pauser=None, metrics=None,
                 period_ns: int = 20 * MS) -> None:
        self.policy, self.sampler, self.metrics = policy, sampler, metrics
        self.pauser = pauser if pauser is not None else SignalPauser()
        self.period_ns = period_ns
        self._next_sample = 0
        self.events: list[tuple[int, Action]] = []  # (time, action), for tests and benchmarks

    def start(self, f, now: int) -> None:
        """A previous arbiter died with the tenant stopped: resume it."""
        pid = int(f.paused_pid)
        if pid:
            log.warning("offline pid %d was left paused by a previous arbiter: resuming it", pid)
            self._act(Action("resume", pid), f, now)

    def step(self, now: int, f, gate: GatePolicy) -> None:
        pid, closed_at = int(f.offline_pid), gate.closed_at
        samples: list[tuple[int, float | None]] = []
        if self.sampler is not None and now >= self._next_sample:
            self._next_sample = now + self.period_ns
            samples = self.sampler.sample(now, pid)
        marks = int(f.offline_progress)
        for since, busy in samples or [(0, None)]:
            for action in self.policy.observe(closed_at, marks, pid, busy, since):
                self._act(action, f, now)

    def shutdown(self, f, now: int) -> None:
        for action in self.policy.opened():
            self._act(action, f, now)

    def _act(self, a: Action, f, now: int) -> None:
        self.events.append((now, a))
        m = self.metrics
        if a.kind == "violation":
            f.violations += 1
            f.violation_ns = now
            if m is not None:
                m.violations.inc()
            log.warning("gate violation: offline pid %d %s", a.pid, a.reason)
        elif a.kind == "pause":
            err = self.pauser.pause(a.pid)
            if err:
                self.policy.pause_failed()
                log.error("cannot pause offline pid %d: %s", a.pid, err)
                return
            f.paused_pid = a.pid
            if m is not None:
                m.paused.set(1)
            log.warning("paused offline pid %d (SIGSTOP) until the gate opens", a.pid)
        elif a.kind == "resume":
            err = self.pauser.resume(a.pid)
            f.paused_pid = 0
            if m is not None:
                m.paused.set(0)
            if err:
                log.error("cannot resume offline pid %d: %s", a.pid, err)
            else:
                log.info("resumed offline pid %d (SIGCONT): the gate is open", a.pid)
