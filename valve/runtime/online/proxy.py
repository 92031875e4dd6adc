"""Online reverse proxy sidecar: `valve runtime proxy --listen :9000 --upstream http://127.0.0.1:8000`.

Sits in front of an OpenAI-compatible HTTP server (no engine change). For each inference request (POST by
default) it signals request start/end to the per-GPU arbiter through `valve.runtime.online.signal.OnlineSignal` (of
each GPU of the pod: `MultiGpuSignal`), streams
the upstream response back chunk by chunk (byte-for-byte, SSE included, no re-encoding), and records:

- ``valve_online_requests_total``: inference requests seen;
- ``valve_online_ttft_seconds``: request received -> first non-empty response body chunk (2xx only);
- ``valve_online_tpot_seconds``: per streamed (SSE) response, the mean time between ``data:`` events after the
  first one (``[DONE]`` excluded), observed once per request with at least two events.

The request ends (arbiter signal) when the response body is finished, on upstream error (the client gets a 502
with the reason), on an upstream read timeout (504 before the headers; the connection is cut after them: a request
that never answers must not keep the gate closed) or when the client disconnects. Upstream connections are not
capped by default (aiohttp's default cap of 100 queued requests past the 100th behind whole responses). Online is never blocked by Valve: with no control block the
proxy only forwards and measures; with a bad one (truncated, replaced, another version) it serves requests ungated
and counts them in ``valve_online_ungated_requests_total`` (the signal logs the problem once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from yarl import URL

from valve.api.contract import ENV_GPU_UUID
from valve.netaddr import parse_listen  # noqa: F401  (re-exported: the proxy's tests and callers)

log = logging.getLogger("valve.proxy")

# RFC 9110 7.6.1 connection-specific headers, never forwarded; Host and Content-Length are set by aiohttp.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection", "TE",
              "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length")
)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
DEFAULT_SIGNAL_METHODS = ("POST",)
DEFAULT_READ_TIMEOUT_S = 600.0  # longest upstream silence (before the headers or between body chunks)


def forward_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones (also those the `Connection` header names). Order and repeats kept."""
    headers = list(headers)
    drop = set(HOP_BY_HOP)
    for k, v in headers:
        if k.lower() == "connection":
            drop |= {t.strip().lower() for t in v.split(",") if t.strip()}
    return [(k, v) for k, v in headers if k.lower() not in drop]


def check_upstream(upstream: str) -> URL:
    try:
        url = URL(upstream)
        ok = url.scheme in ("http", "https") and bool(url.host)
        url.port  # noqa: B018  (a bad port raises here, not at the first request)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--upstream {upstream!r}: expected http://HOST:PORT")
    return url


class SSEEvents:
    """Incremental SSE parser: feed body chunks, get the number of completed ``data:`` events (``[DONE]``
    excluded). Events end at a blank line; lines may be split across chunks; CRLF and LF both work."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> int:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        done = 0
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                if self._data and b"\n".join(self._data).strip() != b"[DONE]":
                    done += 1
                self._data = []
            elif line.startswith(b"data:"):
                self._data.append(line[5:].lstrip(b" "))
        return done


@dataclass
class StreamTimer:
    """TTFT and TPOT of one response from chunk arrival times (seconds on any monotonic clock)."""

    start: float
    sse: bool
    first_chunk: float | None = None
    event_times: list[float] = field(default_factory=list)
    _parser: SSEEvents = field(default_factory=SSEEvents)

    def chunk(self, data: bytes, now: float) -> None:
        if not data:
            return
        if self.first_chunk is None:
            self.first_chunk = now
        if self.sse:
            self.event_times.extend([now] * self._parser.feed(data))

    def ttft(self) -> float | None:
        return None if self.first_chunk is None else self.first_chunk - self.start

    def tpot(self) -> float | None:
        t = self.event_times
        return None if len(t) < 2 else (t[-1] - t[0]) / (len(t) - 1)


class ProxyMetrics:
    """The proxy's Prometheus metrics (names from docs/metrics.md), in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("valve_online_requests", "Online inference requests through the proxy.",
                                registry=self.registry)
        self.ttft = Histogram("valve_online_ttft_seconds", "Time to first response chunk.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.ungated = Counter("valve_online_ungated_requests", "Online requests served without signalling the "
                               "arbiter (no control block yet, or a bad one: truncated, replaced, another version).",
                               registry=self.registry)
        self.tpot = Histogram("valve_online_tpot_seconds", "Mean time between streamed tokens (SSE events).",
                              buckets=TPOT_BUCKETS, registry=self.registry)

    def record(self, timer: StreamTimer) -> None:
        if (v := timer.ttft()) is not None:
            self.ttft.observe(v)
        if (v := timer.tpot()) is not None:
            self.tpot.observe(v)


