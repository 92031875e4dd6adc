"""The per-GPU control block: one small shared-memory file, `<runtime_dir>/<gpu-uuid>/control` (names in
valve.api.contract).

The one definition of its layout. The arbiter creates it; online and offline clients map it. The gate word is
4-byte aligned so the CUDA backend can register the page and wait on it with ``cuStreamWaitValue32``.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading
from pathlib import Path

from valve.api.contract import CONTROL_FILE, ENV_GPU_UUID, ENV_RUNTIME_DIR, ONLINE_SLOTS_DIR, RUNTIME_DIR

MAGIC = 0x564C5631  # "VLV1"
VERSION = 1
FILE_SIZE = 4096  # one page: what cuMemHostRegister maps
GATE_OPEN, GATE_CLOSED = 1, 0
SLOTS = 32  # online writer slots (processes signalling online requests: proxy, engine, ...)
# bits of `flags` (the arbiter is its only writer)
FLAG_ARBITER = 1  # an arbiter runs and keeps the heartbeat
FLAG_CLOSE_ALLOWED = 2  # an online client that starts a request may close an open gate itself (fast path)


class OnlineSlot(ctypes.Structure):
    """One online writer's counters. Only the process holding the slot's lock file writes them (no shared
    read-modify-write), so concurrent online processes need no lock between them or with the arbiter."""

    _fields_ = [
        ("state", ctypes.c_uint32),  # 1 = claimed
        ("pid", ctypes.c_uint32),
        ("started", ctypes.c_uint64),  # requests started by this writer
        ("ended", ctypes.c_uint64),
        ("close_ns", ctypes.c_uint64),  # monotonic time this writer last closed the gate
        ("end_ns", ctypes.c_uint64),  # monotonic time of this writer's last request end
        ("closes", ctypes.c_uint64),
    ]


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
        ("evicted_sequences", ctypes.c_uint64),  # cumulative, written by the offline client's reclaim handler
        ("recomputed_tokens", ctypes.c_uint64),  # cumulative tokens of evicted sequences (to be recomputed)
        # settings the arbiter publishes from its RuntimeSpec (0: unset, clients use their default)
        ("queue_ahead", ctypes.c_uint64),  # gated sub-layers the offline CPU may enqueue past the last gate
        ("eviction_policy", ctypes.c_uint64),  # EVICTION_CODES: which offline sequences a reclaim evicts first
        # launch-level gate (libvalvegate.so, valve/preload): counters it adds to, in place of reserved words
        ("preload_launches", ctypes.c_uint64),  # kernel and graph launches it saw
        ("preload_waits", ctypes.c_uint64),  # gate waits it enqueued before them
        ("preload_captured", ctypes.c_uint64),  # launches into a capturing stream (gated when the graph launches)
        ("preload_throttled", ctypes.c_uint64),  # times the host waited for queue room (queue_ahead bound)
        ("reserved", ctypes.c_uint64 * 8),
        # gate protocol (appended: the offsets above do not move)
        ("lease_ns", ctypes.c_uint64),  # heartbeat lease the arbiter publishes (0: clients use their default)
        ("reopen_ns", ctypes.c_uint64),  # monotonic time the arbiter last opened the gate
        ("forced_opens", ctypes.c_uint64),  # times an offline client opened the gate on a stale heartbeat
        ("parked_seq", ctypes.c_uint64),  # offline client: stream reached a closed gate (count) ...
        ("parked_ns", ctypes.c_uint64),  # ... and when (where the gate backend can tell; the sim backend can)
        ("slots", OnlineSlot * SLOTS),
    ]


# eviction_policy words; names as in RuntimeSpec.eviction_policy
EVICTION_CODES = {"fifo": 1, "selective": 2}
EVICTION_NAMES = {v: k for k, v in EVICTION_CODES.items()}

GATE_OFFSET = Layout.gate.offset
assert GATE_OFFSET % 4 == 0 and ctypes.sizeof(Layout) <= FILE_SIZE


class ControlBlockError(RuntimeError):
    """A control file that is missing, or not a Valve control block of this layout."""


def runtime_dir() -> Path:
    return Path(os.environ.get(ENV_RUNTIME_DIR, RUNTIME_DIR))


def control_path(gpu_uuid: str, root: Path | str | None = None) -> Path:
    if not gpu_uuid or "/" in gpu_uuid or gpu_uuid in (".", ".."):
        raise ValueError(f"invalid GPU UUID {gpu_uuid!r}")
    return Path(root if root is not None else runtime_dir()) / gpu_uuid / CONTROL_FILE


def resolve_control_path(gpu_uuid: str | None = None, root: Path | str | None = None) -> Path | None:
    """This process's control file: of ``gpu_uuid``, else of ``VALVE_GPU_UUID`` (the device plugin sets it in the
    GPU's containers), under ``root``, else ``VALVE_RUNTIME_DIR``, else the default. None when no GPU is known."""
    uuid = gpu_uuid or os.environ.get(ENV_GPU_UUID)
    return control_path(uuid, root) if uuid else None


