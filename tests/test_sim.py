import pytest

from valve.runtime.sim import MS, US, SimGPU, SimOutOfMemory


def online_latency(gated: bool, seed: int = 1) -> list[int]:
    """Latency of a 100 us online kernel launched every 7.3 ms while offline runs 400 us kernels."""
    gpu = SimGPU(seed=seed)
    off, on = gpu.context("offline"), gpu.context("online")
    gate = [1]

    def refill(now: int) -> None:
        while off.pending() < 4:
            if gated:
                off.wait_value(lambda: gate[0], 1)
            off.launch(400 * US, on_done=refill)

    refill(0)
    lat: list[int] = []

    def arrive(now: int) -> None:
        if gated:
            gate[0] = 0
        on.launch(100 * US, on_done=lambda t: (lat.append(t - now), gate.__setitem__(0, 1)))

    for i in range(50):
        gpu.at(1 * MS + i * 7_300 * US, arrive)
    gpu.run_until(400 * MS)
    return lat


def test_time_slicing_interferes_and_gate_removes_it():
    ungated, gated = online_latency(False), online_latency(True)
    assert len(ungated) == len(gated) == 50
    # without a gate the online kernel waits for the offline slice (up to 2 ms) ...
    assert max(ungated) > 1 * MS and sum(ungated) / 50 > 500 * US
    # ... with it, only for the offline kernel in flight (< 400 us) plus a context switch
    assert max(gated) < 100 * US + 400 * US + 25 * US + 1
    assert sum(gated) / 50 < sum(ungated) / 50 / 2


def test_two_busy_contexts_share_the_gpu_in_slices():
    gpu = SimGPU(slice_ns=2 * MS, switch_ns=0)
    a, b = gpu.context("a"), gpu.context("b")
    for _ in range(1000):
        a.launch(100 * US)
        b.launch(100 * US)
    gpu.run_until(50 * MS)
    assert abs(a.busy_ns - b.busy_ns) <= 2 * MS
    assert a.busy_ns + b.busy_ns == 50 * MS
    assert gpu.switches >= 20


def test_closed_gate_stops_offline_and_opening_resumes():
    gpu = SimGPU()
    off = gpu.context("offline")
    gate = [0]
    off.wait_value(lambda: gate[0], 1)
    off.launch(1 * MS)
    gpu.run_until(10 * MS)
    assert off.kernels_done == 0 and off.blocked() and off.busy_ns == 0
    gpu.at(12 * MS, lambda now: gate.__setitem__(0, 1))
    gpu.run_until(20 * MS)
    assert off.kernels_done == 1 and off.busy_ns == 1 * MS


def test_markers_fire_in_stream_order_at_the_right_time():
    gpu = SimGPU()
    ctx = gpu.context("c")
    seen: list[tuple[str, int]] = []
    ctx.launch(3 * MS)
    ctx.marker(lambda now: seen.append(("m", now)))
    ctx.launch(2 * MS, on_done=lambda now: seen.append(("k", now)))
    gpu.run_until(10 * MS)
    assert seen == [("m", 3 * MS), ("k", 5 * MS)]


def test_memory_capacity_is_enforced_with_a_clear_error():
    gpu = SimGPU(capacity_bytes=10 << 20)
    a, b = gpu.context("a"), gpu.context("b")
    x = a.malloc(6 << 20)
    with pytest.raises(SimOutOfMemory, match=r"b asked for 5242880 bytes, 4194304 of 10485760 free"):
        b.malloc(5 << 20)
    gpu.free(x)
    b.malloc(5 << 20)
    assert gpu.mem_used == 5 << 20 and a.mem_used == 0
    with pytest.raises(ValueError, match="double free"):
        gpu.free(x)
    with pytest.raises(ValueError):
        a.malloc(0)


def test_runs_are_deterministic_under_a_seed():
    def run(seed: int) -> list[int]:
        gpu = SimGPU(seed=seed, jitter=0.2)
        c = gpu.context("c")
        ends: list[int] = []
        for _ in range(20):
            c.launch(100 * US, on_done=ends.append)
        gpu.run_until(10 * MS)
        return ends

    assert run(3) == run(3)
    assert run(3) != run(4)
