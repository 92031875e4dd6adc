"""The proxy under many concurrent streams (no upstream connection cap by default, or the configured one) and an
upstream that never answers (the read timeout ends the request, so the gate does not stay closed)."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from bench.proxy_load import CountingSignal
from valve.runtime.online.proxy import Proxy

pytestmark = pytest.mark.timeout(120)
STREAMS = 200
BARRIER_S = 30.0  # bounds the test if the proxy queues streams: they then fail instead of hanging


class Upstream:
    """Each stream sends its first event only once ``release`` is set, then a few more: with streams queued
    behind a connection cap, the barrier is never reached."""

    def __init__(self, release_at: int) -> None:
        self.active = self.peak = 0
        self.release_at = release_at
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.stream)
        app.router.add_post("/silent", self.silent)
        return app

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.active >= self.release_at:
                self.release.set()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            try:
                await asyncio.wait_for(self.release.wait(), BARRIER_S)
            except TimeoutError:
                await resp.write(b"data: starved\n\n")
                return resp
            for i in range(3):
                await resp.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0)
            await resp.write_eof()
            return resp
        finally:
            self.active -= 1

    async def silent(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3600)  # never answers (cancelled when the proxy gives up)
        return web.Response(text="late")


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def run_streams(n: int, release_at: int, **proxy_args) -> tuple[list[bytes], Upstream, CountingSignal]:
    up = Upstream(release_at)
    up_runner, up_url = await serve(up.app())
    sig = CountingSignal()
    proxy = Proxy(up_url, signal=sig, **proxy_args)
    p_runner, p_url = await serve(proxy.app())
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
            async def one() -> bytes:
                async with client.post(p_url + "/v1/completions", data=b"{}") as r:
                    return await r.read()

            bodies = await asyncio.gather(*(one() for _ in range(n)))
    finally:
        await p_runner.cleanup()
        await up_runner.cleanup()
    return bodies, up, sig


@pytest.mark.asyncio
async def test_200_concurrent_streams_all_reach_the_upstream_at_once():
    bodies, up, sig = await run_streams(STREAMS, release_at=STREAMS)
    assert up.peak == STREAMS  # none queued behind a connection cap
    assert bodies == [b"data: 0\n\ndata: 1\n\ndata: 2\n\n"] * STREAMS
    assert sig.begun == STREAMS and sig.inflight == 0


@pytest.mark.asyncio
async def test_a_configured_cap_bounds_upstream_concurrency():
    bodies, up, sig = await run_streams(40, release_at=10, max_connections=10)
    assert up.peak == 10
    assert all(b == b"data: 0\n\ndata: 1\n\ndata: 2\n\n" for b in bodies) and sig.inflight == 0


@pytest.mark.asyncio
async def test_an_upstream_that_never_answers_times_out_and_ends_the_request():
    up = Upstream(1)
    up_runner, up_url = await serve(up.app())
    sig = CountingSignal()
    proxy = Proxy(up_url, signal=sig, read_timeout=0.3)
    p_runner, p_url = await serve(proxy.app())
    try:
        async with aiohttp.ClientSession() as client, client.post(p_url + "/silent", data=b"{}") as r:
            assert r.status == 504
            assert "did not answer in time" in await r.text()
        assert sig.begun == 1 and sig.inflight == 0  # the gate is not held by a request that never answers
    finally:
        await p_runner.cleanup()
        await up_runner.cleanup()


def test_negative_connection_cap_is_refused():
    with pytest.raises(ValueError, match="upstream-connections"):
        Proxy("http://127.0.0.1:1", max_connections=-1)


@pytest.mark.asyncio
async def test_a_client_leaving_mid_stream_is_not_an_error(caplog):
    class Slow(Upstream):
        async def stream(self, request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(50):
                await resp.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0.01)
            return resp

    up = Slow(1)
    up_runner, up_url = await serve(up.app())
    sig = CountingSignal()
    proxy = Proxy(up_url, signal=sig)
    # without handler cancellation the proxy's next write after the client left always fails: the case the
    # real proxy (cancellation on) meets whenever the write comes before the cancellation
    p_runner = web.AppRunner(proxy.app(), handler_cancellation=False)
    await p_runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(p_runner, sock).start()
    p_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(5):
                async with client.post(p_url + "/v1/completions", data=b"{}") as r:
                    assert (await r.content.readany()).startswith(b"data: 0")
                    r.close()  # gone after the first event
        deadline = asyncio.get_running_loop().time() + 10
        while sig.inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert sig.begun == 5 and sig.inflight == 0
    finally:
        await p_runner.cleanup()
        await up_runner.cleanup()
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
