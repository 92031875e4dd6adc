"""The CUDA memory backend (virtual memory management) and NVML memory readings for the arbiter.

``CudaBackend``: one virtual range from ``cuMemAddressReserve``; each chunk is a ``cuMemCreate`` allocation
(pinned device memory, size a multiple of ``cuMemGetAllocationGranularity``) mapped with ``cuMemMap`` and made
read-write with ``cuMemSetAccess`` (once per run of adjacent chunks). The handle is released right after mapping,
so ``cuMemUnmap`` alone gives the physical memory back to the driver; adjacent victim chunks go in one cuMemUnmap
(``batch_unmap``, off by default; falls back to one call per chunk if the driver refuses a range over several
mappings). Copies are ``cuMemcpyDtoDAsync`` on
the torch current stream (or the stream given), fences are torch CUDA events. The torch view of the range comes
from ``__cuda_array_interface__`` (``torch.as_tensor``). Every CUresult is checked and raised with its context.

Imported lazily: needs torch and cuda-python (``valve[cuda]``); ``NvmlGpuInfo`` needs only pynvml.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from valve.runtime.cuda import CudaError, check, driver, ensure_context
from valve.runtime.memory.backend import MemorySnapshot
from valve.runtime.memory.errors import DeviceOutOfMemory

log = logging.getLogger(__name__)


def runs(offsets: Sequence[int], nbytes: int) -> list[tuple[int, int]]:
    """Group chunk offsets into runs of adjacent chunks: [(first offset, chunk count)], ascending."""
    out: list[list[int]] = []
    for off in sorted(int(o) for o in offsets):
        if out and off == out[-1][0] + out[-1][1] * nbytes:
            out[-1][1] += 1
        else:
            out.append([off, 1])
    return [(a, n) for a, n in out]


class _ArrayInterface:
    """Holder of ``__cuda_array_interface__`` for torch.as_tensor (kept alive by the tensor's deleter)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": (nbytes,), "typestr": "|u1",
                                         "strides": None, "version": 2}


