"""The simulated memory backend: chunks are allocations on a :class:`~valve.runtime.sim.SimGPU`, data lives in
a CPU byte store, and every operation adds modelled device time.

- Memory: each mapped chunk is a ``SimGPU.malloc`` of the offline context, so another context (the online
  process) can allocate exactly what the pool gave back, and fails while it has not.
- Data: an anonymous private mapping the size of the reserved range (pages cost nothing until written). Copies
  move real bytes and unmapping discards them (reads return zeros), so tests can check data integrity and would
  see a block left behind in a released chunk. A copy that touches an unmapped chunk raises, like a fault.
- Time: ``elapsed_ns`` adds modelled costs per operation (defaults from H100 measurements: 28 ms to map 16 GiB
  and 19 ms to unmap 8 GiB in 32 MiB chunks, device copies at 3.0 TB/s counting bytes read and written).
- Ordering: ``record=True`` keeps a log of (op, args) so tests can check that chunks are unmapped only after
  a wait on a fence placed after the last copy.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from valve.runtime.memory.backend import MemorySnapshot
from valve.runtime.memory.errors import DeviceOutOfMemory
from valve.runtime.sim import SimContext, SimGPU, SimOutOfMemory

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; Python < 3.13 does not export it


@dataclass(frozen=True)
class SimCosts:
    map_chunk_ns: int = 55_000  # cuMemCreate + cuMemMap + cuMemSetAccess per chunk
    unmap_chunk_ns: int = 74_000  # cuMemUnmap + release per chunk
    copy_launch_ns: int = 4_000  # one cuMemcpyDtoDAsync call
    copy_bytes_per_s: float = 1.5e12  # payload bytes/s (3.0 TB/s counting read + write)
    wait_ns: int = 10_000  # event record + synchronize


class SimBackend:
    name = "sim"

    def __init__(
        self,
        gpu: SimGPU | None = None,
        context: str | SimContext = "offline",
        granularity: int = 2 << 20,
        store: bool = True,
        costs: SimCosts = SimCosts(),
        record: bool = False,
    ) -> None:
        self.gpu = gpu if gpu is not None else SimGPU(capacity_bytes=1 << 50)
        self.ctx = context if isinstance(context, SimContext) else self.gpu.context(context)
        self.granularity, self.store, self.costs = int(granularity), store, costs
        self.log: list[tuple] | None = [] if record else None
        self.elapsed_ns = 0
        self.size = 0
        self.mm: mmap.mmap | None = None
        self._allocs: dict[int, object] = {}
        self._chunk = 0
        self._fences = 0

    def _note(self, *op) -> None:
        if self.log is not None:
            self.log.append(op)

    def reserve(self, nbytes: int) -> None:
        if self.size:
            raise RuntimeError("the simulated backend reserves one range only")
        self.size = int(nbytes)
        if self.store:
            self.mm = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)

    def map(self, offsets, nbytes: int) -> None:
        done = []
        try:
            for off in offsets:
                if off in self._allocs:
                    raise RuntimeError(f"chunk at offset {off} is already mapped")
                if off % self.granularity or nbytes % self.granularity or off + nbytes > self.size:
                    raise ValueError(f"bad mapping [{off}, {off + nbytes}) for a {self.size}-byte range")
                self._allocs[off] = self.gpu.malloc(self.ctx, nbytes)
                done.append(off)
        except SimOutOfMemory as e:
            for off in done:
                self.gpu.free(self._allocs.pop(off))
            raise DeviceOutOfMemory(str(e)) from e
        self._chunk = nbytes
        self.elapsed_ns += len(done) * self.costs.map_chunk_ns
        for off in done:
            self._note("map", off)

    def unmap(self, offsets, nbytes: int) -> None:
        for off in offsets:
            alloc = self._allocs.pop(off, None)
            if alloc is None:
                raise RuntimeError(f"unmap of chunk at offset {off}, which is not mapped")
            self.gpu.free(alloc)
            if self.mm is not None:
                self.mm.madvise(mmap.MADV_DONTNEED, off, nbytes)  # the data is gone, as on a device
            self.elapsed_ns += self.costs.unmap_chunk_ns
            self._note("unmap", off)

    def is_mapped(self, off: int, nbytes: int) -> bool:
        if nbytes <= 0:
            return True
        if not self._chunk:
            return False
        first, last = off // self._chunk, (off + nbytes - 1) // self._chunk
        return all(c * self._chunk in self._allocs for c in range(first, last + 1))

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        if not (self.is_mapped(src, nbytes) and self.is_mapped(dst, nbytes)):
            raise RuntimeError(f"copy of {nbytes} bytes {src} -> {dst} touches unmapped memory (a page fault)")
        if self.mm is not None:
            self.mm.move(dst, src, nbytes)
        self.elapsed_ns += self.costs.copy_launch_ns + int(nbytes / self.costs.copy_bytes_per_s * 1e9)
        self._note("copy", dst, src, nbytes)

    def fence(self) -> int:
        self._fences += 1
        self._note("fence", self._fences)
        return self._fences

    def wait(self, fence: int) -> None:
        self.elapsed_ns += self.costs.wait_ns
        self._note("wait", fence)

    def byte_array(self, nbytes: int):
        """A numpy uint8 view of [0, nbytes) of the store (tests read and write blocks through it)."""
        import numpy as np

        if self.mm is None:
            raise RuntimeError("this simulated backend keeps no data (store=False)")
        return np.frombuffer(self.mm, dtype=np.uint8, count=nbytes)

    def byte_tensor(self, nbytes: int):
        import torch

        if self.mm is None:
            raise RuntimeError("this simulated backend keeps no data (store=False)")
        return torch.frombuffer(self.mm, dtype=torch.uint8, count=nbytes)

    def mapped_bytes(self) -> int:
        return len(self._allocs) * self._chunk

    def close(self) -> None:
        for off in list(self._allocs):
            self.gpu.free(self._allocs.pop(off))
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # views still exported: the mapping goes when they do
                pass


class SimGpuInfo:
    """``GpuMemoryInfo`` over a SimGPU: total and free memory, and what the online contexts hold."""

    def __init__(self, gpu: SimGPU, online: tuple[str, ...] = ("online",)) -> None:
        self.gpu, self.online = gpu, tuple(online)

    def snapshot(self) -> MemorySnapshot:
        held = sum(c.mem_used for c in self.gpu.contexts if c.name in self.online)
        return MemorySnapshot(self.gpu.capacity_bytes, self.gpu.mem_free, held)


# ---- one simulated device shared by processes -------------------------------------------------------------------
ENV_SIM_DEVICE = "VALVE_SIM_DEVICE"  # path of a SharedSimGPU file: the CPU stand-in for one GPU's memory
_HEAD = struct.Struct("=QQQ")  # magic, capacity, allocation granularity
_ENTRY = struct.Struct("=QQ")  # pid, bytes held
SHARED_MAGIC = 0x56534D31  # "VSM1"
SHARED_SLOTS = 64


@dataclass
class _SharedAlloc:
    nbytes: int
    freed: bool = False


class SharedSimGPU:
    """The memory of one simulated device, shared by processes through a small file (CPU runs of the benchmarks
    and tests): each process's bytes in a table under an ``flock``; an allocation that does not fit raises
    :class:`SimOutOfMemory`, as ``cuMemCreate`` fails when the device is full. A dead process's bytes count as
    freed (the driver frees them). Implements what :class:`SimBackend` needs (``context``, ``malloc``, ``free``)."""

    def __init__(self, path: str | os.PathLike, capacity_bytes: int | None = None,
                 granularity: int = 2 << 20) -> None:
        self.path = Path(path)
        if capacity_bytes is not None:  # create (or reset) the device
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(_HEAD.pack(SHARED_MAGIC, int(capacity_bytes), int(granularity))
                                  + bytes(_ENTRY.size * SHARED_SLOTS))
        data = self.path.read_bytes()
        magic, self.capacity_bytes, self.granularity = _HEAD.unpack_from(data)
        if magic != SHARED_MAGIC or len(data) != _HEAD.size + _ENTRY.size * SHARED_SLOTS:
            raise ValueError(f"{self.path} is not a simulated device file")

    def _table(self, f) -> dict[int, int]:
        f.seek(0)
        data = f.read()
        out = {}
        for i in range(SHARED_SLOTS):
            pid, n = _ENTRY.unpack_from(data, _HEAD.size + i * _ENTRY.size)
            if pid and n and _alive(pid):
                out[pid] = out.get(pid, 0) + n
        return out

    def _write(self, f, table: dict[int, int]) -> None:
        rows = [(p, n) for p, n in table.items() if n > 0]
        if len(rows) > SHARED_SLOTS:
            raise RuntimeError(f"more than {SHARED_SLOTS} processes on the simulated device {self.path}")
        f.seek(_HEAD.size)
        f.write(b"".join(_ENTRY.pack(p, n) for p, n in rows) + bytes(_ENTRY.size * (SHARED_SLOTS - len(rows))))
        f.flush()

    def _change(self, delta: int) -> None:
        with open(self.path, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            table = self._table(f)
            used = sum(table.values())
            if delta > 0 and used + delta > self.capacity_bytes:
                raise SimOutOfMemory(f"simulated device {self.path.name}: {delta} bytes asked, "
                                     f"{self.capacity_bytes - used} of {self.capacity_bytes} free")
            pid = os.getpid()
            table[pid] = max(0, table.get(pid, 0) + delta)
            self._write(f, table)

    def used_by(self) -> dict[int, int]:
        with open(self.path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            return self._table(f)

    @property
    def mem_used(self) -> int:
        return sum(self.used_by().values())

    @property
    def mem_free(self) -> int:
        return max(0, self.capacity_bytes - self.mem_used)

    def context(self, name: str) -> str:
        return name

    def malloc(self, ctx, nbytes: int) -> _SharedAlloc:
        self._change(int(nbytes))
        return _SharedAlloc(int(nbytes))

    def free(self, alloc: _SharedAlloc) -> None:
        if not alloc.freed:
            alloc.freed = True
            self._change(-alloc.nbytes)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedSimGpuInfo:
    """``GpuMemoryInfo`` of a :class:`SharedSimGPU` (the arbiter's view on CPU): total and free bytes; like NVML
    without per-process figures, what online holds is left to the online client's report."""

    def __init__(self, gpu: SharedSimGPU) -> None:
        self.gpu = gpu

    def snapshot(self) -> MemorySnapshot:
        return MemorySnapshot(self.gpu.capacity_bytes, self.gpu.mem_free, None)


def shared_sim_gpu() -> SharedSimGPU | None:
    """The simulated device named by ``VALVE_SIM_DEVICE``, if set."""
    path = os.environ.get(ENV_SIM_DEVICE)
    return SharedSimGPU(path) if path else None
