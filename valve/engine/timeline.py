"""Where an online request's time to first token goes: the server's ``--timeline`` records, one JSON line per request.

From arrival at the server to the first token's SSE chunk, in order (seconds, host clock):
- ``signal``: entering the online signal (Valve: telling the arbiter; otherwise nothing);
- ``queue``: until the engine step that first schedules the request starts (the step in flight ends first);
- ``host_prep``: that step's scheduling and input building, up to its first launch;
- ``gpu_wait``: from the first launch until the GPU starts the step's work (another context's time slice, offline
  kernels already running or queued ahead of it);
- ``gpu``: the step's work on the GPU, first to last kernel (slower when it shares the SMs or the clock drops);
- ``sync``: from the GPU's end to the sampled token on the host;
- ``more_steps``: further prefill steps when the prompt took more than one;
- ``deliver``: from the engine thread to the SSE chunk leaving the event loop.
``sm_mhz``/``power_w``: the SM clock and board power sampled at arrival and averaged until the first token.

GPU times are CUDA events mapped onto the host clock by ``DeviceClock``.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time


class DeviceClock:
    """CUDA event times on the host's ``perf_counter`` clock. An event recorded and waited for right away finished
    at most a little before the host saw it (later if the GPU was busy with another context): the smallest offset
    over many calibrations is the best mapping."""

    def __init__(self, calibrations: int = 20) -> None:
        import torch

        self._torch = torch
        self.ref = torch.cuda.Event(enable_timing=True)
        self.ref.record()
        self.offset: float | None = None
        self.calibrate(calibrations)

    def calibrate(self, n: int = 1) -> None:
        for _ in range(n):
            ev = self._torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            off = time.perf_counter() - self.ref.elapsed_time(ev) / 1e3
            self.offset = off if self.offset is None else min(self.offset, off)

    def host(self, event) -> float:
        return self.offset + self.ref.elapsed_time(event) / 1e3


class ClockSampler:
    """The GPU's SM clock (MHz) and board power (W) from NVML every ``period`` seconds, on a thread."""

    def __init__(self, index: int | None = None, period: float = 0.005, keep: int = 100_000) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(visible_index() if index is None else index)
        self.period = period
        self.samples: collections.deque = collections.deque(maxlen=keep)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clock-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nv, h = self.nvml, self.handle
        while not self._stop.wait(self.period):
            self.samples.append((time.perf_counter(), nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                                 nv.nvmlDeviceGetPowerUsage(h) / 1000))

    def window(self, t0: float, t1: float) -> dict:
        """The sample last before ``t0`` and the mean over [t0, t1]."""
        samples = list(self.samples)
        before = [s for s in samples if s[0] <= t0]
        inside = [s for s in samples if t0 <= s[0] <= t1] or before[-1:]
        out = {"sm_mhz_arrival": before[-1][1] if before else None, "power_w_arrival": before[-1][2] if before else None}
        out["sm_mhz_mean"] = sum(s[1] for s in inside) / len(inside) if inside else None
        out["power_w_mean"] = sum(s[2] for s in inside) / len(inside) if inside else None
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)


def visible_index() -> int:
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def components(arrive: float, submitted: float, admitted, first, sent: float, clock: DeviceClock | None) -> dict:
    """The parts of the server-side time to first token (the module's docstring); they add up to ``server_ttft``.
    ``admitted``/``first``: the ``StepTiming`` of the step that first scheduled the request and of the step that
    sampled its first token (the same step for a prompt prefilled at once). GPU parts are None without a clock."""
    out = {"signal": submitted - arrive, "queue": admitted.start - submitted,
           "host_prep": admitted.launch - admitted.start, "more_steps": first.launch - admitted.launch,
           "deliver": sent - first.done, "server_ttft": sent - arrive}
    if clock is not None and first.gpu_begin is not None:
        begin, end = clock.host(first.gpu_begin), clock.host(first.gpu_end)
        out.update(gpu_wait=begin - first.launch, gpu=end - begin, sync=first.done - end)
    else:  # no device clock: launch to sampled token is one part
        out.update(gpu_wait=None, gpu=None, sync=first.done - first.launch)
    return out


class TimelineWriter:
    """One JSON line per finished request; a lock, since the event loop and the engine thread both end requests."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        open(path, "a").close()  # noqa: SIM115 - created at start: a reader finds it even before the first request

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        with self._lock, open(self.path, "a") as f:
            f.write(line)


class Timeline:
    """The server's ``--timeline``: a device clock and a clock/power sampler on CUDA, a JSON line per request."""

    def __init__(self, path: str, cuda: bool) -> None:
        self.writer = TimelineWriter(path)
        self.clock = DeviceClock() if cuda else None
        self.sampler = None
        if cuda:
            try:
                self.sampler = ClockSampler()
            except Exception:  # noqa: BLE001 - no NVML here: the record says so with None
                self.sampler = None

    def idle(self) -> None:
        if self.clock is not None:
            self.clock.calibrate(1)

    def record(self, rid, prompt_tokens: int, arrive: float, sub, sent: float) -> None:
        if sub.admitted is None or sub.first is None:
            return
        rec = {"rid": rid, "prompt_tokens": prompt_tokens, "arrive": arrive,
               **components(arrive, sub.submitted, sub.admitted, sub.first, sent, self.clock)}
        rec.update(self.sampler.window(arrive, sent) if self.sampler else
                   {"sm_mhz_arrival": None, "power_w_arrival": None, "sm_mhz_mean": None, "power_w_mean": None})
        self.writer.write(rec)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
