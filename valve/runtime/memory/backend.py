"""The interfaces the memory backends (``memory.cuda``, ``memory.sim``) implement, and what they return.

``MemoryBackend``: what the pool needs from a device. ``GpuMemoryInfo``: what the arbiter's memory controller reads
each loop. A leaf module, so backends, pool and controller depend on it and not on each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class MemoryBackend(Protocol):
    """What the pool needs from a device: a virtual range, chunk (un)mapping and stream-ordered copies."""

    name: str
    granularity: int  # chunk sizes must be a multiple of this

    def reserve(self, nbytes: int) -> None: ...  # reserve the virtual range [0, nbytes)

    def map(self, offsets: Sequence[int], nbytes: int) -> None: ...  # back each [off, off + nbytes)

    def unmap(self, offsets: Sequence[int], nbytes: int) -> None: ...  # release their physical memory

    def copy(self, dst: int, src: int, nbytes: int) -> None: ...  # stream-ordered device-to-device copy

    # optional: copy_many([(dst, src, nbytes), ...]), the same as copy() for each, with less overhead per copy

    def fence(self) -> object: ...  # a marker after everything queued so far on the stream

    def wait(self, fence: object) -> None: ...  # block the host until the stream has passed the marker

    def byte_tensor(self, nbytes: int): ...  # a torch uint8 tensor over [0, nbytes)

    def close(self) -> None: ...


@dataclass(frozen=True)
class MemorySnapshot:
    total_bytes: int
    free_bytes: int
    online_bytes: int | None = None  # what the online processes hold, when known


class GpuMemoryInfo(Protocol):
    """What the controller reads each loop: NVML on a real GPU (``memory.cuda.NvmlGpuInfo``), a SimGPU in the
    simulator (``memory.sim.SimGpuInfo``)."""

    def snapshot(self) -> MemorySnapshot: ...