class CudaBackend:
    name = "cuda"

    def __init__(self, device: int | None = None, stream=None, batch_unmap: bool = False,
                 batch_access: bool = True) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the CUDA memory backend needs a CUDA device (torch.cuda.is_available() is False)")
        self.torch, self.cu = torch, driver()
        self.device = torch.cuda.current_device() if device is None else int(device)
        ensure_context(self.device)  # a torch allocation may bind no context on a new thread
        self.stream = stream  # None: the torch current stream at each call
        cu = self.cu
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device
        self.prop = prop
        desc = cu.CUmemAccessDesc()
        desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self.device
        desc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.access = desc
        self.granularity = int(check(cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            f"cuMemGetAllocationGranularity(device {self.device})"))
        self.base = 0
        self.size = 0
        self.mapped: set[int] = set()
        # adjacent chunks: one cuMemSetAccess / cuMemUnmap over the run instead of one per chunk. The unmap over
        # several mappings works on an H100 (driver 580) but saves < 10% (the cost is per allocation) and the
        # docs ask for "the entire range that was mapped": off by default
        self.batch_unmap, self.batch_access = bool(batch_unmap), bool(batch_access)
        self.unmap_calls = 0

    # ---- helpers -----------------------------------------------------------------------------------------
    def _ptr(self, off: int):
        return self.cu.CUdeviceptr(self.base + int(off))

    def _cu_stream(self):
        s = self.stream if self.stream is not None else self.torch.cuda.current_stream(self.device)
        return self.cu.CUstream(int(getattr(s, "cuda_stream", s)))

    def _is_oom(self, e: CudaError) -> bool:
        return e.code == int(self.cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY)

    # ---- the MemoryBackend protocol ----------------------------------------------------------------------
    def reserve(self, nbytes: int) -> None:
        if self.size:
            raise RuntimeError("CudaBackend reserves one range only")
        nbytes = -(-int(nbytes) // self.granularity) * self.granularity
        ptr = check(self.cu.cuMemAddressReserve(nbytes, self.granularity, 0, 0),
                    f"cuMemAddressReserve({nbytes} bytes)")
        self.base, self.size = int(ptr), nbytes

    def _what(self, off: int, nbytes: int) -> str:
        return f"chunk at offset {off} ({nbytes} bytes) of the range at {self.base:#x} on device {self.device}"

    def _map_one(self, off: int, nbytes: int, access: bool) -> None:
        """cuMemCreate + cuMemMap (+ cuMemSetAccess when ``access``); the handle is released right away: the
        mapping keeps the memory alive, so unmapping alone frees it."""
        cu = self.cu
        what = self._what(off, nbytes)
        handle = check(cu.cuMemCreate(nbytes, self.prop, 0), f"cuMemCreate, {what}")
        try:
            check(cu.cuMemMap(self._ptr(off), nbytes, 0, handle, 0), f"cuMemMap, {what}")
        finally:
            check(cu.cuMemRelease(handle), f"cuMemRelease (after mapping), {what}")
        if access:
            try:
                self._set_access(off, nbytes)
            except CudaError:
                cu.cuMemUnmap(self._ptr(off), nbytes)
                raise

    def _set_access(self, off: int, nbytes: int) -> None:
        check(self.cu.cuMemSetAccess(self._ptr(off), nbytes, [self.access], 1),
              f"cuMemSetAccess, [{off}, {off + nbytes}) of the range at {self.base:#x}")

    def map(self, offsets: Sequence[int], nbytes: int) -> None:
        """Map all chunks or none: on failure the ones mapped by this call are unmapped again. Access is set once
        per run of adjacent chunks (``batch_access``; the CUDA docs allow a range over several mappings)."""
        done: list[int] = []
        try:
            for off in offsets:
                if off in self.mapped:
                    raise RuntimeError(f"chunk at offset {off} is already mapped")
                if off % self.granularity or nbytes % self.granularity or off + nbytes > self.size:
                    raise ValueError(f"bad mapping [{off}, {off + nbytes}) for a {self.size}-byte range "
                                     f"(granularity {self.granularity})")
                self._map_one(off, nbytes, access=not self.batch_access)
                self.mapped.add(off)
                done.append(off)
            if self.batch_access:
                for start, n in runs(done, nbytes):
                    self._set_access(start, n * nbytes)
        except CudaError as e:
            self.unmap([off for off in done if off in self.mapped], nbytes)
            if self._is_oom(e):
                raise DeviceOutOfMemory(f"device {self.device} has no memory for {len(offsets)} chunks of "
                                        f"{nbytes} bytes: {e}") from e
            raise

    def unmap(self, offsets: Sequence[int], nbytes: int) -> None:
        """Unmap the chunks (their memory goes back to the driver). With ``batch_unmap``, one cuMemUnmap per run
        of adjacent chunks; if the driver refuses a range over several mappings, per chunk from then on."""
        for off in offsets:
            if off not in self.mapped:
                raise RuntimeError(f"unmap of chunk at offset {off}, which is not mapped")
        for start, n in runs(offsets, nbytes):
            self._unmap_run(start, n * nbytes, nbytes)

    def _unmap_run(self, start: int, total: int, nbytes: int) -> None:
        cu = self.cu
        if self.batch_unmap and total > nbytes:
            self.unmap_calls += 1
            r = cu.cuMemUnmap(self._ptr(start), total)
            err = r[0] if isinstance(r, tuple) else r
            if err == cu.CUresult.CUDA_SUCCESS:
                self.mapped.difference_update(range(start, start + total, nbytes))
                return
            if err != cu.CUresult.CUDA_ERROR_INVALID_VALUE:
                check(r, f"cuMemUnmap([{start}, {start + total}) over {total // nbytes} chunks, device "
                         f"{self.device})")
            log.warning("cuMemUnmap over %d adjacent mappings refused (CUDA_ERROR_INVALID_VALUE): unmapping "
                        "chunk by chunk from now on", total // nbytes)
            self.batch_unmap = False
        for off in range(start, start + total, nbytes):
            self.unmap_calls += 1
            check(cu.cuMemUnmap(self._ptr(off), nbytes),
                  f"cuMemUnmap(chunk at offset {off}, {nbytes} bytes, device {self.device})")
            self.mapped.discard(off)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        check(self.cu.cuMemcpyDtoDAsync(self._ptr(dst), self._ptr(src), nbytes, self._cu_stream()),
              f"cuMemcpyDtoDAsync({nbytes} bytes, offset {src} -> {dst})")

    def copy_many(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """``copy`` for each (dst, src, nbytes), with the stream and the pointers resolved once."""
        cu, base, ok = self.cu, self.base, self.cu.CUresult.CUDA_SUCCESS
        stream, ptr, memcpy = self._cu_stream(), cu.CUdeviceptr, cu.cuMemcpyDtoDAsync
        for dst, src, n in copies:
            r = memcpy(ptr(base + dst), ptr(base + src), n, stream)
            if r[0] != ok:
                check(r, f"cuMemcpyDtoDAsync({n} bytes, offset {src} -> {dst})")

    def fence(self):
        ev = self.torch.cuda.Event()
        ev.record(self.stream if self.stream is not None else self.torch.cuda.current_stream(self.device))
        return ev

    def wait(self, fence) -> None:
        try:
            fence.synchronize()
        except RuntimeError as e:
            raise RuntimeError(f"waiting for the offline stream before unmapping failed: {e}") from e

    def byte_tensor(self, nbytes: int):
        """A uint8 tensor over [0, nbytes) of the range. torch asks the driver which device the first byte
        is on, so if the first chunk is not mapped now one granule is mapped there for the moment."""
        temp = 0 not in self.mapped
        if temp:
            self.map([0], self.granularity)
        try:
            t = self.torch.as_tensor(_ArrayInterface(self.base, int(nbytes)), device=f"cuda:{self.device}")
        finally:
            if temp:
                self.unmap([0], self.granularity)
        if t.data_ptr() != self.base:
            raise RuntimeError(f"torch.as_tensor copied the pool range (data_ptr {t.data_ptr():#x}, expected "
                               f"{self.base:#x})")
        return t

    def close(self) -> None:
        if self.mapped:
            log.warning("CudaBackend.close: %d chunks still mapped; their sizes are unknown here, call "
                        "KVPool.close()", len(self.mapped))
        if self.size:
            self.torch.cuda.synchronize(self.device)
            check(self.cu.cuMemAddressFree(self.cu.CUdeviceptr(self.base), self.size),
                  f"cuMemAddressFree({self.size} bytes at {self.base:#x})")
            self.size = 0


class NvmlGpuInfo:
    """``GpuMemoryInfo`` from NVML: total and free device memory and, when ``online_pids()`` is given, what the
    online processes hold (``nvmlDeviceGetComputeRunningProcesses``; host PIDs)."""

    def __init__(self, gpu: int | str = 0, online_pids: Callable[[], set[int]] | None = None) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        if isinstance(gpu, str) and gpu.startswith(("GPU-", "MIG-")):
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(gpu)
        else:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
        self.online_pids = online_pids

    def snapshot(self) -> MemorySnapshot:
        m = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        held = None
        if self.online_pids is not None:
            pids = self.online_pids()
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
            held = sum(int(p.usedGpuMemory or 0) for p in procs if p.pid in pids)
        return MemorySnapshot(int(m.total), int(m.free), held)
