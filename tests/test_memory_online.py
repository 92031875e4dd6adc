"""The online side of the memory protocol: an engine asks before it maps, the arbiter reclaims for it, on a
simulated device that several processes share (VALVE_SIM_DEVICE)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from valve.api.runtime import ReservePolicy, RuntimeSpec
from valve.runtime.arbiter.loop import Arbiter
from valve.runtime.arbiter.memory_control import MemoryController
from valve.runtime.control import GATE_CLOSED, GATE_OPEN, ControlBlock
from valve.runtime.memory.client import ReclaimHandler
from valve.runtime.memory.online import OnlineMemory
from valve.runtime.memory.pool import KVPool
from valve.runtime.memory.sim import SharedSimGPU, SharedSimGpuInfo, SimBackend, SimOutOfMemory

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 64 * KiB


def pool_on(dev: SharedSimGPU, max_bytes: int) -> KVPool:
    return KVPool(SimBackend(gpu=dev, granularity=dev.granularity), block_bytes=4 * KiB, chunk_bytes=CHUNK,
                  max_bytes=max_bytes)


def test_shared_device_counts_every_process_and_forgets_dead_ones(tmp_path):
    dev = SharedSimGPU(tmp_path / "dev", 1 * MiB, CHUNK)
    pool = pool_on(dev, 1 * MiB)
    assert pool.grow_to(768 * KiB) == 768 * KiB and dev.mem_free == 256 * KiB
    # another process takes the rest and exits without freeing: the driver would free it, so does the ledger
    code = ("import sys; from valve.runtime.memory.sim import SharedSimGPU; d = SharedSimGPU(sys.argv[1]); "
            "d.malloc(None, 256 * 1024); print(d.mem_free)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dev")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "0"
    assert dev.mem_free == 256 * KiB
    with pytest.raises(SimOutOfMemory):
        dev.malloc(None, 512 * KiB)
    assert SharedSimGpuInfo(dev).snapshot().free_bytes == 256 * KiB


def test_pool_grows_to_a_size_and_releases_only_empty_chunks_from_the_top(tmp_path):
    dev = SharedSimGPU(tmp_path / "dev", 1 * MiB, CHUNK)
    pool = pool_on(dev, 1 * MiB)
    pool.grow_to(4 * CHUNK)
    blocks = pool.allocate("a", 20)  # 16 blocks a chunk: chunks 0 and 1 hold live blocks
    assert pool.release_free(0) == 2 * CHUNK and pool.mapped_bytes == 2 * CHUNK
    assert pool.block_table("a") == blocks and dev.mem_free == 1 * MiB - 2 * CHUNK
    pool.free("a")
    assert pool.release_free(CHUNK) == CHUNK and pool.stats()["mapped_chunks"] == 1  # the lowest one stays
    pool.set_limit(2 * CHUNK)
    assert pool.grow_to(8 * CHUNK) == CHUNK  # within the limit


def test_online_ask_gets_memory_the_offline_pool_held(tmp_path):
    """Offline holds nearly all of the device; online asks for 4 chunks; the arbiter's controller (NVML-like
    info: no per-process figure) counts the ask as pending demand and posts a reclaim; the offline handler
    answers; the ask returns and the online pool maps the memory without a device failure."""
    dev = SharedSimGPU(tmp_path / "dev", 2 * MiB, CHUNK)
    cb = ControlBlock.anonymous()
    spec = RuntimeSpec(reserve=ReservePolicy(min_bytes=CHUNK, hysteresis_bytes=0, decay_seconds=1.0))
    ctl = MemoryController(spec, SharedSimGpuInfo(dev))
    offline = pool_on(dev, 2 * MiB)
    handler = ReclaimHandler(offline, cb)
    online = pool_on(dev, 1 * MiB)
    online.grow_to(CHUNK)
    mem = OnlineMemory(cb, lambda: dev.mem_free, timeout_s=10.0)
    mem.report(online.mapped_bytes)
    now = 0
    for _ in range(5):  # the offline pool grows to what the arbiter grants: all but the reserve
        ctl.step(now, cb)
        handler.poll()
        offline.grow_to(offline.limit_bytes)
        now += 10_000_000
    assert dev.mem_free == CHUNK and offline.mapped_bytes == 2 * MiB - 2 * CHUNK
    got = []
    asker = threading.Thread(target=lambda: got.append(mem.ask(4 * CHUNK)))
    asker.start()
    deadline = time.monotonic() + 10
    while asker.is_alive() and time.monotonic() < deadline:
        ctl.step(now, cb)
        handler.poll()
        now += 10_000_000
        time.sleep(0.001)
    asker.join(1)
    ctl.step(now, cb)  # collects the answer
    assert got == [True] and ctl.requests >= 1 and ctl.reclaimed_bytes >= 3 * CHUNK
    assert online.grow_to(online.mapped_bytes + 4 * CHUNK) == 4 * CHUNK and online.counters["device_ooms"] == 0
    mem.report(online.mapped_bytes)
    assert cb.fields.online_held_bytes == cb.fields.online_mem_bytes == 5 * CHUNK


def test_ask_without_an_arbiter_gives_up_at_its_deadline(tmp_path):
    dev = SharedSimGPU(tmp_path / "dev", 256 * KiB, CHUNK)
    dev.malloc(None, 256 * KiB)
    mem = OnlineMemory(ControlBlock.anonymous(), lambda: dev.mem_free, timeout_s=0.05)
    assert mem.ask(CHUNK) is False and mem.timeouts == 1 and mem.waits_s[0] >= 0.05


class Outstanding:
    """The memory controller's one attribute the arbiter loop reads besides step()."""

    outstanding = None

    def step(self, now, cb):
        pass


