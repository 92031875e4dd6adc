"""`valve demo --serve`: a simulated GPU node that keeps running, for `valve top` and the metrics tests.

Per GPU, in real time: a file-backed control block under the runtime root with the real ``Arbiter`` (gate policy
and memory controller over a simulated GPU's memory), an online client (``OnlineSignal``) with Poisson requests
that each hold some GPU memory, and an offline client that passes sub-layer gates while the gate is open, parks
at a closed one, grows its KV pool up to the arbiter's limit and answers reclaim requests, as the real offline
client does at its boundaries.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from valve.api.runtime import RuntimeSpec
from valve.runtime.arbiter.loop import Arbiter
from valve.runtime.arbiter.memory_control import MemoryController
from valve.runtime.control import FLAG_ARBITER, GATE_OPEN, ControlBlock, control_path, write_pair
from valve.runtime.memory.backend import MemorySnapshot
from valve.runtime.online.signal import DEFAULT_LEASE_NS, OnlineSignal
from valve.runtime.sim import SimGPU

CHUNK = 256 << 20  # the offline pool grows and shrinks in these
SUBLAYER_S = 0.001  # one offline sub-layer


class NodeMemory:
    """What the arbiter's memory controller reads of the GPU: total, free, and what online holds."""

    def __init__(self, gpu: SimGPU, online) -> None:
        self.gpu, self.online = gpu, online

    def snapshot(self) -> MemorySnapshot:
        return MemorySnapshot(self.gpu.capacity_bytes, self.gpu.mem_free, self.online.mem_used)


def sim_uuid(i: int) -> str:
    return f"GPU-5eed0000-0000-4000-8000-{i:012d}"


class SimTenantGPU:
    """One simulated GPU with its arbiter and two tenants, each on a thread."""

    def __init__(self, root: Path, index: int, rate_per_s: float, seed: int, capacity_bytes: int = 80 << 30,
                 spec: RuntimeSpec | None = None) -> None:
        self.uuid = sim_uuid(index)
        self.path = control_path(self.uuid, root)
        self.gpu = SimGPU(uuid=self.uuid, capacity_bytes=capacity_bytes)
        self.on_ctx, self.off_ctx = self.gpu.context("online"), self.gpu.context("offline")
        self.cb = ControlBlock.create(self.path)
        write_pair(self.path.parent, f"demo-{index}")
        spec = spec or RuntimeSpec()
        self.arbiter = Arbiter(self.cb, spec, memory=MemoryController(spec, NodeMemory(self.gpu, self.on_ctx)))
        self.rate, self.rng = rate_per_s, random.Random(seed)
        self.stop = threading.Event()
        self.arbiter_stop = threading.Event()
        self.pool: list = []
        self.threads = [threading.Thread(target=self.arbiter.run, args=(self.arbiter_stop,), daemon=True),
                        threading.Thread(target=self._online, daemon=True),
                        threading.Thread(target=self._offline, daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _online(self) -> None:
        sig = OnlineSignal(self.cb)
        while not self.stop.wait(self.rng.expovariate(self.rate)):
            held = self.gpu.malloc(self.on_ctx, self.rng.randint(1, 6) << 30)  # KV of this request
            sig.begin()
            self.stop.wait(self.rng.uniform(0.02, 0.15))
            sig.end()
            self.gpu.free(held)
        sig.close()

    def _offline(self) -> None:
        f, parked = self.cb.fields, False
        while not self.stop.wait(SUBLAYER_S):
            now = time.monotonic_ns()
            stale = now - f.heartbeat_ns > (f.lease_ns or DEFAULT_LEASE_NS)
            if f.gate != GATE_OPEN and stale and f.flags & FLAG_ARBITER:  # the lease: never stall on a dead arbiter
                f.gate = GATE_OPEN
                f.forced_opens += 1
            if f.gate == GATE_OPEN:
                f.offline_progress += 1
                parked = False
            elif not parked:
                parked = True
                f.parked_ns = now
                f.parked_seq += 1
            self._memory(f)

    def _memory(self, f) -> None:
        seq = int(f.reclaim_req_seq)
        if seq % 2 == 0 and seq > f.reclaim_ack_seq:
            want, given = int(f.reclaim_req_bytes), 0
            while self.pool and given < want:
                a = self.pool.pop()
                given += a.nbytes
                self.gpu.free(a)
                f.evicted_sequences += 1
            f.reclaim_ack_bytes = given
            f.reclaim_ack_seq = seq
        limit = int(f.offline_limit_bytes)
        while (len(self.pool) + 1) * CHUNK <= limit and self.gpu.mem_free >= CHUNK:
            self.pool.append(self.gpu.malloc(self.off_ctx, CHUNK))
        f.offline_pool_bytes = len(self.pool) * CHUNK

    def stop_arbiter(self) -> None:
        """The arbiter goes away (its heartbeat goes stale); the tenants keep running."""
        self.arbiter_stop.set()
        self.threads[0].join()

    def close(self) -> None:
        self.stop.set()
        self.arbiter_stop.set()
        for t in self.threads:
            t.join()


class SimNode:
    def __init__(self, root: Path | str, gpus: int = 1, rate_per_s: float = 8.0, seed: int = 0) -> None:
        self.root = Path(root)
        self.gpus = [SimTenantGPU(self.root, i, rate_per_s, seed * 1000 + i) for i in range(gpus)]

    def __enter__(self) -> SimNode:
        for g in self.gpus:
            g.start()
        return self

    def __exit__(self, *exc) -> None:
        for g in self.gpus:
            g.close()


def serve(root: Path | str, gpus: int, rate_per_s: float, seed: int, stop: threading.Event) -> None:
    with SimNode(root, gpus, rate_per_s, seed):
        stop.wait()