class NullSignal:
    """No arbiter to tell (no GPU UUID configured): forward and measure only."""

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass


class Proxy:
    """The aiohttp application: one catch-all route forwarding to `upstream` through one client session."""

    def __init__(self, upstream: str, signal=None, metrics: ProxyMetrics | None = None,
                 signal_methods: Iterable[str] = DEFAULT_SIGNAL_METHODS,
                 connect_timeout: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_connections: int = 0, read_timeout: float | None = DEFAULT_READ_TIMEOUT_S) -> None:
        self.upstream = check_upstream(upstream)
        self.base = str(self.upstream).rstrip("/")  # a path prefix in --upstream is kept
        self.signal = signal or NullSignal()
        self.metrics = metrics or ProxyMetrics()
        self.signal_methods = {m.upper() for m in signal_methods}
        self.connect_timeout = connect_timeout
        if max_connections < 0:
            raise ValueError(f"--upstream-connections {max_connections}: expected 0 (no cap) or more")
        self.max_connections = max_connections
        self.read_timeout = read_timeout or None  # 0: none
        self.clock = clock
        self.session: aiohttp.ClientSession | None = None
        self.inflight = 0  # requests this proxy signalled and has not ended yet

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout)
        connector = aiohttp.TCPConnector(limit=self.max_connections)  # 0: no cap
        # no decompression: bytes pass through as the upstream sent them (Content-Encoding kept)
        self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False, connector=connector)

    async def _stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    def signalled(self, request: web.Request) -> bool:
        return request.method.upper() in self.signal_methods

    async def handle(self, request: web.Request) -> web.StreamResponse:
        online = self.signalled(request)
        start = self.clock()
        told = False
        if online:
            self.metrics.requests.inc()
            self.inflight += 1
            told = self._tell(self.signal.begin)
            if not told or not getattr(self.signal, "last_gated", True):
                self.metrics.ungated.inc()
        try:
            return await self._forward(request, start, online)
        finally:  # body done, upstream error, or client gone (handler cancelled / write failed)
            if online:
                self.inflight -= 1
                if told:
                    self._tell(self.signal.end)

    @staticmethod
    def _tell(fn) -> bool:
        """Signal the arbiter; a failure is logged, never passed to the request (online is never blocked)."""
        try:
            fn()
            return True
        except Exception:  # noqa: BLE001
            log.exception("online signal failed; forwarding anyway")
            return False

    async def _forward(self, request: web.Request, start: float, online: bool) -> web.StreamResponse:
        assert self.session is not None
        url = URL(self.base + request.rel_url.raw_path_qs, encoded=True)
        body = await request.read()
        headers = forward_headers(request.headers.items())
        try:
            upstream = await self.session.request(request.method, url, headers=headers,
                                                  data=body if body else None, allow_redirects=False)
        except TimeoutError as e:
            return bad_gateway(f"valve proxy: upstream {self.upstream} did not answer in time: {e or 'timeout'}",
                               status=504)
        except (aiohttp.ClientError, OSError) as e:
            return bad_gateway(f"valve proxy: upstream {self.upstream} unreachable: {type(e).__name__}: {e}")
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in forward_headers(upstream.headers.items()):
                resp.headers.add(k, v)
            if upstream.headers.get("Content-Length") is not None and "Transfer-Encoding" not in upstream.headers:
                resp.content_length = int(upstream.headers["Content-Length"])
            ctype = upstream.headers.get("Content-Type", "")
            timer = StreamTimer(start=start, sse=ctype.startswith("text/event-stream"))
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    timer.chunk(chunk, self.clock())
                    await resp.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, TimeoutError) as e:
                # headers already sent: all we can do is cut the client connection
                log.warning("upstream %s broke mid-response: %s", self.upstream, e or type(e).__name__)
                if request.transport is not None:
                    request.transport.close()
                return resp
            except ConnectionResetError:
                # the client went away mid-response (a closed tab, a cancelled request): expected, not an error;
                # leaving the upstream context closes the upstream request so the engine can stop the work
                log.debug("client left mid-response")
                return resp
            await resp.write_eof()
        if online and 200 <= upstream.status < 300:
            self.metrics.record(timer)
        return resp


