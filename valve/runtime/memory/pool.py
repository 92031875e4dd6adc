"""KVPool: paged KV-cache blocks in one reserved virtual range, backed by physical chunks mapped on demand.

Layout: the pool reserves ``max_bytes`` (rounded up to whole chunks) of virtual address space once; block ``b``
occupies bytes ``[b * block_bytes, (b + 1) * block_bytes)`` of it. Physical memory comes in chunks of
``chunk_bytes`` (a multiple of the device's allocation granularity) mapped when allocation needs room and
unmapped by :meth:`KVPool.reclaim`. A block that straddles two chunks is never handed out, so every usable block
lives in exactly one chunk (at most one block per chunk is lost when ``chunk_bytes % block_bytes != 0``).

Shrinking (:meth:`KVPool.reclaim`): evict sequences if the chunks left cannot hold every live block, move the live
blocks out of the victim chunks (stream-ordered device-to-device copies), wait until the offline stream has passed
those copies and every kernel queued before them (an event), then unmap the victims. No kernel can touch an
unmapped page: the wait covers every kernel that was queued with the old block tables. The caller must apply
``moved`` to its block tables and re-queue ``evicted`` sequences for recompute before it queues more work.

Backends (the :class:`~valve.runtime.memory.backend.MemoryBackend` protocol): ``memory.cuda.CudaBackend`` (CUDA
virtual memory management) and ``memory.sim.SimBackend`` (a CPU byte store on a simulated GPU, for tests and CPU
runs).
"""

from __future__ import annotations

import gc
import heapq
import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from valve.runtime.memory.backend import MemoryBackend
from valve.runtime.memory.errors import DeviceOutOfMemory, PoolExhausted, ReclaimImpossible
from valve.runtime.memory.evict import (
    SELECTIVE,
    Candidate,
    check_policy,
    choose_evictions,
    choose_victim_chunks,
)

log = logging.getLogger(__name__)

FREE = -1
# measured on an H100 (bench/reclaim.py sweep): releasing 8 GiB costs ~30-40 us per chunk up to 32 MiB chunks and
# ~75 us at 128 MiB, then grows with bytes; 128 MiB chunks cut the 8 GiB reclaim from ~20 ms to ~8-11 ms at the
# price of more compaction copies and a coarser grow/shrink step
DEFAULT_CHUNK_BYTES = 128 << 20


@dataclass
class ReclaimResult:
    released_bytes: int = 0
    moved: dict[int, int] = field(default_factory=dict)  # old block id -> new block id
    evicted: list = field(default_factory=list)  # sequence ids: re-queue them for recompute
    requested_bytes: int = 0
    copied_bytes: int = 0
    evicted_tokens: int = 0  # tokens the evicted sequences had computed (to be recomputed)
    chunks: int = 0
    copies: int = 0  # copy calls (one per run of adjacent blocks)
    seconds: float = 0.0  # host wall time, copies and the stream wait included
    phases: dict[str, float] = field(default_factory=dict)  # seconds: plan, copy, wait, unmap, book

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.requested_bytes - self.released_bytes)


@dataclass
class _Seq:
    slot: int
    order: int
    blocks: list[int] = field(default_factory=list)
    tokens: int | None = None