class ControlBlock:
    """A mapped control file; fields are attributes of ``self.fields`` (a ctypes view of the mapping)."""

    def __init__(self, path: Path | None, mm: mmap.mmap) -> None:
        self.path, self.mm = path, mm  # path None: an anonymous (in-process) block
        self.fields = Layout.from_buffer(mm)
        self._claimed: set[int] = set()  # slots claimed through this mapping (anonymous blocks)
        self._claim_lock = threading.Lock()

    @classmethod
    def anonymous(cls) -> ControlBlock:
        """An in-memory block with no file: the simulator and single-process tests use it."""
        cb = cls(None, mmap.mmap(-1, FILE_SIZE))
        cb._init_header()
        return cb

    def _init_header(self) -> None:
        f = self.fields
        f.version, f.size, f.gate = VERSION, FILE_SIZE, GATE_OPEN
        f.magic = MAGIC  # last: a reader that sees the magic sees a whole header

    @classmethod
    def create(cls, path: Path | str) -> ControlBlock:
        """Create (or replace) the file with a fresh header, gate open. The arbiter does this. The header is
        written into a temporary file that is then renamed into place, so a client never maps a file of the right
        size whose header is not there yet."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o770)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o660)
        try:
            os.ftruncate(fd, FILE_SIZE)
            mm = mmap.mmap(fd, FILE_SIZE)
        finally:
            os.close(fd)
        cb = cls(path, mm)
        cb._init_header()
        os.rename(tmp, path)
        return cb

    @classmethod
    def open_or_create(cls, path: Path | str) -> tuple[ControlBlock, str | None]:
        """The arbiter's way in. A valid file is reused (online slots and memory fields survive an arbiter
        restart, and clients keep their mapping); a missing one is created; one that is not a valid control
        block is replaced by a new one. Returns the block and why it was re-initialised (None if not)."""
        try:
            return cls.open(path), None
        except ControlBlockError as e:
            reason = None if not Path(path).exists() else str(e)
        return cls.create(path), reason

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

    def page_address(self) -> int:
        """Host address of the mapping (page aligned, FILE_SIZE bytes)."""
        return ctypes.addressof(self.fields)

    # ---- online writer slots -------------------------------------------------------------------------
    def claimed_slots(self) -> list[OnlineSlot]:
        return [s for s in self.fields.slots if s.state == 1]

    def inflight(self) -> int:
        """Online requests in flight, summed over the claimed slots."""
        return sum(max(0, s.started - s.ended) for s in self.claimed_slots())

    def _lock_file(self, index: int) -> Path:
        assert self.path is not None
        return self.path.parent / ONLINE_SLOTS_DIR / f"{index}.lock"

    def claim_slot(self) -> SlotClaim:
        """Take a free online slot. For a file-backed block the claim is a `flock` on a per-slot lock file,
        held for the life of the claim: the kernel drops it when the process dies, so the arbiter can tell
        live writers from dead ones (`reap_dead_slots`), also across containers sharing the runtime dir."""
        for i in range(SLOTS):
            fd = None
            if self.path is None:
                with self._claim_lock:
                    if i in self._claimed:
                        continue
                    self._claimed.add(i)
            else:
                lock = self._lock_file(i)
                lock.parent.mkdir(mode=0o770, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o660)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
            s = self.fields.slots[i]
            s.started = s.ended = s.close_ns = s.end_ns = s.closes = 0
            s.pid = os.getpid()
            s.state = 1
            return SlotClaim(self, i, fd)
        raise ControlBlockError(f"{self.path or 'control block'}: all {SLOTS} online slots are taken")

    def reap_dead_slots(self) -> list[int]:
        """Free the slots whose writer died (its lock file is no longer locked). The arbiter calls this."""
        if self.path is None:
            return []
        reaped = []
        for i, s in enumerate(self.fields.slots):
            if s.state != 1:
                continue
            try:
                fd = os.open(self._lock_file(i), os.O_RDWR)
            except FileNotFoundError:
                s.state = 0
                reaped.append(i)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # alive
            s.state = 0  # while holding the lock, so a new claimer cannot be clobbered
            os.close(fd)  # drops our lock
            reaped.append(i)
        return reaped

    def close(self) -> None:
        del self.fields
        self.mm.close()


class SlotClaim:
    """A claimed online slot; `release()` frees it (also done by the kernel when the process dies)."""

    def __init__(self, cb: ControlBlock, index: int, fd: int | None) -> None:
        self.cb, self.index, self._fd = cb, index, fd
        self.slot = cb.fields.slots[index]

    def release(self) -> None:
        if self.slot is None:
            return
        self.slot.state = 0
        self.slot = None
        if self._fd is None:
            with self.cb._claim_lock:
                self.cb._claimed.discard(self.index)
        else:
            os.close(self._fd)
            self._fd = None
