"""The arbiter's memory side: a dynamic reserve for online bursts, reclaim requests and rate-limited regrowth.

Each arbiter loop calls ``MemoryController.step(now_ns, cb)``. It reads free memory (``gpu_info``) and the online
demand (what the online client reports in ``online_mem_bytes``, or what NVML shows the online processes hold),
and keeps

    free >= reserve,   reserve = max(min_bytes, peak * (1 + margin_ratio) - demand)

where ``peak`` is the online demand's recent peak, decaying towards the current demand with a half-life of
``decay_seconds``: memory online used recently stays free, so most bursts find it free and need no reclaim.

What online holds comes from NVML when the controller's ``gpu_info`` knows the online processes, else from the
online client's ``online_held_bytes`` (``valve.runtime.memory.online``: it asks before it maps); the part of
``online_mem_bytes`` above it is pending demand, which free memory must cover on top of the reserve.

- free < reserve: post "give back N bytes" (N = the gap, at most what the pool holds) and lower
  ``offline_limit_bytes`` by N; the offline client answers at its next sub-layer boundary.
- free > reserve + hysteresis: raise ``offline_limit_bytes`` so offline may grow into the excess.
- Rate limits: reclaim requests (``requests_per_second``, ``bytes_per_second``) and limit raises
  (``grow_bytes_per_second``) are token buckets holding one second's worth.

Request protocol (fields of the control block): ``reclaim_req_seq`` is a sequence lock. The arbiter makes it odd,
writes ``reclaim_req_bytes``, then makes it even: requests carry even numbers. The offline client handles
``reclaim_req_seq > reclaim_ack_seq`` (even, unchanged across its read of the bytes), then writes
``reclaim_ack_bytes`` and ``reclaim_ack_seq`` = the request's number. One request is outstanding at a time;
a newer request supersedes an older one. A request with no answer within ``ack_timeout_s`` is abandoned; one
whose gap has vanished (free >= reserve + hysteresis, e.g. the offline process died and the driver freed its
memory) is withdrawn by posting a 0-byte request. Late answers still count their bytes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from valve.api.runtime import RuntimeSpec
from valve.runtime.arbiter.memory_metrics import MemoryMetrics
from valve.runtime.memory.backend import GpuMemoryInfo

log = logging.getLogger(__name__)

SECOND = 1_000_000_000


class TokenBucket:
    """``rate`` tokens per second, holding at most ``capacity`` (default: one second's worth)."""

    def __init__(self, rate: float, capacity: float | None = None, now_ns: int = 0) -> None:
        self.rate = float(rate)
        self.capacity = float(capacity if capacity is not None else max(rate, 1.0))
        self.tokens, self.last = self.capacity, now_ns

    def refill(self, now_ns: int) -> float:
        if now_ns > self.last:
            self.tokens = min(self.capacity, self.tokens + (now_ns - self.last) / SECOND * self.rate)
            self.last = now_ns
        return self.tokens

    def take(self, n: float, now_ns: int) -> float:
        """Take up to ``n`` tokens; returns how many were taken."""
        got = min(float(n), self.refill(now_ns))
        self.tokens -= got
        return got


class PeakTracker:
    """Recent peak of a signal: jumps up with it, decays towards it with a half-life."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_ns = half_life_s * SECOND
        self.peak = 0.0
        self.last: int | None = None

    def update(self, now_ns: int, value: float) -> float:
        if self.last is not None and now_ns > self.last and self.peak > value:
            self.peak = value + (self.peak - value) * 0.5 ** ((now_ns - self.last) / self.half_life_ns)
        self.peak = max(self.peak, float(value))
        self.last = now_ns
        return self.peak


@dataclass
class Request:
    seq: int
    nbytes: int
    posted_ns: int


def set_limit(f, limit: int, basis: int) -> None:
    """Publish the offline pool's limit and the pool figure it was built on: the limit first, the basis last, so a
    client that reads the basis, the limit and the basis again (and sees the basis unchanged) has a matching pair."""
    f.offline_limit_bytes = limit
    f.offline_limit_basis = basis


class MemoryController:
    """Dynamic reservation and reclaim requests for one GPU. Call :meth:`step` from the arbiter loop."""

    def __init__(
        self,
        spec: RuntimeSpec,
        gpu_info: GpuMemoryInfo,
        metrics: MemoryMetrics | None = None,
        ack_timeout_s: float = 2.0,
        min_request_bytes: int = 32 << 20,
    ) -> None:
        self.spec, self.gpu = spec, gpu_info
        self.metrics = metrics or MemoryMetrics()
        r, lim = spec.reserve, spec.reclaim
        self.peak = PeakTracker(r.decay_seconds)
        self.req_bucket = TokenBucket(lim.requests_per_second)
        self.byte_bucket = TokenBucket(lim.bytes_per_second)
        self.grow_bucket = TokenBucket(lim.grow_bytes_per_second)
        self.ack_timeout_ns = int(ack_timeout_s * SECOND)
        self.min_request_bytes = min_request_bytes
        self.outstanding: Request | None = None
        self.seen_ack: int | None = None
        self._seen_evicted = self._seen_tokens = None
        # figures for tests and logs
        self.reserve = 0
        self.shortfall = 0
        self.requests = self.acks = self.abandoned = self.withdrawn = 0
        self.reclaimed_bytes = 0
        self.latencies_ns: list[int] = []
        self._started = False

    # ---- the loop --------------------------------------------------------------------------------------------
    def step(self, now_ns: int, cb) -> None:
        f = cb.fields
        if not self._started:
            self._start(now_ns, f)
        snap = self.gpu.snapshot()
        reported = int(f.online_mem_bytes)
        held = snap.online_bytes
        if held is None and f.online_held_bytes:  # no per-process NVML figure: the online client's own, if it
            held = int(f.online_held_bytes)  # reports one (valve.runtime.memory.online); else its demand is all held
        demand = max(reported, held or 0)
        peak = self.peak.update(now_ns, demand)
        rp = self.spec.reserve
        self.reserve = max(rp.min_bytes, math.ceil(peak * (1.0 + rp.margin_ratio)) - demand)
        pending = max(0, reported - held) if held is not None else 0  # demand online asked for, not yet holds
        headroom = snap.free_bytes - (self.reserve + pending)
        pool = int(f.offline_pool_bytes)
        f.reserve_target_bytes = self.reserve
        self.metrics.reserve.set(self.reserve)
        self._collect(now_ns, f, headroom)
        self.shortfall = max(0, -headroom - pool) if headroom < 0 else 0
        self.metrics.shortfall.set(self.shortfall)
        if self.outstanding is None:
            if headroom < 0:
                self._post(now_ns, f, -headroom, pool)
            else:
                self._grow(now_ns, f, headroom, pool)
        self.metrics.offline_limit.set(int(f.offline_limit_bytes))

    def _start(self, now_ns: int, f) -> None:
        """Pick up a control block that has history (arbiter restart): an even unanswered request stays live."""
        self._started = True
        for b in (self.req_bucket, self.byte_bucket, self.grow_bucket):
            b.last = now_ns
        self.seen_ack = int(f.reclaim_ack_seq)
        seq = int(f.reclaim_req_seq)
        if seq % 2:  # an arbiter died mid-post: finish it as a 0-byte request
            f.reclaim_req_bytes = 0
            f.reclaim_req_seq = seq + 1
            seq += 1
        if seq > self.seen_ack:
            self.outstanding = Request(seq, int(f.reclaim_req_bytes), now_ns)
        self._seen_evicted, self._seen_tokens = int(f.evicted_sequences), int(f.recomputed_tokens)

    def _collect(self, now_ns: int, f, headroom: int) -> None:
        """Answers and offline counters since the last loop; expire an unanswered request."""
        ack = int(f.reclaim_ack_seq)
        if ack != self.seen_ack:
            nbytes = int(f.reclaim_ack_bytes)
            self.seen_ack = ack
            self.acks += 1
            self.reclaimed_bytes += nbytes
            self.metrics.reclaimed.inc(nbytes)
            req = self.outstanding
            if req is not None and ack >= req.seq:
                if ack == req.seq:
                    lat = now_ns - req.posted_ns
                    self.latencies_ns.append(lat)
                    self.metrics.latency.observe(lat / SECOND)
                    if nbytes < req.nbytes:
                        log.warning("offline gave back %d of the %d bytes asked (request %d): its pool holds no "
                                    "more", nbytes, req.nbytes, req.seq)
                self.outstanding = None
        ev, tok = int(f.evicted_sequences), int(f.recomputed_tokens)
        d_ev = ev - self._seen_evicted if ev >= self._seen_evicted else ev  # a restarted client counts from 0
        d_tok = tok - self._seen_tokens if tok >= self._seen_tokens else tok
        self._seen_evicted, self._seen_tokens = ev, tok
        if d_ev:
            self.metrics.evicted.inc(d_ev)
        if d_tok:
            self.metrics.recomputed.inc(d_tok)
        req = self.outstanding
        if req is None:
            return
        if headroom >= self.spec.reserve.hysteresis_bytes and req.nbytes > 0:
            log.info("withdrawing reclaim request %d: the reserve is met without it", req.seq)
            self.withdrawn += 1
            self.metrics.abandoned.inc()
            self._write_request(f, 0)  # supersedes it; needs no answer
            self.outstanding = None
        elif now_ns - req.posted_ns > self.ack_timeout_ns:
            log.warning("offline client did not answer reclaim request %d within %.1f s; not waiting for it",
                        req.seq, self.ack_timeout_ns / SECOND)
            self.abandoned += 1
            self.metrics.abandoned.inc()
            self.metrics.timeouts.inc()
            self.outstanding = None

    @staticmethod
    def _write_request(f, nbytes: int) -> int:
        seq = int(f.reclaim_req_seq)
        seq += 1 if seq % 2 else 2  # next even number
        f.reclaim_req_seq = seq - 1  # odd: writing
        f.reclaim_req_bytes = nbytes
        f.reclaim_req_seq = seq  # even: published
        return seq

    def _post(self, now_ns: int, f, need: int, pool: int) -> None:
        if self.shortfall:
            log.warning("reserve cannot be met: free memory is %d bytes short and the offline pool holds only %d",
                        need, pool)
        want = min(need, pool)
        set_limit(f, min(int(f.offline_limit_bytes), pool), pool)  # no growth while short
        if want <= 0:
            return
        if self.req_bucket.refill(now_ns) < 1.0:
            return
        n = int(min(want, self.byte_bucket.refill(now_ns)))
        if n < min(want, self.min_request_bytes):
            return  # wait for a worthwhile byte budget
        self.req_bucket.take(1, now_ns)
        self.byte_bucket.take(n, now_ns)
        set_limit(f, max(0, pool - n), pool)
        seq = self._write_request(f, n)
        self.outstanding = Request(seq, n, now_ns)
        self.requests += 1
        self.metrics.requests.inc()

    def _grow(self, now_ns: int, f, headroom: int, pool: int) -> None:
        """Let the pool grow into free memory above reserve + hysteresis, at a bounded rate."""
        hyst = self.spec.reserve.hysteresis_bytes
        grant = headroom - hyst if headroom > hyst else 0
        given = max(0, int(f.offline_limit_bytes) - pool)  # granted earlier, not used yet
        if grant > given:
            grant = given + int(self.grow_bucket.take(grant - given, now_ns))
        # the pool figure read again, as late as possible: a restarted offline client replaces its dead
        # predecessor's figure with its own (smaller) one; the basis tells it which figure this limit is built on,
        # so even a limit built on the dead one grants only the room
        basis = min(pool, int(f.offline_pool_bytes))
        set_limit(f, basis + grant, basis)