def bad_gateway(message: str, status: int = 502) -> web.Response:
    log.warning("%s", message)
    return web.Response(status=status, text=message + "\n")


def make_signal(gpu: str | None, runtime_dir: str | None = None):
    """A signal on the control block of each GPU of `gpu` (comma-separated: a server on several GPUs closes the
    gate of every one per request), or a `NullSignal` when no GPU is configured."""
    from valve.runtime.online.signal import control_paths, signal_on

    paths = control_paths(gpu, runtime_dir)
    if not paths:
        log.warning("no --gpu / %s: forwarding and measuring only, the arbiter is not told", ENV_GPU_UUID)
        return NullSignal()
    return signal_on(paths)  # opened lazily: works before the arbiter starts


class ListenError(Exception):
    """A port the proxy could not bind (in use, no such address): the one line a failed start prints."""


async def _bind(site: web.TCPSite, option: str, host: str, port: int) -> None:
    try:
        await site.start()
    except OSError as e:
        # the errno's own text: aiohttp's strerror repeats the address
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ListenError(f"{option}: cannot listen on {host}:{port}: {reason}") from None


async def serve(proxy: Proxy, host: str, port: int, metrics_port: int | None = None,
                stop: asyncio.Event | None = None, metrics_host: str | None = None) -> None:
    """Run the proxy (and the metrics endpoint, on `metrics_host`, default `host`) until `stop` is set (forever
    if None)."""
    metrics_host = metrics_host or host
    runner = web.AppRunner(proxy.app(), handler_cancellation=True)
    await runner.setup()
    mrunner = None
    try:  # a failed bind cleans up too (the client session closes with the app)
        await _bind(web.TCPSite(runner, host, port), "--listen", host, port)
        if metrics_port is not None:
            try:
                from prometheus_client.aiohttp import make_aiohttp_handler
            except ImportError:  # prometheus-client < 0.21: its own HTTP server thread
                from prometheus_client import start_http_server

                try:
                    start_http_server(metrics_port, metrics_host, registry=proxy.metrics.registry)
                except OSError as e:
                    raise ListenError(f"--metrics-port: cannot listen on {metrics_host}:{metrics_port}: "
                                      f"{e.strerror or e}") from None
            else:
                mapp = web.Application()
                mapp.router.add_get("/metrics", make_aiohttp_handler(proxy.metrics.registry))
                mrunner = web.AppRunner(mapp)
                await mrunner.setup()
                await _bind(web.TCPSite(mrunner, metrics_host, metrics_port), "--metrics-port", metrics_host,
                            metrics_port)
        log.info("valve proxy on %s:%s -> %s", host, port, proxy.upstream)
        await (stop or asyncio.Event()).wait()
    finally:
        if mrunner is not None:
            await mrunner.cleanup()
        await runner.cleanup()


def proxy_command(listen: str = ":9000", upstream: str = "http://127.0.0.1:8000", gpu: str | None = None,
                  runtime_dir: str | None = None, metrics_port: int | None = 9401, metrics_addr: str | None = None,
                  signal_methods: Iterable[str] = DEFAULT_SIGNAL_METHODS, max_connections: int = 0,
                  read_timeout: float | None = DEFAULT_READ_TIMEOUT_S) -> None:
    """Entry point for `valve runtime proxy` (the CLI module checks its options and wires them to this).
    ValueError: a bad option; ListenError: a port it could not bind."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, port = parse_listen(listen)
    proxy = Proxy(upstream, signal=make_signal(gpu, runtime_dir), signal_methods=signal_methods,
                  max_connections=max_connections, read_timeout=read_timeout)
    try:
        asyncio.run(serve(proxy, host, port, metrics_port, metrics_host=metrics_addr))
    except KeyboardInterrupt:
        pass
