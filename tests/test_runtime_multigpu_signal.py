"""A server on several GPUs (tensor parallel): each online request closes the gate of every GPU of the pod and
counts in flight on every GPU's control block (real control files in tmp folders, one per GPU)."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest
from aiohttp import web

from valve.runtime.control import FLAG_CLOSE_ALLOWED, GATE_CLOSED, GATE_OPEN, ControlBlock
from valve.runtime.online.proxy import Proxy, make_signal
from valve.runtime.online.signal import (
    RETRY_NS,
    MultiGpuSignal,
    OnlineSignal,
    control_paths,
    online_request,
    signal_for,
)

pytestmark = pytest.mark.timeout(30)

GPUS = ("GPU-aaaa", "GPU-bbbb", "GPU-cccc")


def arbiter_runs(cb: ControlBlock, now: int | None = None) -> ControlBlock:
    """What a live arbiter publishes: clients may close the gate, and its heartbeat is fresh for the test
    (on the signal's clock ``now``, the machine's by default)."""
    cb.fields.flags |= FLAG_CLOSE_ALLOWED
    cb.fields.heartbeat_ns = (time.monotonic_ns() if now is None else now) + 60 * 10**9
    return cb


def blocks(root, gpus=GPUS, now: int | None = None) -> list[ControlBlock]:
    return [arbiter_runs(ControlBlock.create(root / g / "control"), now) for g in gpus]


def test_each_request_closes_and_counts_on_every_gpu(tmp_path):
    cbs = blocks(tmp_path)
    sig = MultiGpuSignal([tmp_path / g / "control" for g in GPUS])
    assert sig.begin() is True
    assert [cb.fields.gate for cb in cbs] == [GATE_CLOSED] * 3
    assert [cb.inflight() for cb in cbs] == [1, 1, 1] and sig.last_gated and sig.closes == 3
    for cb in cbs:  # the arbiters reopen their gates while the request runs
        cb.fields.gate = GATE_OPEN
    assert sig.begin() is True  # a second request closes them again
    assert [cb.inflight() for cb in cbs] == [2, 2, 2] and sig.closes == 6
    sig.end()
    sig.end()
    assert [cb.inflight() for cb in cbs] == [0, 0, 0] and sig.inflight == 0
    with pytest.raises(ValueError, match="without a matching begin"):
        sig.end()
    sig.close()
    assert [len(cb.claimed_slots()) for cb in cbs] == [0, 0, 0]


def test_a_gpu_without_an_arbiter_yet_does_not_stop_the_others(tmp_path):
    now = [10**12]  # the signal's clock: heartbeats are set on it, not on the machine's (its uptime may be shorter)
    a, = blocks(tmp_path, GPUS[:1], now[0])
    sig = MultiGpuSignal([tmp_path / g / "control" for g in GPUS[:2]], clock=lambda: now[0])
    assert sig.begin() is True and a.fields.gate == GATE_CLOSED and a.inflight() == 1
    assert not sig.last_gated  # GPU b has no block: this request did not reach it
    sig.end()
    b = arbiter_runs(ControlBlock.create(tmp_path / GPUS[1] / "control"), now[0])  # b's arbiter starts
    a.fields.gate = GATE_OPEN
    now[0] += RETRY_NS  # the signal tries the missing block again once a second
    assert sig.begin() is True
    assert sig.last_gated and (a.fields.gate, b.fields.gate) == (GATE_CLOSED, GATE_CLOSED)
    assert (a.inflight(), b.inflight()) == (1, 1)
    sig.end()
    assert (a.inflight(), b.inflight()) == (0, 0)
    sig.close()


def test_a_begin_that_fails_on_one_gpu_is_undone_on_the_others(tmp_path):
    cbs = blocks(tmp_path, GPUS[:2])
    sig = MultiGpuSignal([tmp_path / g / "control" for g in GPUS[:2]])

    def boom() -> bool:
        raise OSError("no space left on device")

    sig.signals[1].begin = boom
    with pytest.raises(OSError):
        sig.begin()
    assert [cb.inflight() for cb in cbs] == [0, 0] and sig.inflight == 0  # the caller will not end() it
    sig.close()


def test_gpu_lists_from_the_option_or_the_device_plugins_env(tmp_path, monkeypatch):
    monkeypatch.delenv("VALVE_GPU_UUID", raising=False)
    assert control_paths(None, tmp_path) == []
    assert control_paths("GPU-aaaa, GPU-bbbb", tmp_path) == [tmp_path / g / "control" for g in GPUS[:2]]
    for bad in ("GPU-aaaa,,GPU-bbbb", "GPU-aaaa,../x", "GPU-aaaa,.."):
        with pytest.raises(ValueError, match="invalid GPU UUID"):
            control_paths(bad, tmp_path)
    single = make_signal("GPU-aaaa", str(tmp_path))
    assert isinstance(single, OnlineSignal) and single.path == tmp_path / "GPU-aaaa" / "control"
    multi = make_signal(",".join(GPUS), str(tmp_path))
    assert isinstance(multi, MultiGpuSignal) and [s.path for s in multi.signals] == control_paths(",".join(GPUS),
                                                                                                  tmp_path)
    # an engine inside a 2-GPU container: the device plugin's Allocate sets VALVE_GPU_UUID to both
    cbs = blocks(tmp_path, GPUS[:2])
    monkeypatch.setenv("VALVE_GPU_UUID", ",".join(GPUS[:2]))
    monkeypatch.setenv("VALVE_RUNTIME_DIR", str(tmp_path))
    with online_request():
        assert [cb.inflight() for cb in cbs] == [1, 1]
    assert [cb.inflight() for cb in cbs] == [0, 0]
    assert signal_for() is signal_for(gpu_uuid=",".join(GPUS[:2]))  # one signal (one slot per GPU) per process
    signal_for().close()


@pytest.mark.asyncio
async def test_the_proxy_signals_every_gpu_of_the_pod(tmp_path):
    cbs = blocks(tmp_path, GPUS[:2])
    seen: list[list[int]] = []

    async def generate(request: web.Request) -> web.Response:
        seen.append([cb.inflight() for cb in cbs] + [cb.fields.gate for cb in cbs])
        return web.Response(text="ok")

    async def start(app: web.Application) -> tuple[web.AppRunner, str]:
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"

    up = web.Application()
    up.router.add_post("/v1/completions", generate)
    up_runner, up_url = await start(up)
    proxy = Proxy(up_url, signal=make_signal(",".join(GPUS[:2]), str(tmp_path)))
    px_runner, px_url = await start(proxy.app())
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(px_url + "/v1/completions", data=b"{}") as r:
                assert r.status == 200
            for _ in range(500):  # the proxy ends the request after the body is sent
                if [cb.inflight() for cb in cbs] == [0, 0]:
                    break
                await asyncio.sleep(0.01)
        assert seen == [[1, 1, GATE_CLOSED, GATE_CLOSED]]
        assert [cb.inflight() for cb in cbs] == [0, 0]
        assert proxy.metrics.registry.get_sample_value("valve_online_ungated_requests_total") in (None, 0.0)
    finally:
        await px_runner.cleanup()
        await up_runner.cleanup()
        proxy.signal.close()
