"""Memory reclaim benchmark: KVPool reclaim latency with live KV data, the freed memory in another process, and
selective vs FIFO eviction on one offline trace with online memory bursts.

    python3 bench/reclaim.py [--quick] [--out DIR] [--device cuda|cpu] [--seed N]

1. Latency (real CUDA): for each size (1, 4, 8, 16 GiB) a KVPool maps twice that, fills a share of its blocks with
   live, patterned KV data scattered over all chunks, and reclaims the size: compaction copies, the stream wait and
   the unmaps are all inside the timed call. Data is checked after each reclaim (moved blocks included). p50/p99
   over repetitions. ``--device cpu`` runs the same code on the simulated backend (modelled device time).
2. Handover: the device is filled (pool + a filler tensor) so that a fresh process cannot allocate the size; the
   pool reclaims it; a child process then allocates exactly the released bytes with torch (and, before the
   reclaim, is shown to fail).
3. Eviction policies: a modelled offline engine (chunked prefill, paged KV from a KVPool on the simulated
   backend, block tables and progress reported to the pool) runs one seeded trace next to online memory bursts,
   with Valve's real MemoryController and ReclaimHandler between them; offline output tokens/s for offline alone,
   FIFO and selective; loss = 1 - tokens/s / alone. Timing is modelled (settings in the JSON).

Writes ``<out>/reclaim_<gpu>.json`` and ``<out>/reclaim_<gpu>.txt``.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import output  # noqa: E402
from bench.harness.env import record  # noqa: E402
from valve.api.runtime import ReclaimLimits, ReservePolicy, RuntimeSpec  # noqa: E402
from valve.runtime.arbiter.memory_control import MemoryController  # noqa: E402
from valve.runtime.control import ControlBlock  # noqa: E402
from valve.runtime.memory.client import ReclaimHandler  # noqa: E402
from valve.runtime.memory.errors import PoolExhausted  # noqa: E402
from valve.runtime.memory.evict import Candidate, choose_evictions  # noqa: E402
from valve.runtime.memory.pool import KVPool  # noqa: E402
from valve.runtime.memory.sim import SimBackend, SimGpuInfo  # noqa: E402
from valve.runtime.sim import SimGPU  # noqa: E402
from valve.stats import percentile  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
MS = 1_000_000


# ---------------------------------------------------------------------------------------------------------
# 1. reclaim latency with live data
# ---------------------------------------------------------------------------------------------------------
def make_backend(device: str, gpu: SimGPU | None = None, batch_unmap: bool = False):
    if device == "cuda":
        from valve.runtime.memory.cuda import CudaBackend

        return CudaBackend(batch_unmap=batch_unmap)
    return SimBackend(gpu=gpu, store=True)


CHECK_BATCH = 1024  # blocks per gather/scatter when stamping and checking live data


def fill_live(pool: KVPool, view, live_fraction: float, rng: random.Random) -> dict:
    """Map the whole pool with sequences of 1-8 blocks, then free random ones until ``live_fraction`` of the
    blocks stay live; stamp each live block with a value of its own. Returns {seq: [values]}."""
    import torch

    n, s = pool.free_blocks(), 0
    while n > 0:
        k = min(n, rng.randint(1, 8))
        pool.allocate(s, k)
        n -= k
        s += 1
    seqs = pool.sequences()
    rng.shuffle(seqs)
    target = int(pool.used_blocks() * live_fraction)
    for sid in seqs:
        if pool.used_blocks() - len(pool.block_table(sid)) < target:
            break
        pool.free(sid)
    values = {}
    ids, vals = [], []
    for sid in pool.sequences():
        table = pool.block_table(sid)
        values[sid] = [sid * 1000 + i + 1 for i in range(len(table))]
        ids += table
        vals += values[sid]
    for i in range(0, len(ids), CHECK_BATCH):
        idx = torch.tensor(ids[i:i + CHECK_BATCH], device=view.device)
        view[idx] = torch.tensor(vals[i:i + CHECK_BATCH], dtype=view.dtype, device=view.device)[:, None]
    return values


def check_live(pool: KVPool, view, values: dict) -> None:
    import torch

    ids, vals = [], []
    for sid in pool.sequences():
        ids += pool.block_table(sid)
        vals += values[sid]
    if not ids:
        return
    bad = 0
    for i in range(0, len(ids), CHECK_BATCH):  # in batches: a gather of every live block would double the memory
        idx = torch.tensor(ids[i:i + CHECK_BATCH], device=view.device)
        want = torch.tensor(vals[i:i + CHECK_BATCH], dtype=view.dtype, device=view.device)[:, None]
        bad += int((view[idx] != want).any(dim=1).sum())
    if bad:
        raise AssertionError(f"{bad} of {len(ids)} live blocks corrupted after reclaim")


PHASES = ("plan", "copy", "wait", "unmap", "book")


def latency(device: str, sizes_gib, reps: int, live_fraction: float, block_bytes: int, chunk_bytes: int,
            seed: int, batch_unmap: bool = False) -> list[dict]:
    import torch

    rng = random.Random(seed)
    rows = []
    for size in sizes_gib:
        nbytes = int(size * GiB)
        times, copied, moved, calls = [], [], [], []
        phases = {k: [] for k in PHASES}
        for rep in range(reps + 1):  # rep 0 warms up (first cuMemCreate, kernels) and is not counted
            be = make_backend(device, batch_unmap=batch_unmap)
            pool = KVPool(be, block_bytes=block_bytes, chunk_bytes=chunk_bytes, max_bytes=2 * nbytes)
            try:
                view = pool.tensor(torch.int32, (block_bytes // 4,))
                values = fill_live(pool, view, live_fraction, rng)
                if device == "cuda":
                    torch.cuda.synchronize()
                t_dev = getattr(be, "elapsed_ns", 0)
                calls0 = getattr(be, "unmap_calls", 0)
                t0 = time.perf_counter()
                res = pool.reclaim(nbytes)
                dt = time.perf_counter() - t0
                if device != "cuda":
                    dt = (be.elapsed_ns - t_dev) / 1e9  # the simulated backend's modelled device time
                if res.evicted:
                    raise AssertionError(f"reclaim of {size} GiB evicted {len(res.evicted)} sequences; "
                                         f"live_fraction {live_fraction} should leave room")
                check_live(pool, view, values)
                if rep == 0:
                    continue
                times.append(dt)
                copied.append(res.copied_bytes)
                moved.append(len(res.moved))
                calls.append(getattr(be, "unmap_calls", 0) - calls0)
                for k in PHASES:
                    phases[k].append(res.phases.get(k, 0.0))
            finally:
                view = None
                pool.close()
                if device == "cuda":
                    torch.cuda.empty_cache()  # the checks' temporaries must not squeeze the next, larger pool
        rows.append(dict(size_gib=size, reps=reps, chunk_mib=chunk_bytes / MiB, batch_unmap=batch_unmap,
                         p50_ms=percentile(times, 50) * 1e3, p99_ms=percentile(times, 99) * 1e3,
                         max_ms=max(times) * 1e3, copied_gib_mean=sum(copied) / len(copied) / GiB,
                         moved_blocks_mean=sum(moved) / len(moved), unmap_calls_mean=sum(calls) / len(calls),
                         phases_p50_ms={k: percentile(v, 50) * 1e3 for k, v in phases.items()},
                         phases_max_ms={k: max(v) * 1e3 for k, v in phases.items()},
                         samples_ms=[t * 1e3 for t in times]))
    return rows


def sweep(device: str, size_gib: float, chunks_mib, reps: int, live_fraction: float, block_bytes: int,
          seed: int) -> list[dict]:
    """Reclaim latency of one size over chunk sizes, with and without batched (per adjacent run) unmaps."""
    rows = []
    for chunk in chunks_mib:
        for batch in (False, True):
            rows += latency(device, [size_gib], reps, live_fraction, block_bytes, int(chunk * MiB), seed, batch)
    return rows


def driver_costs(total_gib: float, chunks_mib, reps: int) -> list[dict]:
    """Raw driver cost, no pool logic: map ``total_gib`` of adjacent chunks, then unmap them one call per chunk
    or one call for the whole run (if the driver accepts it). Median ms per operation."""
    from valve.runtime.cuda import CudaError
    from valve.runtime.memory.cuda import CudaBackend

    rows = []
    for chunk in chunks_mib:
        nbytes = int(chunk * MiB)
        n = int(total_gib * GiB) // nbytes
        offs = [i * nbytes for i in range(n)]
        row = dict(total_gib=total_gib, chunk_mib=chunk, chunks=n)
        for batch in (False, True):
            be = CudaBackend(batch_unmap=batch)
            be.reserve(n * nbytes)
            maps, unmaps = [], []
            import torch

            free0 = torch.cuda.mem_get_info()[0]
            try:
                for _ in range(reps):
                    t0 = time.perf_counter()
                    be.map(offs, nbytes)
                    t1 = time.perf_counter()
                    be.unmap(offs, nbytes)
                    t2 = time.perf_counter()
                    maps.append(t1 - t0)
                    unmaps.append(t2 - t1)
                # the memory really went back: free is what it was (within 64 MiB of driver noise)
                row[f"freed_ok_batch_{batch}"] = torch.cuda.mem_get_info()[0] >= free0 - 64 * MiB
            except CudaError as e:
                row[f"error_batch_{batch}"] = str(e)
            finally:
                be.unmap(sorted(be.mapped), nbytes)
                be.close()
            key = "batched" if batch else "per_chunk"
            row[f"map_ms_{key}"] = percentile(maps, 50) * 1e3
            row[f"unmap_ms_{key}"] = percentile(unmaps, 50) * 1e3
            row[f"unmap_max_ms_{key}"] = max(unmaps, default=float("nan")) * 1e3
            if batch:
                row["batched_accepted"] = be.batch_unmap  # False: the driver refused one unmap over several
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# 2. the freed memory in another process
# ---------------------------------------------------------------------------------------------------------
CHILD = ("import sys, torch\n"
         "n = int(sys.argv[1])\n"
         "try:\n"
         "    x = torch.empty(n, dtype=torch.uint8, device='cuda'); x.fill_(1); torch.cuda.synchronize()\n"
         "    print('ok', flush=True)\n"
         "except torch.OutOfMemoryError as e:\n"
         "    print('oom', str(e).splitlines()[0], flush=True)\n")


def child_alloc(nbytes: int, timeout: float = 120.0) -> str:
    p = subprocess.run([sys.executable, "-c", CHILD, str(nbytes)], capture_output=True, text=True,
                       timeout=timeout)
    out = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode != 0 and not out:
        out = f"error rc={p.returncode}: {p.stderr.strip()[-300:]}"
    return out


def handover(size_gib: float, block_bytes: int, chunk_bytes: int, child_reserve: int, check_before: bool) -> dict:
    """Fill the GPU, reclaim ``size_gib`` from the pool, and let a child process allocate exactly that."""
    import torch

    from valve.runtime.memory.cuda import CudaBackend

    nbytes = int(size_gib * GiB)
    pool = KVPool(CudaBackend(), block_bytes=block_bytes, chunk_bytes=chunk_bytes, max_bytes=nbytes + 4 * GiB)
    filler = None
    try:
        pool.allocate("live", (nbytes + 2 * GiB) // block_bytes)
        view = pool.tensor(torch.uint8, (block_bytes,))
        view[pool.block_table("live")[:16]] = 7
        free, total = torch.cuda.mem_get_info()
        # leave room for the child's CUDA context and torch's workspace, not for its allocation
        filler_bytes = max(0, free - child_reserve)
        filler = torch.empty(filler_bytes, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        before = child_alloc(nbytes) if check_before else "skipped"
        res = pool.reclaim(nbytes)  # evicts part of "live": the pool is full of it
        free_after = torch.cuda.mem_get_info()[0]
        after = child_alloc(res.released_bytes)
        return dict(size_gib=size_gib, released_bytes=res.released_bytes, reclaim_ms=res.seconds * 1e3,
                    free_before=free_before, free_after=free_after, child_before=before, child_after=after,
                    ok=after == "ok" and (not check_before or before.startswith("oom")))
    finally:
        del filler
        view = None
        pool.close()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# 3. selective vs FIFO on a modelled offline engine with online memory bursts
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceConfig:
    capacity_gib: float = 80.0
    online_weights_gib: float = 16.0
    online_base_gib: float = 2.0
    offline_weights_gib: float = 16.0
    kv_bytes_per_token: int = 128 << 10  # an 8B Llama in fp16: 2 * 32 layers * 8 heads * 128 * 2 bytes
    block_tokens: int = 16
    chunk_bytes: int = 128 << 20
    burst_every_s: float = 6.0  # mean gap between online bursts (exponential)
    burst_gib: tuple[float, float] = (6.0, 20.0)
    burst_s: tuple[float, float] = (0.5, 3.0)
    prompt: tuple[int, int] = (256, 2048)
    output: tuple[int, int] = (64, 512)
    max_batch: int = 256
    prefill_budget: int = 2048  # prompt tokens per step (chunked prefill)
    step_ms: float = 12.0  # fixed cost of a step
    decode_ms_per_seq: float = 0.04
    prefill_ms_per_token: float = 0.02
    tick_ms: float = 1.0  # arbiter loop and sub-layer boundary period
    min_reserve_gib: float = 1.0


@dataclass
class _Req:
    rid: int
    prompt: int
    output: int
    generated: int = 0
    computed: int = 0  # tokens whose KV is in the cache
    blocks: int = 0
    evictions: int = 0


def bursts(cfg: TraceConfig, seconds: float, seed: int) -> list[tuple[float, float, float]]:
    rng = random.Random(seed * 7919 + 1)
    out, t = [], rng.expovariate(1 / cfg.burst_every_s)
    while t < seconds:
        d = rng.uniform(*cfg.burst_s)
        out.append((t, t + d, rng.uniform(*cfg.burst_gib) * GiB))
        t += d + rng.expovariate(1 / cfg.burst_every_s)
    return out


class _Trace:
    """The modelled offline engine and the online tenant of one ``trace`` run; each tick is the named steps."""

    def __init__(self, policy: str, seconds: float, seed: int, cfg: TraceConfig, online: bool,
                 n_requests: int | None, recompute: bool, engine_victims: str) -> None:
        self.policy, self.seconds, self.cfg, self.online = policy, seconds, cfg, online
        self.n_requests, self.recompute, self.engine_victims = n_requests, recompute, engine_victims
        self.rng = random.Random(seed)
        self.gpu = SimGPU(capacity_bytes=int(cfg.capacity_gib * GiB))
        self.on_ctx, off_ctx = self.gpu.context("online"), self.gpu.context("offline")
        self.on_ctx.malloc(int(cfg.online_weights_gib * GiB))
        off_ctx.malloc(int(cfg.offline_weights_gib * GiB))
        self.cb = ControlBlock.anonymous()
        spec = RuntimeSpec(eviction_policy=policy,
                           reserve=ReservePolicy(min_bytes=int(cfg.min_reserve_gib * GiB), decay_seconds=30.0),
                           reclaim=ReclaimLimits(grow_bytes_per_second=16 * GiB))
        self.ctl = MemoryController(spec, SimGpuInfo(self.gpu, ("online",)))
        self.pool = KVPool(SimBackend(self.gpu, off_ctx, store=False), block_bytes=cfg.kv_bytes_per_token * cfg.block_tokens,
                           chunk_bytes=cfg.chunk_bytes, max_bytes=self.gpu.capacity_bytes, policy=policy)
        self.running: dict[int, _Req] = {}
        self.queue: deque[_Req] = deque()
        self.evicted_ids: set[int] = set()
        self.stats = dict(evictions=0, recomputed_tokens=0, recomputed_reclaim=0, recomputed_engine=0,
                          engine_preemptions=0, online_short_ms=0.0, finished=0, output_tokens=0)
        self.handler = ReclaimHandler(self.pool, self.cb, on_reclaim=self.on_reclaim)
        self.next_id = 0
        if n_requests is not None:
            self.queue.extend(self.new_request() for _ in range(n_requests))
        self.plan = bursts(cfg, seconds, seed) if online else []
        self.online_allocs: list = []
        self.base = int(cfg.online_base_gib * GiB) if online else 0
        self.step_end = 0
        self.step_work: dict[int, int] = {}  # rid -> tokens this step computes (prefill chunk, or 1 for decode)

    # ---- sequences in and out of the pool
    def on_reclaim(self, res) -> None:
        for rid in res.evicted:
            r = self.running.pop(rid)
            self.stats["evictions"] += 1
            self.stats["recomputed_reclaim"] += r.computed if self.recompute else 0
            self.requeue(r)

    def requeue(self, r: _Req) -> None:
        if self.recompute:
            r.computed = 0
        r.blocks = 0
        r.evictions += 1
        self.evicted_ids.add(r.rid)
        self.queue.appendleft(r)  # first in line: its generated tokens are kept, its KV recomputed

    def new_request(self) -> _Req:
        self.next_id += 1
        return _Req(self.next_id, self.rng.randint(*self.cfg.prompt), self.rng.randint(*self.cfg.output))

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.cfg.block_tokens)

    def admit(self) -> None:
        while len(self.running) < self.cfg.max_batch:
            if not self.queue:
                if self.n_requests is not None:
                    return
                self.queue.append(self.new_request())
            r = self.queue[0]
            need = self.blocks_for(r.prompt + r.generated)
            try:
                self.pool.allocate(r.rid, need)
            except PoolExhausted:
                return
            self.queue.popleft()
            r.blocks = need
            self.running[r.rid] = r
            self.pool.set_progress(r.rid, r.computed)  # lost work if evicted: tokens, from the first step on

    def engine_victim(self, r: _Req) -> _Req:
        if self.engine_victims == "newest":
            return max(self.running.values(), key=lambda x: x.rid)
        cands = [Candidate(x.rid, x.blocks, x.computed, i) for i, x in enumerate(self.running.values())]
        return self.running[choose_evictions(cands, 1, self.policy)[0].seq_id]  # running is in admission order

    # ---- one tick
    def online_tick(self, t: float) -> None:
        """The online tenant holds what it wants, as far as free memory allows."""
        cfg, gpu = self.cfg, self.gpu
        want = self.base + int(sum(b for s, e, b in self.plan if s <= t < e))
        have = self.on_ctx.mem_used - int(cfg.online_weights_gib * GiB)
        while have > want and self.online_allocs:
            have -= self.online_allocs[-1].nbytes
            gpu.free(self.online_allocs.pop())
        if want > have:
            got = min(want - have, gpu.mem_free)
            if got > 0:
                self.online_allocs.append(self.on_ctx.malloc(got))
            if got < want - have:
                self.stats["online_short_ms"] += cfg.tick_ms
        self.cb.fields.online_mem_bytes = want

    def finish_step(self) -> None:
        """Account the tokens of the sequences still running (one evicted mid-step lost its work)."""
        for rid, n in self.step_work.items():
            r = self.running.get(rid)
            if r is None:
                continue
            if r.computed < r.prompt + r.generated:
                r.computed += n
            else:  # decode: one token out
                r.generated += 1
                r.computed += 1
                self.stats["output_tokens"] += 1
            if r.generated >= r.output:
                self.pool.free(rid)
                del self.running[rid]
                self.stats["finished"] += 1
            else:
                self.pool.set_progress(rid, r.computed)

    def grow(self, r: _Req) -> bool:
        try:
            self.pool.allocate(r.rid, 1)
        except PoolExhausted:
            return False
        r.blocks += 1
        return True

    def decode_block(self, r: _Req) -> bool:
        """Room for one more token of ``r``; a full pool preempts a victim (the engine's own). False: no room."""
        if self.blocks_for(r.computed + 1) <= r.blocks or self.grow(r):
            return True
        victim = self.engine_victim(r)
        self.pool.free(victim.rid)
        del self.running[victim.rid]
        self.stats["engine_preemptions"] += 1
        self.stats["recomputed_engine"] += victim.computed if self.recompute else 0
        self.requeue(victim)
        self.step_work.pop(victim.rid, None)
        return victim is not r and self.grow(r)

    def plan_step(self) -> float:
        """Admit, pick this step's prefill chunks and decodes; returns its duration in ms."""
        cfg = self.cfg
        self.admit()
        self.step_work, budget, decodes = {}, cfg.prefill_budget, 0
        for r in sorted(self.running.values(), key=lambda r: r.rid):
            todo = r.prompt + r.generated - r.computed
            if todo > 0:
                if budget > 0:
                    self.step_work[r.rid] = min(todo, budget)
                    budget -= self.step_work[r.rid]
                continue
            if not self.decode_block(r):
                continue
            self.step_work[r.rid] = 1
            decodes += 1
        prefill = cfg.prefill_budget - budget
        return cfg.step_ms + cfg.decode_ms_per_seq * max(decodes, 0) + cfg.prefill_ms_per_token * prefill

    def done(self, now: int) -> bool:
        if self.n_requests is None:
            return now >= int(self.seconds * 1e9)
        return self.stats["finished"] >= self.n_requests

    def run(self) -> dict:
        now = 0
        while not self.done(now):
            if now > 3600 * 1e9:
                raise RuntimeError("trace did not finish in an hour of simulated time")
            self.online_tick(now / 1e9)
            self.ctl.step(now, self.cb)
            self.handler.poll()  # a sub-layer boundary: evictions drop out of the step in flight
            if now >= self.step_end:
                self.finish_step()
                self.step_end = now + int(self.plan_step() * MS)
            now += int(self.cfg.tick_ms * MS)
        return self.figures(now / 1e9)

    def figures(self, secs: float) -> dict:
        stats, ctl = self.stats, self.ctl
        stats["recomputed_tokens"] = stats["recomputed_reclaim"] + stats["recomputed_engine"]
        stats.update(policy=self.policy, online=self.online, seconds=secs, tokens_per_s=stats["output_tokens"] / secs,
                     bursts=len(self.plan), reclaim_requests=ctl.requests, reclaimed_gib=ctl.reclaimed_bytes / GiB,
                     reclaim_latency_p99_ms=percentile(ctl.latencies_ns, 99) / 1e6,
                     evicted_unique=len(self.evicted_ids), unfinished=len(self.running) + len(self.queue),
                     pool_peak_gib=self.pool.counters["mapped_chunks_total"] * self.cfg.chunk_bytes / GiB)
        return stats


def trace(policy: str, seconds: float, seed: int, cfg: TraceConfig = TraceConfig(), online: bool = True,
          n_requests: int | None = None, recompute: bool = True, engine_victims: str = "policy") -> dict:
    """Run the modelled offline engine for ``seconds`` (or until ``n_requests`` finish). Returns figures.

    ``recompute=False`` is the capacity-only reference: an evicted sequence keeps its computed tokens (as if its
    KV came back for free), so what is left of the loss is the smaller pool alone. ``engine_victims``: whom the
    engine preempts when a decode finds no free block, ``policy`` (the pool's eviction policy, as Valve's
    offline client would) or ``newest`` (vLLM's recompute preemption)."""
    return _Trace(policy, seconds, seed, cfg, online, n_requests, recompute, engine_victims).run()


VARIANTS = {  # name: (policy, online bursts, recompute, engine victims)
    "alone": ("selective", False, True, "policy"),
    "capacity_only": ("selective", True, False, "policy"),
    "fifo": ("fifo", True, True, "policy"),
    "selective": ("selective", True, True, "policy"),
    "fifo_engine_newest": ("fifo", True, True, "newest"),
    "selective_engine_newest": ("selective", True, True, "newest"),
}


def _variant(args) -> dict:
    name, seconds, seed, cfg = args
    policy, online, recompute, victims = VARIANTS[name]
    return trace(policy, seconds, seed, cfg, online=online, recompute=recompute, engine_victims=victims)


def policies(seconds: float, seed: int, cfg: TraceConfig = TraceConfig(), jobs: int = 1) -> dict:
    """Every variant on the same seeded trace (in ``jobs`` forked processes). loss = 1 - tok/s / alone;
    ``capacity_only`` (evictions cost nothing) splits each loss into capacity and eviction (recompute) parts."""
    names = list(VARIANTS)
    args = [(n, seconds, seed, cfg) for n in names]
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(args)), mp_context=mp.get_context("fork")) as ex:
            runs = list(ex.map(_variant, args))
    else:
        runs = [_variant(a) for a in args]
    out = dict(zip(names, runs, strict=True))
    alone = out["alone"]["tokens_per_s"]
    cap = 1.0 - out["capacity_only"]["tokens_per_s"] / alone
    for n in names:
        out[n]["loss"] = 1.0 - out[n]["tokens_per_s"] / alone
        out[n]["eviction_loss"] = out[n]["loss"] - cap
    for suffix in ("", "_engine_newest"):
        f, s_ = out["fifo" + suffix], out["selective" + suffix]
        out["selective_cut_vs_fifo" + suffix] = (f["loss"] - s_["loss"]) / f["loss"] if f["loss"] > 0 else 0.0
        ef, es = f["eviction_loss"], s_["eviction_loss"]
        out["selective_eviction_cut_vs_fifo" + suffix] = (ef - es) / ef if ef > 0 else 0.0
    return out


