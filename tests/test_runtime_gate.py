"""Arbiter + online signal + offline Gate on the simulated GPU (the sim backend), driven by the simulated clock."""

import asyncio
import subprocess
import sys
import threading
import time

import pytest

from valve.api.runtime import RuntimeSpec
from valve.runtime.arbiter.loop import Arbiter
from valve.runtime.arbiter.metrics import GateMetrics
from valve.runtime.control import FLAG_CLOSE_ALLOWED, GATE_CLOSED, GATE_OPEN, ControlBlock
from valve.runtime.gate.offline import Gate, GateBusy, HostGateBackend, on_boundary
from valve.runtime.gate.sim import SimGateBackend
from valve.runtime.online.signal import OnlineSignal, online_request
from valve.runtime.sim import MS, US, SimGPU

KERNEL = 500 * US


class Node:
    """One simulated GPU with an offline loop behind a Gate, an arbiter stepping every ``period`` and an online
    signal. ``kernels`` counts offline sub-layers done."""

    def __init__(self, hysteresis_ms=5.0, cap=100.0, period=1 * MS, lease_ms=1000.0, arbiter=True):
        self.gpu = SimGPU(seed=0)
        self.cb = ControlBlock.anonymous()
        self.metrics = GateMetrics(gpu="sim")
        spec = RuntimeSpec(idle_hysteresis_ms=hysteresis_ms, max_preemptions_per_second=cap,
                           heartbeat_lease_ms=lease_ms)
        self.arb = Arbiter(self.cb, spec, metrics=self.metrics)
        self.sig = OnlineSignal(self.cb, clock=lambda: self.gpu.now)
        self.off = self.gpu.context("offline")
        self.gate = Gate(self.cb, backend=SimGateBackend(self.off, on_mark=self.fill), queue_ahead=2)
        self.done = 0
        self.alive = arbiter
        self.period = period
        self.gpu.at(0, self.fill)
        self.gpu.at(0, self.tick)

    def fill(self, now):
        while self.gate.poll():
            self.gate()
            self.off.launch(KERNEL, "offline", on_done=self.kernel_done)
        if not self.gate.room():  # stuck behind a closed gate: keep checking the lease like the real client
            self.gpu.after(10 * MS, self.fill)

    def kernel_done(self, now):
        self.done += 1

    def tick(self, now):
        if self.alive:
            self.arb.step(now)
            self.gpu.after(self.period, self.tick)

    def run(self, t_ms):
        self.gpu.run_until(int(t_ms * MS))

    def burst(self, start_ms, length_ms):
        self.gpu.at(int(start_ms * MS), lambda t: self.sig.begin())
        self.gpu.at(int((start_ms + length_ms) * MS), lambda t: self.sig.end())


def test_gate_closes_on_first_online_request_and_reopens_after_hysteresis():
    n = Node(hysteresis_ms=5.0)
    n.run(10)
    assert n.cb.fields.gate == GATE_OPEN and n.cb.fields.flags & FLAG_CLOSE_ALLOWED
    n.burst(10.2, 3)
    n.run(10.2)
    assert n.cb.fields.gate == GATE_CLOSED  # closed by the online client at request start, no arbiter round trip
    n.run(13.2 + 4.9)
    assert n.cb.fields.gate == GATE_CLOSED  # within the hysteresis
    n.run(13.2 + 5 + 1.01)  # next arbiter step after the hysteresis
    assert n.cb.fields.gate == GATE_OPEN
    assert n.cb.fields.preemptions == 1
    assert n.cb.fields.reopen_ns - int(13.2 * MS) in range(5 * MS, 6 * MS + 1)


def test_offline_makes_no_progress_while_closed_and_full_progress_when_idle():
    n = Node()
    n.run(100)
    idle_rate = n.done / 100  # kernels per ms with online idle
    assert idle_rate == pytest.approx(1 / (KERNEL / MS), rel=0.02)  # the GPU is never idle: full progress
    n.burst(100, 50)
    n.run(101)  # the sub-layer in flight (and one queued past its gate) may finish
    before = n.done
    n.run(150)
    assert n.done == before  # nothing while online is busy
    assert n.done - int(100 * idle_rate) <= 1
    n.run(300)
    assert (n.done - before) == pytest.approx(((300 - 156) / (KERNEL / MS)), abs=2)
    assert n.gate.passed >= n.done - 2 and n.cb.fields.offline_progress == n.gate.passed


def test_one_preemption_per_burst():
    n = Node(hysteresis_ms=5.0)
    # 10 bursts, each 8 overlapping/back-to-back requests with gaps shorter than the hysteresis
    for b in range(10):
        t0 = 20 + b * 50
        for r in range(8):
            n.burst(t0 + r * 2, 3)
    n.run(600)
    assert n.cb.fields.preemptions == 10
    assert n.cb.fields.online_requests == 80
    assert n.metrics.preemptions._value.get() == 10
    assert n.cb.fields.gate == GATE_OPEN and n.sig.inflight == 0


def test_preemption_rate_cap_holds():
    n = Node(hysteresis_ms=0.0, cap=5.0)
    times = []
    adopt = n.arb.policy.adopt_close
    n.arb.policy.adopt_close = lambda t: (times.append(t), adopt(t))
    for i in range(100):  # 50 requests/s for 2 s, each its own burst
        n.burst(10 + i * 20, 1)
    n.run(2100)
    assert n.cb.fields.online_requests == 100
    assert len(times) == n.arb.policy.preemptions == n.cb.fields.preemptions >= 10
    for i, t in enumerate(times):  # at most 5 closures in any one-second window
        assert sum(1 for u in times[i:] if u - t < 1_000_000_000) <= 5
    assert n.arb.policy.capped > 0 and n.metrics.capped._value.get() == n.arb.policy.capped


