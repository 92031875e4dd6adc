"""The online proxy sidecar: a real upstream aiohttp server, the proxy in front, a real client."""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import time

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from bench.harness.procs import free_port
from valve.runtime.control import FLAG_CLOSE_ALLOWED, GATE_CLOSED, ControlBlock
from valve.runtime.online.proxy import (
    NullSignal,
    Proxy,
    SSEEvents,
    StreamTimer,
    forward_headers,
    make_signal,
    parse_listen,
    serve,
)
from valve.runtime.online.signal import OnlineSignal

pytestmark = pytest.mark.timeout(30)
async_test = pytest.mark.asyncio

SSE_EVENTS = [b'data: {"choices":[{"delta":{"content":"tok%d"}}]}\n\n' % i for i in range(6)] + [b"data: [DONE]\n\n"]
BLOB = os.urandom(300_000)


def sample(registry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


class Upstream:
    """An OpenAI-like upstream: SSE with delays, a binary blob, gzip, a stream that never ends, a broken one."""

    def __init__(self, cb: ControlBlock) -> None:
        self.cb = cb
        self.seen_inflight: list[int] = []
        self.seen_headers = {}
        self.seen_body = b""
        self.cancelled = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.sse)
        app.router.add_get("/blob", self.blob)
        app.router.add_post("/gzip", self.gzip)
        app.router.add_post("/forever", self.forever)
        app.router.add_post("/broken", self.broken)
        app.router.add_get("/health", self.health)
        return app

    async def sse(self, request: web.Request) -> web.StreamResponse:
        self.seen_headers = request.headers.copy()
        self.seen_body = await request.read()
        self.seen_query = request.query_string
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Upstream": "yes"})
        await resp.prepare(request)
        for ev in SSE_EVENTS:
            self.seen_inflight.append(self.cb.inflight())
            # split an event across writes: the proxy must pass bytes through, not events
            await resp.write(ev[:7])
            await asyncio.sleep(0.005)
            await resp.write(ev[7:])
        await resp.write_eof()
        return resp

    async def blob(self, request: web.Request) -> web.Response:
        self.seen_inflight.append(self.cb.inflight())
        return web.Response(body=BLOB, content_type="application/octet-stream")

    async def gzip(self, request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(b'{"ok": true}'),
                            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async def forever(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(500):
                await resp.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled.set()
            raise
        return resp

    async def broken(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await asyncio.sleep(0.01)
        request.transport.close()  # connection drops mid-response (chunked body never terminated)
        return resp

    async def health(self, request: web.Request) -> web.Response:
        self.seen_inflight.append(self.cb.inflight())
        return web.Response(text="ok")


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def wait_for(pred, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


@pytest_asyncio.fixture
async def env():
    cb = ControlBlock.anonymous()
    cb.fields.flags |= FLAG_CLOSE_ALLOWED  # an arbiter runs: the first request closes the gate itself
    cb.fields.heartbeat_ns = time.monotonic_ns() + 60 * 10**9  # ... and stays alive for the test
    up = Upstream(cb)
    up_runner, up_url = await start(up.app())
    proxy = Proxy(up_url, signal=OnlineSignal(cb))
    px_runner, px_url = await start(proxy.app())
    session = aiohttp.ClientSession(auto_decompress=False)
    yield cb, up, proxy, px_url, session
    await session.close()
    await px_runner.cleanup()
    await up_runner.cleanup()


@async_test
async def test_sse_passes_through_byte_for_byte_and_signals(env):
    cb, up, proxy, url, session = env
    async with session.post(url + "/v1/chat/completions?x=1", json={"stream": True},
                            headers={"Authorization": "Bearer k", "X-Request-Id": "r1"}) as r:
        assert r.status == 200
        assert r.headers["X-Upstream"] == "yes"
        assert r.headers["Content-Type"] == "text/event-stream"
        body = await r.read()
    assert body == b"".join(SSE_EVENTS)
    assert up.seen_headers["Authorization"] == "Bearer k" and up.seen_headers["X-Request-Id"] == "r1"
    assert up.seen_body == b'{"stream": true}' and up.seen_query == "x=1"
    assert up.seen_inflight and set(up.seen_inflight) == {1}  # in flight while the body streams
    assert cb.fields.gate == GATE_CLOSED  # begin() closed the open gate (fast path)
    assert await wait_for(lambda: cb.inflight() == 0)
    reg = proxy.metrics.registry
    assert sample(reg, "valve_online_requests_total") == 1
    assert sample(reg, "valve_online_ttft_seconds_count") == 1
    assert sample(reg, "valve_online_tpot_seconds_count") == 1
    assert sample(reg, "valve_online_tpot_seconds_sum") > 0


@async_test
async def test_binary_and_gzip_bodies_unchanged(env):
    cb, up, proxy, url, session = env
    async with session.get(url + "/blob") as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(len(BLOB))
        assert await r.read() == BLOB
    async with session.post(url + "/gzip", data=b"{}") as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await r.read()) == b'{"ok": true}'
    assert up.seen_inflight == [0]  # GET is not an inference request: not signalled
    reg = proxy.metrics.registry
    assert sample(reg, "valve_online_requests_total") == 1
    assert sample(reg, "valve_online_tpot_seconds_count") == 0  # not SSE
    assert await wait_for(lambda: cb.inflight() == 0)


@async_test
async def test_client_disconnect_ends_the_request(env):
    cb, up, proxy, url, session = env
    r = await session.post(url + "/forever", data=b"{}")
    assert (await r.content.readany()).startswith(b"data: 0")
    assert cb.inflight() == 1 and proxy.inflight == 1
    r.close()  # client goes away mid-stream
    assert await wait_for(lambda: cb.inflight() == 0 and proxy.inflight == 0)
    await asyncio.wait_for(up.cancelled.wait(), 5)  # the upstream request is cut too


@async_test
async def test_upstream_unreachable_is_502_and_ends(env):
    cb, up, proxy, url, session = env
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: connection refused
    proxy2 = Proxy(dead, signal=OnlineSignal(cb))
    runner, url2 = await start(proxy2.app())
    try:
        async with session.post(url2 + "/v1/completions", data=b"{}") as r:
            assert r.status == 502
            text = await r.text()
        assert "upstream" in text and "unreachable" in text and dead in text
        assert cb.inflight() == 0
        assert sample(proxy2.metrics.registry, "valve_online_requests_total") == 1
        assert sample(proxy2.metrics.registry, "valve_online_ttft_seconds_count") == 0
    finally:
        await runner.cleanup()
        sock.close()


@async_test
async def test_upstream_breaking_mid_stream_cuts_client_and_ends(env):
    cb, up, proxy, url, session = env
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(url + "/broken", data=b"{}") as r:
            await r.read()
    assert await wait_for(lambda: cb.inflight() == 0)
    assert sample(proxy.metrics.registry, "valve_online_ttft_seconds_count") == 0


@async_test
async def test_serve_exposes_metrics_and_stops():
    cb = ControlBlock.anonymous()
    up_runner, up_url = await start(Upstream(cb).app())
    proxy = Proxy(up_url)
    port, mport, stop = free_port(), free_port(), asyncio.Event()
    task = asyncio.create_task(serve(proxy, "127.0.0.1", port, mport, stop))
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}") as r:
                        assert await r.read() == b"".join(SSE_EVENTS)
                    break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.02)
            async with s.get(f"http://127.0.0.1:{mport}/metrics") as r:
                text = await r.text()
        assert "valve_online_requests_total 1.0" in text
        assert "valve_online_ttft_seconds_count 1.0" in text and "valve_online_tpot_seconds_bucket" in text
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await up_runner.cleanup()


def test_sse_parser_handles_split_lines_crlf_and_done():
    p = SSEEvents()
    assert p.feed(b"da") == 0
    assert p.feed(b"ta: a\n") == 0
    assert p.feed(b"\ndata: b\r\n\r\ndata: c1\ndata: c2\n\n: comment\n\n") == 3
    assert p.feed(b"event: x\ndata: [DONE]\n\n") == 0


def test_stream_timer_ttft_tpot():
    t = StreamTimer(start=10.0, sse=True)
    t.chunk(b"", 10.5)  # empty chunks do not count
    t.chunk(b"data: 1\n\n", 11.0)
    t.chunk(b"data: 2\n\ndata: ", 11.2)
    t.chunk(b"3\n\n", 11.6)
    assert t.ttft() == pytest.approx(1.0)
    assert t.tpot() == pytest.approx(0.3)
    plain = StreamTimer(start=0.0, sse=False)
    plain.chunk(b"data: 1\n\ndata: 2\n\n", 0.25)
    assert plain.ttft() == 0.25 and plain.tpot() is None


def test_forward_headers_drops_hop_by_hop():
    h = [("Connection", "keep-alive, X-Private"), ("X-Private", "1"), ("Host", "a"), ("Accept", "*/*"),
         ("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    assert forward_headers(h) == [("Accept", "*/*"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


def test_parse_listen_and_bad_upstream():
    assert parse_listen(":9000") == ("0.0.0.0", 9000)
    assert parse_listen("127.0.0.1:81") == ("127.0.0.1", 81)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    with pytest.raises(ValueError, match="HOST"):
        parse_listen("9000x")
    with pytest.raises(ValueError, match="upstream"):
        Proxy("127.0.0.1:8000")


class Boom:
    def begin(self) -> None:
        raise RuntimeError("control block gone")

    def end(self) -> None:  # pragma: no cover - never reached: begin failed
        raise AssertionError("end without begin")


@async_test
async def test_a_failing_signal_never_fails_the_request():
    cb = ControlBlock.anonymous()
    up_runner, up_url = await start(Upstream(cb).app())
    proxy = Proxy(up_url, signal=Boom())
    px_runner, px_url = await start(proxy.app())
    try:
        async with aiohttp.ClientSession() as s, s.post(px_url + "/v1/chat/completions", data=b"{}") as r:
            assert r.status == 200 and await r.read() == b"".join(SSE_EVENTS)
        assert await wait_for(lambda: proxy.inflight == 0)
    finally:
        await px_runner.cleanup()
        await up_runner.cleanup()


def test_make_signal(tmp_path, monkeypatch):
    monkeypatch.delenv("VALVE_GPU_UUID", raising=False)
    assert isinstance(make_signal(None), NullSignal)
    sig = make_signal("GPU-x", str(tmp_path))  # no arbiter yet: a lazy signal, requests still pass
    assert isinstance(sig, OnlineSignal) and sig.path == tmp_path / "GPU-x" / "control"
    sig.begin()
    sig.end()
    cb = ControlBlock.create(tmp_path / "GPU-y" / "control")
    monkeypatch.setenv("VALVE_GPU_UUID", "GPU-y")
    sig = make_signal(None, str(tmp_path))
    sig.begin()
    assert cb.inflight() == 1
    sig.end()
    assert cb.inflight() == 0
    sig.close()
