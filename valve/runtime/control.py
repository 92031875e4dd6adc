"""The per-GPU control block: one small shared-memory file, `<runtime_dir>/<gpu-uuid>/control`.

The one definition of its layout. The arbiter creates it; online and offline clients map it. The gate word is
4-byte aligned so the CUDA backend can register the page and wait on it with ``cuStreamWaitValue32``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

MAGIC = 0x564C5631  # "VLV1"
VERSION = 1
FILE_SIZE = 4096  # one page: what cuMemHostRegister maps
DEFAULT_RUNTIME_DIR = "/var/run/valve"
GATE_OPEN, GATE_CLOSED = 1, 0


class Layout(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("gate", ctypes.c_uint32),  # GATE_OPEN / GATE_CLOSED; offline streams wait for GATE_OPEN
        ("online_inflight", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("heartbeat_ns", ctypes.c_uint64),  # arbiter's time.monotonic_ns() at its last loop
        ("preemptions", ctypes.c_uint64),
        ("gate_closed_ns", ctypes.c_uint64),  # total time closed
        ("last_close_ns", ctypes.c_uint64),
        ("online_requests", ctypes.c_uint64),
        ("offline_progress", ctypes.c_uint64),  # sub-layer boundaries the offline client passed
        # memory (reclamation protocol)
        ("reserve_target_bytes", ctypes.c_uint64),
        ("reclaim_req_seq", ctypes.c_uint64),
        ("reclaim_req_bytes", ctypes.c_uint64),
        ("reclaim_ack_seq", ctypes.c_uint64),
        ("reclaim_ack_bytes", ctypes.c_uint64),
        ("offline_limit_bytes", ctypes.c_uint64),  # the most the offline pool may hold now
        ("offline_pool_bytes", ctypes.c_uint64),  # reported by the offline client
        ("online_mem_bytes", ctypes.c_uint64),  # reported by the online client (or read from NVML)
        ("reserved", ctypes.c_uint64 * 16),
    ]


GATE_OFFSET = Layout.gate.offset
assert GATE_OFFSET % 4 == 0 and ctypes.sizeof(Layout) <= FILE_SIZE


class ControlBlockError(RuntimeError):
    """A control file that is missing, or not a Valve control block of this layout."""


def runtime_dir() -> Path:
    return Path(os.environ.get("VALVE_RUNTIME_DIR", DEFAULT_RUNTIME_DIR))


def control_path(gpu_uuid: str, root: Path | str | None = None) -> Path:
    if not gpu_uuid or "/" in gpu_uuid or gpu_uuid in (".", ".."):
        raise ValueError(f"invalid GPU UUID {gpu_uuid!r}")
    return Path(root if root is not None else runtime_dir()) / gpu_uuid / "control"


class ControlBlock:
    """A mapped control file; fields are attributes of ``self.fields`` (a ctypes view of the mapping)."""

    def __init__(self, path: Path, mm: mmap.mmap) -> None:
        self.path, self.mm = path, mm
        self.fields = Layout.from_buffer(mm)

    @classmethod
    def create(cls, path: Path | str) -> ControlBlock:
        """Create (or reset) the file with a fresh header, gate open. The arbiter does this."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o770)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o660)
        try:
            os.ftruncate(fd, FILE_SIZE)
            mm = mmap.mmap(fd, FILE_SIZE)
        finally:
            os.close(fd)
        mm[:] = bytes(FILE_SIZE)
        cb = cls(path, mm)
        f = cb.fields
        f.version, f.size, f.gate = VERSION, FILE_SIZE, GATE_OPEN
        f.magic = MAGIC  # last: a reader that sees the magic sees a whole header
        return cb

    @classmethod
    def open(cls, path: Path | str) -> ControlBlock:
        """Map an existing control file, checking magic, version and size."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise ControlBlockError(f"{path}: no control file (is the arbiter running?)") from None
        try:
            size = os.fstat(fd).st_size
            if size != FILE_SIZE:
                raise ControlBlockError(f"{path}: size {size} bytes, expected {FILE_SIZE}: not a Valve control file")
            mm = mmap.mmap(fd, FILE_SIZE)
        finally:
            os.close(fd)
        head = Layout.from_buffer_copy(mm[: ctypes.sizeof(Layout)])
        if head.magic != MAGIC:
            mm.close()
            raise ControlBlockError(f"{path}: bad magic {head.magic:#010x}, expected {MAGIC:#010x}")
        if head.version != VERSION or head.size != FILE_SIZE:
            mm.close()
            raise ControlBlockError(
                f"{path}: layout version {head.version} size {head.size}, this Valve reads version {VERSION} "
                f"size {FILE_SIZE}: upgrade the arbiter and clients together"
            )
        return cls(path, mm)

    def gate_address(self) -> int:
        """Host address of the gate word (for cuMemHostRegister / cuStreamWaitValue32)."""
        return ctypes.addressof(self.fields) + GATE_OFFSET

    def close(self) -> None:
        del self.fields
        self.mm.close()
