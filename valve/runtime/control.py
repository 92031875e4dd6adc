"""The per-GPU control block: one small shared-memory file, `<runtime_dir>/<gpu-uuid>/control` (names in
valve.api.contract).

The one definition of its layout. The arbiter creates it; online and offline clients map it. The gate word is
4-byte aligned so the CUDA backend can register the page and wait on it with ``cuStreamWaitValue32``.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import threading
import time
import weakref
from pathlib import Path

from valve.api.contract import (
    CONTROL_FILE,
    ENV_GPU_UUID,
    ENV_RUNTIME_DIR,
    ONLINE_SLOTS_DIR,
    PAIR_FILE,
    RUNTIME_DIR,
)
from valve.runtime import busguard

MAGIC = 0x564C5631  # "VLV1"
VERSION = 1
FILE_SIZE = 4096  # one page: what cuMemHostRegister maps
GATE_OPEN, GATE_CLOSED = 1, 0
SLOTS = 32  # online writer slots (processes signalling online requests: proxy, engine, ...)
# bits of `flags` (the arbiter is its only writer)
FLAG_ARBITER = 1  # an arbiter runs and keeps the heartbeat
FLAG_CLOSE_ALLOWED = 2  # an online client that starts a request may close an open gate itself (fast path)
# Tenants run as different uids (arbiter 65532, online root, offline 1000) with no common group: the modes are
# set explicitly (not from the umask) so every one of them can map the block and lock its slot. The directory
# is the GPU's alone (the operator mounts only it); the sticky bit keeps one tenant from deleting another's locks.
FILE_MODE = 0o666
DIR_MODE = 0o777
SLOTS_DIR_MODE = 0o1777
RECHECK_NS = 100_000_000  # how often a mapped block compares its file's inode with the path's (one stat)
REATTACH_NS = 100_000_000  # how often a detached block tries to map the file again

log = logging.getLogger(__name__)


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
        ("preload_captured", ctypes.c_uint64),  # launches due a wait into a capturing stream (gated at graph launch)
        ("preload_throttled", ctypes.c_uint64),  # times the host waited for queue room (queue_ahead bound)
        # enforcement (taken from the reserved words: the offsets after them do not move)
        ("offline_pid", ctypes.c_uint64),  # the offline client's pid (its Gate writes it; the arbiter pauses it)
        ("violations", ctypes.c_uint64),  # arbiter: closed-gate periods in which offline worked anyway
        ("violation_ns", ctypes.c_uint64),  # arbiter: monotonic time of the last one
        ("paused_pid", ctypes.c_uint64),  # arbiter: the pid it stopped (SIGSTOP), 0 when none
        ("online_held_bytes", ctypes.c_uint64),  # online client: what it holds of online_mem_bytes (NVML unknown)
        # smaller offline steps near online (RuntimeSpec.near_online; taken from the reserved words)
        ("near_online_ns", ctypes.c_uint64),  # window after the gate last reopened (0: off)
        ("near_online_tokens", ctypes.c_uint64),  # the offline step's token budget inside it
        # arbiter: the pool figure its offline_limit_bytes was built on (written after the limit; the client's room
        # is limit - basis over what it maps itself, so a limit built on a dead predecessor's figure grants no more)
        ("offline_limit_basis", ctypes.c_uint64),
        # gate protocol (appended: the offsets above do not move)
        ("lease_ns", ctypes.c_uint64),  # heartbeat lease the arbiter publishes (0: clients use their default)
        ("reopen_ns", ctypes.c_uint64),  # monotonic time the arbiter last opened the gate
        ("forced_opens", ctypes.c_uint64),  # times an offline client opened the gate on a stale heartbeat
        ("parked_seq", ctypes.c_uint64),  # offline client: stream reached a closed gate (count) ...
        ("parked_ns", ctypes.c_uint64),  # ... and when (where the gate backend can tell; the sim backend can)
        ("slots", OnlineSlot * SLOTS),
        # appended after the slots (the file is a page; the offsets above do not move)
        ("gate_granularity", ctypes.c_uint64),  # GRANULARITY_CODES: where attach() puts the offline gate (0: unset)
    ]


# gate_granularity words; names as in RuntimeSpec.gate_granularity
GRANULARITY_CODES = {"block": 1, "linear": 2}
GRANULARITY_NAMES = {v: k for k, v in GRANULARITY_CODES.items()}

# eviction_policy words; names as in RuntimeSpec.eviction_policy
EVICTION_CODES = {"fifo": 1, "selective": 2}
EVICTION_NAMES = {v: k for k, v in EVICTION_CODES.items()}

GATE_OFFSET = Layout.gate.offset
assert GATE_OFFSET % 4 == 0 and ctypes.sizeof(Layout) <= FILE_SIZE


class ControlBlockError(RuntimeError):
    """A control file that is missing, or not a Valve control block of this layout."""


def block_problem(file_size: int, mapped_ino: int, path_ino: int | None, magic: int | None = None,
                  version: int | None = None, size: int | None = None) -> str | None:
    """Why a mapped control file must not be touched (None: it may). ``path_ino`` None: the path is gone; the
    header words are read only when the size allows it (None: not read)."""
    if file_size < FILE_SIZE:
        return f"truncated to {file_size} bytes"
    if path_ino is None:
        return "removed"
    if path_ino != mapped_ino:
        return "replaced by another file"
    if magic is not None and magic != MAGIC:
        return f"bad magic {magic:#010x}"
    if version is not None and (version != VERSION or size != FILE_SIZE):
        return f"layout version {version} size {size}, this Valve reads version {VERSION} size {FILE_SIZE}"
    return None


def set_mode(fd_or_path: int | Path, mode: int) -> None:
    """Set a mode we created with; a file someone else owns keeps its own (we may not change it)."""
    try:
        if isinstance(fd_or_path, int):
            os.fchmod(fd_or_path, mode)
        else:
            os.chmod(fd_or_path, mode)
    except PermissionError:
        pass


def make_dir(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.stat(path).st_uid == os.geteuid():
        set_mode(path, mode)


def _map(path: Path) -> tuple[int, mmap.mmap, int]:
    """Open and map a control file, checking size, magic and version: (fd kept open, mapping, inode)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise ControlBlockError(f"{path}: no control file (is the arbiter running?)") from None
    except OSError as e:
        raise ControlBlockError(f"{path}: cannot open the control file: {e.strerror} (mode "
                                f"{_mode(path)}, this process runs as uid {os.geteuid()})") from None
    try:
        st = os.fstat(fd)
        if st.st_size != FILE_SIZE:
            raise ControlBlockError(f"{path}: size {st.st_size} bytes, expected {FILE_SIZE}: not a Valve control file")
        mm = mmap.mmap(fd, FILE_SIZE)
    except BaseException:
        os.close(fd)
        raise
    head = Layout.from_buffer_copy(mm[: ctypes.sizeof(Layout)])
    problem = None
    if head.magic != MAGIC:
        problem = f"{path}: bad magic {head.magic:#010x}, expected {MAGIC:#010x}"
    elif head.version != VERSION or head.size != FILE_SIZE:
        problem = (f"{path}: layout version {head.version} size {head.size}, this Valve reads version {VERSION} "
                   f"size {FILE_SIZE}: upgrade the arbiter and clients together")
    if problem:
        mm.close()
        os.close(fd)
        raise ControlBlockError(problem)
    return fd, mm, st.st_ino


