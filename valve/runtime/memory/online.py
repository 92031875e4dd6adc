"""The online side of the memory protocol: ask the arbiter for device memory before taking it.

An online engine whose KV cache grows with its load (``valve.engine.elastic``) calls :meth:`OnlineMemory.ask`
before it maps more memory: it writes what it holds (``online_held_bytes``) and what it wants
(``online_mem_bytes`` = held + the growth) into the control block. The arbiter's ``MemoryController`` counts the
difference as pending demand: free memory must cover the reserve plus that, so it lowers the offline limit and
posts a reclaim for the gap; the offline client releases pool chunks at its next boundary. ``ask`` returns once
the free memory, less what the offline pool was granted and has not taken yet, covers the growth (or after
``timeout_s``: the engine then tries anyway, and a failed allocation counts as an out-of-memory). After mapping or
releasing, :meth:`report` sets both words to what it holds. One online engine per control block writes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class OnlineMemory:
    def __init__(self, cb, free_bytes: Callable[[], int], timeout_s: float = 5.0, poll_s: float = 0.0005) -> None:
        self.cb, self.free_bytes = cb, free_bytes
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.held = 0
        self.asks = self.timeouts = 0
        self.waits_s: list[float] = []  # per ask: how long the engine waited for the memory

    def room(self) -> int:
        """Free device memory that the offline pool may not take: free less its unused grant."""
        f = self.cb.fields
        return self.free_bytes() - max(0, int(f.offline_limit_bytes) - int(f.offline_pool_bytes))

    def report(self, held: int) -> None:
        """What the engine holds now (after mapping or releasing); no more is asked for."""
        f = self.cb.fields
        if held < self.held:  # wanted first: the arbiter must never read wanted < held as demand still pending
            f.online_mem_bytes, f.online_held_bytes = held, held
        else:
            f.online_held_bytes, f.online_mem_bytes = held, held
        self.held = held

    def ask(self, nbytes: int) -> bool:
        """Ask for ``nbytes`` more than held and wait until they are free. False: not within ``timeout_s``."""
        f = self.cb.fields
        f.online_held_bytes = self.held
        f.online_mem_bytes = self.held + int(nbytes)
        self.asks += 1
        t0 = time.monotonic()
        while self.room() < nbytes:
            if time.monotonic() - t0 >= self.timeout_s:
                self.timeouts += 1
                self.waits_s.append(time.monotonic() - t0)
                return False
            time.sleep(self.poll_s)
        self.waits_s.append(time.monotonic() - t0)
        return True


def device_free_bytes(backend) -> Callable[[], int]:
    """A function giving the device's free memory for a pool backend: the simulated device's ledger, else the
    CUDA driver's (``cudaMemGetInfo``, which counts every process)."""
    gpu = getattr(backend, "gpu", None)
    if gpu is not None and hasattr(gpu, "mem_free"):
        return lambda: int(gpu.mem_free)
    import torch

    return lambda: int(torch.cuda.mem_get_info()[0])