def test_arbiter_holds_the_gate_open_while_a_reclaim_is_unanswered():
    cb = ControlBlock.anonymous()
    memory = Outstanding()
    arb = Arbiter(cb, RuntimeSpec(idle_hysteresis_ms=1), memory=memory)
    arb.step(1_000_000)
    with _claim(cb) as slot:
        slot.started += 1  # an online request in flight: the policy closes the gate
        arb.step(2_000_000)
        assert cb.fields.gate == GATE_CLOSED
        memory.outstanding = object()  # the controller posted a reclaim; the answer comes between offline steps
        arb.step(3_000_000)
        assert cb.fields.gate == GATE_OPEN and arb.reclaim_opens == 1
        arb.step(4_000_000)  # not taken for an offline client opening it on a stale heartbeat
        assert cb.fields.gate == GATE_OPEN and arb.policy.gate_open is False
        memory.outstanding = None  # answered: closed again for the request still in flight
        arb.step(5_000_000)
        assert cb.fields.gate == GATE_CLOSED
        slot.ended += 1
    arb.step(6_000_000)
    arb.step(20_000_000)
    assert cb.fields.gate == GATE_OPEN and arb.reclaim_opens == 1


class _claim:
    """Online writer slot 0 claimed, as an online process would (the arbiter reads its counters)."""

    def __init__(self, cb):
        self.slot = cb.fields.slots[0]

    def __enter__(self):
        self.slot.state, self.slot.pid = 1, 1
        return self.slot

    def __exit__(self, *exc):
        pass


def test_elastic_engine_maps_for_a_burst_counts_a_refusal_and_gives_memory_back(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from valve.engine.choice import build_engine_model
    from valve.engine.config import get_config
    from valve.engine.elastic import ElasticKV
    from valve.engine.server import elastic_engine
    from valve.runtime.memory.sim import ENV_SIM_DEVICE

    dev = SharedSimGPU(tmp_path / "dev", 1 * MiB, 16 * KiB)
    monkeypatch.setenv(ENV_SIM_DEVICE, str(dev.path))  # the pool's default backend allocates from it
    m = build_engine_model("ours", "llama", get_config("tiny"), device="cpu", seed=0)
    eng, pool = elastic_engine(m, 8, 256, 16, 512 * KiB, 16 * KiB)  # 4 KiB blocks, 4 a chunk
    el = ElasticKV(eng, pool, base_bytes=48 * KiB, idle_release_s=0.0)
    assert pool.mapped_bytes == 48 * KiB
    for i in range(6):  # 6 requests of 40 tokens: 30 blocks, 12 free in the base, 18 more at 3 a chunk (its
        eng.add_request(i, [1 + i] * 32, 8)  # estimate leaves room for a block straddling two chunks)
    el.before_step()
    assert el.grows == 1 and pool.mapped_bytes == 48 * KiB + 6 * 16 * KiB and el.ooms == 0
    eng.run_to_completion()
    el.on_idle()
    assert pool.mapped_bytes == 48 * KiB and el.releases == 1 and dev.mem_free == 1 * MiB - 48 * KiB
    # the device is full now: the burst's mapping is refused, the requests wait and finish in the base
    filler = dev.malloc(None, dev.mem_free)
    for i in range(6):
        eng.add_request(10 + i, [1 + i] * 32, 8)
    el.before_step()
    assert el.ooms == 1 and pool.counters["device_ooms"] == 1 and pool.mapped_bytes == 48 * KiB
    eng.run_to_completion()
    assert not eng.has_work() and eng.generated == 12 * 8
    dev.free(filler)