# ---------------------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    env = record(device, gpu="sim")
    if device == "cuda":  # what the CUDA runtime offers (NVML's total includes what the driver keeps)
        import torch

        env["gpu_total_bytes"] = torch.cuda.mem_get_info()[1]
    return env


def table(result: dict) -> str:
    st = result["settings"]
    lines = [f"reclaim latency (live KV data, compaction included; chunk {st['chunk_bytes'] / MiB:g} MiB, "
             f"block {st['block_bytes'] / MiB:g} MiB, batched unmap {'on' if st['batch_unmap'] else 'off'})",
             f"{'size GiB':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'copied GiB':>10} {'calls':>6} {'reps':>5}"]
    for r in result["latency"]:
        lines.append(f"{r['size_gib']:>8g} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} "
                     f"{r['copied_gib_mean']:>10.2f} {r['unmap_calls_mean']:>6.0f} {r['reps']:>5}")
    if result.get("sweep"):
        lines += ["", "8 GiB reclaim by chunk size (ms; phases are p50)",
                  f"{'chunk MiB':>9} {'batched':>7} {'p50':>7} {'p99':>7} {'calls':>6} {'copied GiB':>10} "
                  f"{'plan':>6} {'copy':>6} {'wait':>6} {'unmap':>6}"]
        for r in result["sweep"]:
            ph = r["phases_p50_ms"]
            lines.append(f"{r['chunk_mib']:>9g} {'yes' if r['batch_unmap'] else 'no':>7} {r['p50_ms']:>7.2f} "
                         f"{r['p99_ms']:>7.2f} {r['unmap_calls_mean']:>6.0f} {r['copied_gib_mean']:>10.2f} "
                         f"{ph['plan']:>6.2f} {ph['copy']:>6.2f} {ph['wait']:>6.2f} {ph['unmap']:>6.2f}")
    if result.get("driver_costs"):
        lines += ["", "driver: map + unmap of 8 GiB of adjacent chunks (ms, p50)",
                  f"{'chunk MiB':>9} {'map':>7} {'unmap/chunk':>11} {'unmap/run':>9} {'run ok':>6}"]
        for r in result["driver_costs"]:
            lines.append(f"{r['chunk_mib']:>9g} {r['map_ms_per_chunk']:>7.2f} {r['unmap_ms_per_chunk']:>11.2f} "
                         f"{r['unmap_ms_batched']:>9.2f} {str(r.get('batched_accepted')):>6}")
    lines.append("")
    for h in result.get("handover", []):
        lines.append(f"handover {h['size_gib']:g} GiB: released {h['released_bytes'] / GiB:.2f} GiB, child before "
                     f"'{h['child_before'][:40]}', after '{h['child_after'][:40]}' -> {'ok' if h['ok'] else 'FAIL'}")
    p = result["policies"]
    lines += ["", "offline throughput with online memory bursts (modelled engine, same trace; loss vs alone, split "
              "into capacity (the capacity_only run) and eviction)",
              f"{'variant':>24} {'tok/s':>7} {'loss':>6} {'evict':>6} {'reclaim ev':>10} {'engine pre':>10} "
              f"{'recomp reclaim':>14} {'recomp engine':>13}"]
    for name in VARIANTS:
        r = p[name]
        lines.append(f"{name:>24} {r['tokens_per_s']:>7.0f} {r['loss']:>6.1%} {r['eviction_loss']:>6.1%} "
                     f"{r['evictions']:>10} {r['engine_preemptions']:>10} {r['recomputed_reclaim']:>14} "
                     f"{r['recomputed_engine']:>13}")
    lines.append(f"selective cuts the loss by {p['selective_cut_vs_fifo']:.1%} versus FIFO (eviction part by "
                 f"{p['selective_eviction_cut_vs_fifo']:.1%}); with the engine's own newest-first preemption: "
                 f"{p['selective_cut_vs_fifo_engine_newest']:.1%} "
                 f"({p['selective_eviction_cut_vs_fifo_engine_newest']:.1%})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (< 60 s)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--live-fraction", type=float, default=0.25, help="live share of the mapped blocks")
    ap.add_argument("--block-mib", type=float, default=2.0)
    ap.add_argument("--chunk-mib", type=int, default=128)
    ap.add_argument("--sizes", default=None, help="GiB, comma-separated (default 1,4,8,16; quick 1,8)")
    ap.add_argument("--reps", type=int, default=None, help="default 20 (quick 3)")
    ap.add_argument("--batch-unmap", action="store_true", help="one cuMemUnmap per run of adjacent chunks")
    ap.add_argument("--sweep-chunks", default=None, help="MiB, comma-separated chunk sizes for the 8 GiB sweep "
                    "(default 32,64,128,256; quick 32,128; 'none' skips it)")
    ap.add_argument("--jobs", type=int, default=6, help="processes for the policy traces (run before CUDA)")
    ap.add_argument("--trace-seconds", type=float, default=None, help="default 300 (quick 40)")
    a = ap.parse_args(argv)
    output.checked_out(ap, a.out)
    device = a.device
    if device is None:
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    sizes = [float(x) for x in (a.sizes or ("1,8" if a.quick else "1,4,8,16")).split(",")]
    reps = a.reps or (3 if a.quick else 20)
    secs = a.trace_seconds or (40.0 if a.quick else 300.0)
    block, chunk = int(a.block_mib * MiB), a.chunk_mib * MiB
    if device == "cpu":  # a CPU byte store: everything 64x smaller (modelled times scale with bytes and chunks)
        sizes, block, chunk = [s / 64 for s in sizes], block // 16, max(2 * MiB, chunk // 8)
    t0 = time.perf_counter()
    print(f"reclaim bench ({device}): policy traces of {secs:g} s, then sizes {sizes} GiB x {reps}", flush=True)
    pol = policies(secs, a.seed, jobs=a.jobs)  # first: forked workers, CUDA not yet started in this process
    print("policies done", flush=True)
    env = environment(device)
    result = dict(env=env, settings=dict(quick=a.quick, seed=a.seed, live_fraction=a.live_fraction,
                                         block_bytes=block, chunk_bytes=chunk, sizes_gib=sizes, reps=reps,
                                         batch_unmap=a.batch_unmap,
                                         trace_seconds=secs, trace=asdict(TraceConfig())))
    result["policies"] = pol
    result["latency"] = latency(device, sizes, reps, a.live_fraction, block, chunk, a.seed,
                                batch_unmap=a.batch_unmap)
    print("latency done", flush=True)
    sweep_chunks = a.sweep_chunks or ("32,128" if a.quick else "32,64,128,256,512")
    result["sweep"], result["driver_costs"] = [], []
    if sweep_chunks != "none":
        chunks = [float(x) for x in sweep_chunks.split(",")]
        size8 = 8.0 if device == "cuda" else 8.0 / 64
        if device == "cpu":
            chunks = [max(2.0, c / 8) for c in chunks]
        result["sweep"] = sweep(device, size8, chunks, 2 if a.quick else 10, a.live_fraction, block, a.seed)
        if device == "cuda":
            result["driver_costs"] = driver_costs(8.0, [2.0] + chunks, 2 if a.quick else 5)
        print("sweep done", flush=True)
    result["handover"] = []
    if device == "cuda":
        for size in ([8.0] if a.quick else [1.0, 8.0, 16.0]):
            result["handover"].append(handover(size, block, chunk, child_reserve=1536 * MiB,
                                               check_before=(size == 8.0)))
        print("handover done", flush=True)
    result["wall_s"] = time.perf_counter() - t0
    out = Path(a.out)
    text = table(result)
    name = output.slug(env["gpu"])
    output.write(out, f"reclaim_{name}", result, text, strict=False)
    print(text)
    print(f"wrote {out / f'reclaim_{name}.json'} in {result['wall_s']:.1f} s")
    ok = all(h["ok"] for h in result["handover"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