def test_dead_arbiter_does_not_stall_offline_beyond_the_lease():
    n = Node(lease_ms=200.0)
    n.burst(10, 10_000)  # a request that holds the gate closed
    n.run(50)
    stuck = n.done
    n.alive = False  # the arbiter dies with the gate closed (no more heartbeats)
    n.run(200)
    assert n.done == stuck and n.cb.fields.gate == GATE_CLOSED  # lease not expired yet (last beat at ~50 ms)
    n.run(400)
    assert n.cb.fields.forced_opens == 1 and n.gate.forced_opens == 1
    assert n.done > stuck + 250  # offline runs again within lease + poll period


def test_preemption_latency_is_measured_from_close_to_park():
    n = Node()
    n.burst(10.1, 2)
    n.run(30)
    lat = n.arb.preemption_latencies_ns
    assert len(lat) == 1 and 0 <= lat[0] <= KERNEL  # the sub-layer in flight finishes, then offline parks
    assert n.metrics.preemption_latency._sum.get() == pytest.approx(lat[0] / 1e9)


def test_gate_closed_time_and_metrics():
    n = Node(hysteresis_ms=5.0)
    n.burst(10, 20)
    n.run(100)
    closed = n.cb.fields.gate_closed_ns
    assert 25 * MS <= closed <= 26 * MS + 1
    assert n.metrics.closed_seconds._value.get() == pytest.approx(closed / 1e9)
    n.arb.step(n.gpu.now)  # the counter follows the control block at each arbiter step
    assert n.metrics.offline_progress._value.get() == n.cb.fields.offline_progress > 0


def test_sim_backend_never_blocks():
    n = Node()
    n.run(1)
    assert not n.gate.room()
    with pytest.raises(GateBusy):
        n.gate()


def test_online_client_does_not_close_without_an_arbiter():
    cb = ControlBlock.anonymous()
    sig = OnlineSignal(cb)
    assert sig.begin() is False and cb.fields.gate == GATE_OPEN  # no FLAG_CLOSE_ALLOWED: nothing to do
    assert cb.inflight() == 1
    sig.end()
    assert cb.inflight() == 0
    with pytest.raises(ValueError, match="without a matching begin"):
        sig.end()


def test_online_request_in_sync_and_async_code():
    cb = ControlBlock.anonymous()
    cb.fields.flags = FLAG_CLOSE_ALLOWED
    cb.fields.heartbeat_ns = time.monotonic_ns()  # a live arbiter
    with online_request(cb):
        assert cb.inflight() == 1 and cb.fields.gate == GATE_CLOSED

    async def handler():
        with online_request(cb):
            await asyncio.sleep(0)
            return cb.inflight()

    assert asyncio.run(handler()) == 1
    assert cb.inflight() == 0


def test_online_request_without_a_control_block_is_a_noop(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VALVE_RUNTIME_DIR", str(tmp_path))
    with online_request(gpu_uuid="GPU-missing"):  # online is never blocked or failed by Valve
        pass
    assert "online signal disabled" in caplog.text
    monkeypatch.delenv("VALVE_GPU_UUID", raising=False)
    with pytest.raises(ValueError, match="VALVE_GPU_UUID"):
        online_request()


def test_host_backend_waits_for_the_gate_and_runs_hooks():
    cb = ControlBlock.anonymous()
    g = Gate(cb, backend=HostGateBackend(), lease_ms=60_000)
    calls = []
    g.on_boundary(lambda: calls.append("own"))
    on_boundary_hook = on_boundary(lambda: calls.append("global"))
    try:
        g()
        assert calls == ["global", "own"] and g.boundaries == 1
        import time

        cb.fields.heartbeat_ns = time.monotonic_ns()
        cb.fields.gate = GATE_CLOSED
        t = threading.Thread(target=g)
        t.start()
        t.join(0.2)
        assert t.is_alive()  # held at the boundary while closed
        cb.fields.gate = GATE_OPEN
        t.join(5)
        assert not t.is_alive() and g.boundaries == 2 and g.forced_opens == 0
    finally:
        from valve.runtime.gate import offline

        offline._global_hooks.remove(on_boundary_hook)


def test_offline_module_imports_without_torch_or_cuda():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['cuda'] = None\n"
            "import valve.runtime.gate.offline as o, valve.runtime.online.signal, valve.runtime.arbiter.loop\n"
            "assert type(o.make_backend('auto', None)).__name__ == 'HostGateBackend'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_bad_gate_arguments_are_clear():
    cb = ControlBlock.anonymous()
    with pytest.raises(ValueError, match="needs a SimGPU context"):
        Gate(cb, backend="sim")
    with pytest.raises(ValueError, match="unknown gate backend"):
        Gate(cb, backend="tpu")
    with pytest.raises(ValueError, match="queue_ahead"):
        Gate(cb, backend="host", queue_ahead=0)


def test_cuda_backend_without_a_gpu_fails_clearly():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="needs a CUDA device|needs cuda-python"):
        Gate(ControlBlock.anonymous(), backend="cuda")