def _mode(path: Path) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_mode & 0o7777:o} uid {st.st_uid}"
    except OSError:
        return "unknown"


def write_pair(gpu_dir: Path, pair: str) -> None:
    """Name the GPU's pair next to its control block (for `valve top`); a failure only costs that name."""
    tmp = gpu_dir / f".{PAIR_FILE}.{os.getpid()}.new"
    try:
        tmp.write_text(pair + "\n")
        set_mode(tmp, FILE_MODE)
        os.rename(tmp, gpu_dir / PAIR_FILE)
    except OSError as e:
        log.warning("cannot write %s: %s", gpu_dir / PAIR_FILE, e)


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
    """A mapped control file; fields are attributes of ``self.fields`` (a ctypes view of the mapping).

    A file can be truncated, replaced or rewritten under the mapping; touching a truncated mapping raises SIGBUS
    (``busguard`` turns that into a read of zeros). So a client calls :meth:`healthy` (an ``fstat`` of the kept fd, a header read and, at a
    bounded rate, a ``stat`` of the path) before touching ``fields``; it re-attaches to a valid replacement in
    place (``generation`` counts re-attachments: views taken from the old mapping are stale then).
    """

    def __init__(self, path: Path | None, mm: mmap.mmap, fd: int | None = None, ino: int = 0) -> None:
        self.path, self.mm = path, mm  # path None: an anonymous (in-process) block
        self.fields = Layout.from_buffer(mm)
        self._fd, self._ino = fd, ino
        self._claimed: set[int] = set()  # slots claimed through this mapping (anonymous blocks)
        self._claim_lock = threading.Lock()
        self._health_lock = threading.Lock()
        self.generation = 0
        self.problem: str | None = None  # why the block is detached now (None: attached)
        self._next_stat = self._next_try = 0
        self._unreadable: set[int] = set()
        self._retired: list[mmap.mmap] = []  # mappings of files this block re-attached away from
        self._guarded: list[int] = []  # addresses of this block's mappings in the SIGBUS guard
        # released when the block goes, before its mappings are unmapped: an address reused by another mapping
        # must not stay guarded
        self._unguard = weakref.finalize(self, _release_all, self._guarded)
        if fd is not None:
            self._guard()

    def _guard(self) -> None:
        # the checks in healthy() cannot close the window between a check and a touch: a truncation in it
        # would raise SIGBUS, which busguard turns into a read of zeros that the next check sees
        address = ctypes.addressof(self.fields)
        if busguard.protect(address, FILE_SIZE):
            self._guarded.append(address)

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
        fd, mm, ino = cls._create_file(path)
        cb = cls(path, mm, fd, ino)
        cb._init_header()
        os.rename(path.with_name(f".{path.name}.{os.getpid()}.new"), path)
        return cb

    @staticmethod
    def _create_file(path: Path) -> tuple[int, mmap.mmap, int]:
        make_dir(path.parent, DIR_MODE)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, FILE_SIZE)
            mm = mmap.mmap(fd, FILE_SIZE)
        except BaseException:
            os.close(fd)
            raise
        return fd, mm, os.fstat(fd).st_ino

    def recreate(self) -> None:
        """The arbiter's answer to a bad file: a fresh one at the same path, mapped in place of the old."""
        assert self.path is not None
        with self._health_lock:
            fd, mm, ino = self._create_file(self.path)
            fresh = Layout.from_buffer(mm)
            fresh.version, fresh.size, fresh.gate = VERSION, FILE_SIZE, GATE_OPEN
            fresh.magic = MAGIC
            os.rename(self.path.with_name(f".{self.path.name}.{os.getpid()}.new"), self.path)
            self._swap(fd, mm, ino)

    def _swap(self, fd: int, mm: mmap.mmap, ino: int) -> None:
        # the old mapping is kept, not closed: ctypes views of it may still exist (close would raise), and a
        # device registration of its page must not see the address reused by a later mapping
        old = self._fd
        self._retired.append(self.mm)
        self.mm, self.fields, self._fd, self._ino = mm, Layout.from_buffer(mm), fd, ino
        self._guard()
        self.generation += 1
        self.problem = None
        self._next_stat = time.monotonic_ns() + RECHECK_NS
        if old is not None:
            os.close(old)

    def healthy(self) -> bool:
        """Whether ``fields`` may be touched now; re-attaches (in place) to a valid replacement file. Cheap: an
        ``fstat`` and three header words per call, a ``stat`` of the path every ``RECHECK_NS``."""
        if self._fd is None:
            return True
        with self._health_lock:
            problem = self._check()
            if problem is None:
                if self.problem is not None:
                    log.warning("control block %s is valid again", self.path)
                self.problem = None
                return True
            if self.problem != problem:
                log.error("control block %s: %s", self.path, problem)
            self.problem = problem
            now = time.monotonic_ns()
            if now < self._next_try:
                return False
            self._next_try = now + REATTACH_NS
            try:
                fd, mm, ino = _map(self.path)
            except ControlBlockError:
                return False
            self._swap(fd, mm, ino)
            log.warning("control block %s: re-attached to the file now at that path", self.path)
            return True

    def _check(self) -> str | None:
        size = os.fstat(self._fd).st_size
        path_ino = self._ino
        now = time.monotonic_ns()
        if self.problem is not None or now >= self._next_stat:
            self._next_stat = now + RECHECK_NS
            try:
                path_ino = os.stat(self.path).st_ino
            except FileNotFoundError:
                path_ino = None
        if size < FILE_SIZE:
            return block_problem(size, self._ino, path_ino)
        f = self.fields
        return block_problem(size, self._ino, path_ino, f.magic, f.version, f.size)

    @classmethod
    def open_or_create(cls, path: Path | str) -> tuple[ControlBlock, str | None]:
        """The arbiter's way in. A valid file is reused (online slots and memory fields survive an arbiter
        restart, and clients keep their mapping); a missing one is created; one that is not a valid control
        block is replaced by a new one. Returns the block and why it was re-initialised (None if not)."""
        try:
            cb = cls.open(path)
            if os.fstat(cb._fd).st_uid == os.geteuid():  # a file an older arbiter made with umask modes
                set_mode(cb._fd, FILE_MODE)
                set_mode(cb.path.parent, DIR_MODE)
            return cb, None
        except ControlBlockError as e:
            reason = None if not Path(path).exists() else str(e)
        return cls.create(path), reason

    @classmethod
    def open(cls, path: Path | str) -> ControlBlock:
        """Map an existing control file, checking magic, version and size."""
        path = Path(path)
        fd, mm, ino = _map(path)
        return cls(path, mm, fd, ino)

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
                make_dir(lock.parent, SLOTS_DIR_MODE)
                try:
                    fd = os.open(lock, os.O_RDWR | os.O_CREAT, FILE_MODE)
                except PermissionError as e:  # another uid's lock file with a narrow mode: try the next slot
                    log.warning("online slot %d: %s (mode %s)", i, e, _mode(lock))
                    continue
                if os.fstat(fd).st_uid == os.geteuid():
                    set_mode(fd, FILE_MODE)
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
            except OSError as e:  # cannot tell: leave the slot (its writer may live), say why once per slot
                if i not in self._unreadable:
                    self._unreadable.add(i)
                    log.error("online slot %d: cannot open its lock file: %s (mode %s, uid %d)", i, e.strerror,
                              _mode(self._lock_file(i)), os.geteuid())
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
        self._unguard()
        del self.fields
        self.mm.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _release_all(addresses: list[int]) -> None:
    for address in addresses:
        busguard.release(address)


class SlotClaim:
    """A claimed online slot; `release()` frees it (also done by the kernel when the process dies)."""

    def __init__(self, cb: ControlBlock, index: int, fd: int | None) -> None:
        self.cb, self.index, self._fd = cb, index, fd
        self.generation = cb.generation  # the mapping this claim is in
        self.slot = cb.fields.slots[index]

    @property
    def stale(self) -> bool:
        """The block was re-attached to another file since the claim: the slot is in the old mapping."""
        return self.generation != self.cb.generation

    def release(self) -> None:
        if self.slot is None:
            return
        if not self.stale and self.cb.healthy() and not self.stale:
            self.slot.state = 0
        self.slot = None
        if self._fd is None:
            with self.cb._claim_lock:
                self.cb._claimed.discard(self.index)
        else:
            os.close(self._fd)
            self._fd = None
