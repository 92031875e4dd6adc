"""GPU utilisation as NVML reports it, sampled on a thread (no CUDA context in the sampling process)."""

from __future__ import annotations

import threading

from bench.harness import env


class UtilSampler:
    """Mean GPU utilisation (NVML) over a window, sampled every 100 ms on a thread; None on CPU."""

    def __init__(self, device: str) -> None:
        self.device, self.samples = device, []
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> UtilSampler:
        if self.device == "cuda":
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(env.visible_index())
            while not self._stop.wait(0.1):
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
        finally:
            pynvml.nvmlShutdown()

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        return sum(self.samples) / len(self.samples) if self.samples else None


# ---- measurements -----------------------------------------------------------------------------------------------