def _runs(ids: np.ndarray) -> list[list[int]]:
    """[[first id, length]] of the runs of consecutive ids in an ascending array."""
    brk = np.flatnonzero(np.diff(ids) != 1) + 1
    starts, ends = np.r_[0, brk], np.r_[brk, len(ids)]
    return [[int(ids[a]), int(e - a)] for a, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def match_runs(src: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Destinations for the blocks ``src`` among the ``free`` ones (both ascending), so that runs of adjacent
    source blocks land on runs of adjacent free blocks and go as one copy: longest source run first, into the
    longest free run (split when it does not fit). Returns (src, dst) in copy order."""
    free_runs = [[-n, a] for a, n in _runs(free)]
    heapq.heapify(free_runs)
    out_s, out_d = [], []
    for a, n in sorted(_runs(src), key=lambda r: -r[1]):
        while n:
            neg, d = heapq.heappop(free_runs)
            m = min(n, -neg)
            out_s.append(np.arange(a, a + m))
            out_d.append(np.arange(d, d + m))
            if m < -neg:
                heapq.heappush(free_runs, [neg + m, d + m])
            a, n = a + m, n - m
    return np.concatenate(out_s), np.concatenate(out_d)


def default_backend() -> MemoryBackend:
    """CUDA (virtual memory management) when torch sees a GPU, else the CPU store of the simulated backend (its
    memory on the shared simulated device ``VALVE_SIM_DEVICE`` names, if set)."""
    try:
        import torch

        if torch.cuda.is_available():
            from valve.runtime.memory.cuda import CudaBackend

            return CudaBackend()
    except ImportError:
        pass
    from valve.runtime.memory.sim import SimBackend, shared_sim_gpu

    log.info("KVPool: no CUDA device, using the simulated backend (a CPU byte store)")
    shared = shared_sim_gpu()  # VALVE_SIM_DEVICE: one simulated device for several processes
    return SimBackend(gpu=shared, granularity=shared.granularity) if shared else SimBackend()


class KVPool:
    """Paged KV blocks per sequence, carved from chunks mapped on demand; shrinks by compaction and eviction."""

    def __init__(
        self,
        backend: MemoryBackend | None = None,
        block_bytes: int | None = None,
        chunk_bytes: int | None = None,
        max_bytes: int | None = None,
        policy: str = SELECTIVE,
    ) -> None:
        if block_bytes is None or max_bytes is None:
            raise TypeError("KVPool needs block_bytes and max_bytes")
        self.backend = backend if backend is not None else default_backend()
        g = self.backend.granularity
        if chunk_bytes is None:  # the default, but no larger than the pool (small pools, tests)
            chunk_bytes = min(DEFAULT_CHUNK_BYTES, max(g, -(-int(max_bytes or 0) // g) * g))
        if block_bytes <= 0 or chunk_bytes <= 0 or max_bytes <= 0:
            raise ValueError("block_bytes, chunk_bytes and max_bytes must be positive")
        if block_bytes > chunk_bytes:
            raise ValueError(f"block_bytes {block_bytes} is larger than chunk_bytes {chunk_bytes}")
        if chunk_bytes % g:
            raise ValueError(f"chunk_bytes {chunk_bytes} is not a multiple of the {self.backend.name} backend's "
                             f"allocation granularity {g}")
        self.policy = check_policy(policy)
        self.block_bytes, self.chunk_bytes = int(block_bytes), int(chunk_bytes)
        self.n_chunks = -(-int(max_bytes) // self.chunk_bytes)
        self.max_bytes = self.n_chunks * self.chunk_bytes
        self.max_blocks = self.max_bytes // self.block_bytes
        b = np.arange(self.max_blocks, dtype=np.int64)
        first, last = b * self.block_bytes // self.chunk_bytes, ((b + 1) * self.block_bytes - 1) // self.chunk_bytes
        self._block_chunk = np.where(first == last, first, -1)
        self._cap = np.bincount(self._block_chunk[self._block_chunk >= 0], minlength=self.n_chunks)
        c = np.arange(self.n_chunks, dtype=np.int64)
        self._first = -(-c * self.chunk_bytes // self.block_bytes)  # first block wholly inside chunk c
        self._mapped = np.zeros(self.n_chunks, dtype=bool)
        self._live = np.zeros(self.n_chunks, dtype=np.int64)
        self._owner = np.full(self.max_blocks, FREE, dtype=np.int64)
        self._seqs: dict[object, _Seq] = {}
        self._by_slot: dict[int, object] = {}
        self._slots = itertools.count()
        self._orders = itertools.count()
        self._heap: list[int] = []
        self._mapped_cap = 0
        self._live_total = 0
        self._limit = self.max_bytes
        self._device_oom = ""
        self._views: dict = {}
        self.counters = dict(grows=0, reclaims=0, mapped_chunks_total=0, released_bytes_total=0,
                             copied_bytes_total=0, evicted_total=0, evicted_tokens_total=0, device_ooms=0)
        self.backend.reserve(self.max_bytes)

    # ---- sizes -----------------------------------------------------------------------------------------------
    @property
    def mapped_bytes(self) -> int:
        return int(self._mapped.sum()) * self.chunk_bytes

    @property
    def limit_bytes(self) -> int:
        return self._limit

    def set_limit(self, nbytes: int) -> None:
        """The most the pool may map from now on. Lowering it below what is mapped stops growth only; memory
        comes back through :meth:`reclaim`."""
        self._limit = max(0, min(int(nbytes), self.max_bytes))

    def used_blocks(self) -> int:
        return self._live_total

    def free_blocks(self) -> int:
        """Blocks that can be allocated now, growth up to the limit included."""
        return self._mapped_cap - self._live_total + self._growable_blocks()

    def _growable_blocks(self) -> int:
        room = (self._limit - self.mapped_bytes) // self.chunk_bytes
        if room <= 0:
            return 0
        free_chunks = np.flatnonzero(~self._mapped)[:room]
        return int(self._cap[free_chunks].sum())

    # ---- allocation ------------------------------------------------------------------------------------------
    def allocate(self, seq_id, n_blocks: int) -> list[int]:
        """Append ``n_blocks`` new blocks to ``seq_id``'s table (created on first use); returns the new ids.
        All or nothing: raises :class:`PoolExhausted` and allocates nothing when they do not fit."""
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        seq = self._seqs.get(seq_id)
        if n_blocks > self._mapped_cap - self._live_total and not self._grow(n_blocks):
            free = self._mapped_cap - self._live_total
            raise PoolExhausted(
                f"KV pool exhausted: sequence {seq_id!r} needs {n_blocks} blocks of {self.block_bytes} bytes; "
                f"{free} free, {self._growable_blocks()} more by growing to the limit of {self._limit} bytes "
                f"({self.mapped_bytes} mapped, max {self.max_bytes}){self._device_oom}")
        if seq is None:
            seq = _Seq(next(self._slots), next(self._orders))
            self._seqs[seq_id] = seq
            self._by_slot[seq.slot] = seq_id
        new = []
        while len(new) < n_blocks:
            b = heapq.heappop(self._heap)
            c = self._block_chunk[b]
            if self._owner[b] != FREE or c < 0 or not self._mapped[c]:
                continue  # a stale entry
            self._owner[b] = seq.slot
            self._live[c] += 1
            new.append(b)
        self._live_total += n_blocks
        seq.blocks.extend(new)
        return new

    def _grow(self, n_blocks: int) -> bool:
        """Map the lowest unmapped chunks until ``n_blocks`` are free; maps nothing if the limit forbids it."""
        need = n_blocks - (self._mapped_cap - self._live_total)
        room = (self._limit - self.mapped_bytes) // self.chunk_bytes
        pick, got = [], 0
        for c in np.flatnonzero(~self._mapped)[: max(room, 0)]:
            if got >= need:
                break
            pick.append(int(c))
            got += int(self._cap[c])
        if got < need:
            return False
        return self._map(pick)

    def _map(self, pick: list[int]) -> bool:
        try:
            self.backend.map([c * self.chunk_bytes for c in pick], self.chunk_bytes)
        except DeviceOutOfMemory as e:
            self._device_oom = f"; growing failed: {e}"
            self.counters["device_ooms"] += 1
            return False
        self._device_oom = ""
        self._mapped[pick] = True
        self._mapped_cap += int(self._cap[pick].sum())
        for c in pick:
            first = int(self._first[c])
            for b in range(first, first + int(self._cap[c])):
                heapq.heappush(self._heap, b)
        self.counters["grows"] += 1
        self.counters["mapped_chunks_total"] += len(pick)
        return True

    def grow_to(self, nbytes: int) -> int:
        """Map chunks (lowest first) until ``nbytes`` are mapped, within the limit: an engine that takes its
        memory up front, as a preallocating engine does. Returns the bytes mapped by this call (0 when the
        device had no room: :meth:`allocate` then reports it)."""
        k = (min(int(nbytes), self._limit) - self.mapped_bytes) // self.chunk_bytes
        if k <= 0:
            return 0
        pick = [int(c) for c in np.flatnonzero(~self._mapped)[:k]]
        return len(pick) * self.chunk_bytes if pick and self._map(pick) else 0

    def release_free(self, keep_bytes: int) -> int:
        """Unmap chunks that hold no live block, highest-addressed first, until at most ``keep_bytes`` stay
        mapped (never below it): an engine giving back memory it has stopped using. No copies and no evictions,
        so no block table changes; the lowest chunks stay (what padding in a block table points to). Returns
        the bytes released."""
        over = (self.mapped_bytes - max(0, int(keep_bytes))) // self.chunk_bytes
        victims = [int(c) for c in np.flatnonzero(self._mapped & (self._live == 0))[::-1][:max(over, 0)]]
        if not victims:
            return 0
        self.backend.wait(self.backend.fence())  # kernels that read these chunks' blocks have finished
        self.backend.unmap([c * self.chunk_bytes for c in victims], self.chunk_bytes)
        self._mapped[victims] = False
        self._mapped_cap -= int(self._cap[victims].sum())
        self._trim_heap()
        self.counters["released_bytes_total"] += len(victims) * self.chunk_bytes
        return len(victims) * self.chunk_bytes

    def free(self, seq_id) -> int:
        """Return ``seq_id``'s blocks to the pool (they stay mapped). Unknown ids free nothing. Returns blocks."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return 0
        del self._by_slot[seq.slot]
        if seq.blocks:
            arr = np.asarray(seq.blocks, dtype=np.int64)
            self._owner[arr] = FREE
            np.subtract.at(self._live, self._block_chunk[arr], 1)
            self._live_total -= len(seq.blocks)
            for b in seq.blocks:
                heapq.heappush(self._heap, b)
        return len(seq.blocks)

    def block_table(self, seq_id) -> list[int]:
        seq = self._seqs.get(seq_id)
        return list(seq.blocks) if seq else []

    def sequences(self) -> list:
        return list(self._seqs)

    def set_progress(self, seq_id, computed_tokens: int) -> None:
        """Tell the pool how many tokens ``seq_id`` has computed: the work lost if it is evicted."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            seq.tokens = int(computed_tokens)

    # ---- reclaim ---------------------------------------------------------------------------------------------
    def reclaim(self, nbytes: int, policy: str | None = None, allow_partial: bool = False) -> ReclaimResult:
        """See :meth:`_reclaim`. The garbage collector is paused meanwhile: a full collection of a large
        engine's heap (tens of ms, seen as p99 outliers on the H100) must not land inside a reclaim."""
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._reclaim(nbytes, policy, allow_partial)
        finally:
            if paused:
                gc.enable()

    def _reclaim(self, nbytes: int, policy: str | None, allow_partial: bool) -> ReclaimResult:
        """Release at least ``nbytes`` (whole chunks) of physical memory back to the device.

        Raises :class:`ReclaimImpossible` (releasing nothing) when the pool holds less than ``nbytes`` mapped,
        unless ``allow_partial``, which then releases everything. Also lowers the limit to what stays mapped.
        """
        t0 = time.perf_counter()
        policy = check_policy(policy or self.policy)
        res = ReclaimResult(requested_bytes=max(0, int(nbytes)))
        if nbytes <= 0:
            return res
        mapped = np.flatnonzero(self._mapped)
        k = math.ceil(nbytes / self.chunk_bytes)
        if k > len(mapped):
            if not allow_partial:
                raise ReclaimImpossible(
                    f"cannot release {nbytes} bytes: the pool holds {len(mapped) * self.chunk_bytes} bytes mapped "
                    f"({len(mapped)} chunks of {self.chunk_bytes}); nothing was released")
            k = len(mapped)
        if k == 0:
            return res
        ph = res.phases
        # 1. evict until the chunks that stay can hold every live block (sized for the k largest victims)
        worst = int(np.sort(self._cap[mapped])[-k:].sum())
        deficit = self._live_total - (self._mapped_cap - worst)
        if deficit > 0:
            cands = [Candidate(sid, len(s.blocks), s.tokens if s.tokens is not None else len(s.blocks), s.order)
                     for sid, s in self._seqs.items() if s.blocks]
            for c in choose_evictions(cands, deficit, policy):
                res.evicted_tokens += self._seqs[c.seq_id].tokens or 0
                self.free(c.seq_id)
                res.evicted.append(c.seq_id)
        # 2. pick victims, move their live blocks into free blocks of the chunks that stay
        victims = choose_victim_chunks(mapped.tolist(), self._live[mapped].tolist(), k, policy)
        t1 = time.perf_counter()
        ph["plan"] = t1 - t0
        is_victim = np.zeros(self.n_chunks, dtype=bool)
        is_victim[victims] = True
        bc = self._block_chunk
        usable = bc >= 0
        in_victim = usable & is_victim[np.where(usable, bc, 0)]
        src = np.flatnonzero(in_victim & (self._owner != FREE))
        if len(src):
            ok = usable & self._mapped[np.where(usable, bc, 0)] & ~in_victim & (self._owner == FREE)
            free = np.flatnonzero(ok)
            assert len(free) >= len(src), "compaction found too few free blocks (pool bookkeeping bug)"
            src, dst = match_runs(src, free)
            self._move(src, dst, res)
        t2 = time.perf_counter()
        ph["copy"] = t2 - t1  # choosing destinations, queueing the copies, table updates
        # 3. wait until the stream has passed the copies and every kernel queued before them, then unmap
        self.backend.wait(self.backend.fence())
        t3 = time.perf_counter()
        ph["wait"] = t3 - t2
        self.backend.unmap([c * self.chunk_bytes for c in victims], self.chunk_bytes)
        t4 = time.perf_counter()
        ph["unmap"] = t4 - t3
        self._mapped[victims] = False
        self._mapped_cap -= int(self._cap[victims].sum())
        self._trim_heap()
        self._limit = min(self._limit, self.mapped_bytes)
        res.chunks = len(victims)
        res.released_bytes = len(victims) * self.chunk_bytes
        res.seconds = time.perf_counter() - t0
        ph["book"] = res.seconds - (t4 - t0)
        c = self.counters
        c["reclaims"] += 1
        c["released_bytes_total"] += res.released_bytes
        c["copied_bytes_total"] += res.copied_bytes
        c["evicted_total"] += len(res.evicted)
        c["evicted_tokens_total"] += res.evicted_tokens
        return res

    def _trim_heap(self) -> None:
        """The heap keeps entries of released and now-used blocks (allocate() skips them); rebuilt when large."""
        if len(self._heap) > 2 * self.max_blocks:
            bc = self._block_chunk
            usable = bc >= 0
            self._heap = np.flatnonzero(usable & self._mapped[np.where(usable, bc, 0)]
                                        & (self._owner == FREE)).tolist()
            heapq.heapify(self._heap)

    def _move(self, src: np.ndarray, dst: np.ndarray, res: ReclaimResult) -> None:
        """Copy blocks src[i] -> dst[i] (where both go up by one, one copy) and update the tables."""
        B = self.block_bytes
        brk = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
        starts, ends = np.r_[0, brk], np.r_[brk, len(src)]
        copies = [(int(dst[a]) * B, int(src[a]) * B, (e - a) * B)
                  for a, e in zip(starts.tolist(), ends.tolist(), strict=True)]
        many = getattr(self.backend, "copy_many", None)
        if many is not None:
            many(copies)
        else:
            for d, s_, n in copies:
                self.backend.copy(d, s_, n)
        res.copies = len(copies)
        res.copied_bytes += len(src) * B
        moved = dict(zip(src.tolist(), dst.tolist(), strict=True))
        for slot in np.unique(self._owner[src]).tolist():
            seq = self._seqs[self._by_slot[slot]]
            seq.blocks = [moved.get(b, b) for b in seq.blocks]
        self._owner[dst] = self._owner[src]
        self._owner[src] = FREE
        np.add.at(self._live, self._block_chunk[dst], 1)
        np.subtract.at(self._live, self._block_chunk[src], 1)
        res.moved = moved

    # ---- views and state -------------------------------------------------------------------------------------
    def tensor(self, dtype, block_shape: tuple[int, ...]):
        """A torch view ``[max_blocks, *block_shape]`` of the whole range (block ``b`` is ``view[b]``). Only
        blocks of mapped chunks may be touched: the pool hands out no others."""
        import torch

        shape = tuple(int(d) for d in block_shape)
        item = torch.empty((), dtype=dtype).element_size()
        if item * math.prod(shape) != self.block_bytes:
            raise ValueError(f"block shape {shape} of {dtype} is {item * math.prod(shape)} bytes, "
                             f"the pool's blocks are {self.block_bytes}")
        key = (dtype, shape)
        if key not in self._views:
            raw = self.backend.byte_tensor(self.max_blocks * self.block_bytes)
            self._views[key] = raw.view(dtype).view(self.max_blocks, *shape)
        return self._views[key]

    def stats(self) -> dict:
        mapped = int(self._mapped.sum())
        return dict(
            backend=self.backend.name, block_bytes=self.block_bytes, chunk_bytes=self.chunk_bytes,
            max_bytes=self.max_bytes, limit_bytes=self._limit, mapped_bytes=mapped * self.chunk_bytes,
            mapped_chunks=mapped, max_blocks=self.max_blocks, usable_blocks=self._mapped_cap,
            used_blocks=self._live_total, free_blocks=self._mapped_cap - self._live_total,
            sequences=len(self._seqs), **self.counters)

    def check(self) -> None:
        """Verify the bookkeeping (tests): owners, per-chunk counts and tables agree."""
        owned = np.flatnonzero(self._owner != FREE)
        assert np.all(self._block_chunk[owned] >= 0) and np.all(self._mapped[self._block_chunk[owned]])
        assert np.array_equal(np.bincount(self._block_chunk[owned], minlength=self.n_chunks), self._live)
        assert len(owned) == self._live_total == sum(len(s.blocks) for s in self._seqs.values())
        for sid, s in self._seqs.items():
            assert self._by_slot[s.slot] == sid and np.all(self._owner[s.blocks] == s.slot)
        assert self._mapped_cap == int(self._cap[self._mapped].sum())

    def close(self) -> None:
        """Unmap everything and free the virtual range. Views from :meth:`tensor` must not be used after."""
        mapped = np.flatnonzero(self._mapped).tolist()
        if mapped:
            self.backend.wait(self.backend.fence())
            self.backend.unmap([c * self.chunk_bytes for c in mapped], self.chunk_bytes)
            self._mapped[:] = False
        self._views.clear()
        self.backend.close()
