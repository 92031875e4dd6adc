"""The online proxy under many concurrent streams, some of them aborted by their clients.

    python3 bench/proxy_load.py [--streams 1000] [--abort 0.3] [--events 8] [--out bench/results]

Three processes: an SSE upstream (each stream's events depend on its id, spaced ``--gap-ms`` apart), the proxy
(``valve.runtime.online.proxy.Proxy`` with a counting signal in place of the arbiter's, and no upstream connection
cap: the default) and this one, the client. The same streams are sent twice, all at once each time: straight to
the upstream, then through the proxy; a ``--abort`` share of them closes its connection after the first event.
Written: ``proxy_load.json`` and ``.txt`` (time to first byte direct and proxied, p50/p99; the bodies of the
streams that ran to the end compared byte for byte; the proxy's in-flight count and how long it took to return to
0; the upstream's peak concurrency) and ``.png`` (time-to-first-byte CDFs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import output  # noqa: E402
from bench.harness.procs import Child, child_env, free_port, wait_for  # noqa: E402
from valve.outpath import check_dir  # noqa: E402
from valve.stats import percentile  # noqa: E402


# ---- the two servers (child processes) ---------------------------------------------------------------------------
def run_upstream(port: int, events: int, gap_ms: float, hold: int = 0) -> None:
    """``hold`` > 0: each stream waits to send until that many are open at once (at most 60 s), so the peak shows
    whether anything between client and upstream capped the connections, however slowly a loaded machine opens
    them."""
    from aiohttp import web

    state = {"active": 0, "peak": 0}
    everyone = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        sid = (await request.json())["id"]
        state["active"] += 1
        state["peak"] = max(state["peak"], state["active"])
        try:
            if hold:
                if state["active"] >= hold:
                    everyone.set()
                try:
                    await asyncio.wait_for(everyone.wait(), 60)
                except TimeoutError:
                    pass  # a cap below ``hold``: the peak says so
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            try:
                for i in range(events):
                    await resp.write(b"data: %d-%d\n\n" % (sid, i))
                    await asyncio.sleep(gap_ms / 1e3)
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            except ConnectionResetError:  # an aborting client went away: the stream ends here
                pass
            return resp
        finally:
            state["active"] -= 1

    async def stats(request: web.Request) -> web.Response:
        got = dict(state)
        if "reset" in request.query:  # a new wave: its own peak, its own barrier
            state["peak"] = state["active"]
            everyone.clear()
        return web.json_response(got)

    app = web.Application()
    app.router.add_post("/v1/completions", stream)
    app.router.add_get("/_stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handler_cancellation=True)


class CountingSignal:
    """Stands in for the arbiter's online signal: what the proxy began and has not ended."""

    def __init__(self) -> None:
        self.inflight = self.begun = 0

    def begin(self) -> None:
        self.inflight += 1
        self.begun += 1

    def end(self) -> None:
        self.inflight -= 1


def run_proxy(port: int, upstream: str) -> None:
    from aiohttp import web

    from valve.runtime.online.proxy import Proxy

    sig = CountingSignal()
    app = Proxy(upstream, signal=sig).app()

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"inflight": sig.inflight, "begun": sig.begun})

    app.router.add_get("/_stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handler_cancellation=True)


# ---- the client --------------------------------------------------------------------------------------------------
async def one(client, url: str, sid: int, abort: bool) -> tuple[float | None, bytes | None]:
    """Time to the first byte of the body; the whole body, or None when this stream aborts after its first event."""
    t0 = time.perf_counter()
    async with client.post(url + "/v1/completions", json={"id": sid}) as r:
        first = await r.content.readany()
        ttfb = time.perf_counter() - t0
        if abort:
            r.close()  # the client goes away mid-stream
            return ttfb, None
        return ttfb, first + await r.read()


async def wave(url: str, streams: int, aborting: set[int]) -> list[tuple[float | None, bytes | None]]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as client:
        return await asyncio.gather(*(one(client, url, i, i in aborting) for i in range(streams)))


def get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run(streams: int, abort: float, events: int, gap_ms: float, seed: int = 0, hold: bool = False) -> dict:
    up_port, proxy_port = free_port(), free_port()
    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="valve-proxy-load-") as tmp:
        procs = [Child("upstream", me + ["--serve", "upstream", "--port", str(up_port), "--events", str(events),
                                         "--gap-ms", str(gap_ms), "--hold", str(streams if hold else 0)], child_env(),
                       Path(tmp) / "upstream.log"),
                 Child("proxy", me + ["--serve", "proxy", "--port", str(proxy_port), "--upstream",
                                      f"http://127.0.0.1:{up_port}"], child_env(), Path(tmp) / "proxy.log")]
        try:
            wait_for("the upstream", lambda: listening(up_port), 60, procs)
            wait_for("the proxy", lambda: listening(proxy_port), 60, procs)
            up, px = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{proxy_port}"
            aborting = set(random.Random(seed).sample(range(streams), round(abort * streams)))
            direct = asyncio.run(wave(up, streams, aborting))
            peak_direct = get_json(up + "/_stats?reset=1")["peak"]
            t0 = time.monotonic()
            proxied = asyncio.run(wave(px, streams, aborting))
            # the proxy ends an aborted stream's request when it sees the client gone: wait for in-flight to reach 0
            t_end = time.monotonic()
            stats = get_json(px + "/_stats")
            while stats["inflight"] and time.monotonic() - t_end < 30:
                time.sleep(0.01)
                stats = get_json(px + "/_stats")
            drained_ms = (time.monotonic() - t_end) * 1e3
            peak_proxied = get_json(up + "/_stats")["peak"]
        finally:
            for p in procs:
                p.stop()
    full = [i for i in range(streams) if i not in aborting]
    same = sum(direct[i][1] == proxied[i][1] for i in full)
    d_ttfb = [direct[i][0] * 1e3 for i in range(streams)]
    p_ttfb = [proxied[i][0] * 1e3 for i in range(streams)]
    return {
        "benchmark": "proxy_load", "settings": {"streams": streams, "abort": abort, "events": events,
                                                "gap_ms": gap_ms, "seed": seed},
        "aborted": len(aborting), "completed": len(full), "byte_identical": same,
        "ttfb_ms": {"direct": d_ttfb, "proxied": p_ttfb},
        "ttfb_p50_ms": {"direct": percentile(d_ttfb, 50), "proxied": percentile(p_ttfb, 50)},
        "ttfb_p99_ms": {"direct": percentile(d_ttfb, 99), "proxied": percentile(p_ttfb, 99)},
        "overhead_p50_ms": percentile([p - d for p, d in zip(p_ttfb, d_ttfb, strict=True)], 50),
        "proxy_begun": stats["begun"], "proxy_inflight_after": stats["inflight"], "drained_ms": drained_ms,
        "wave_s": t_end - t0, "upstream_peak": {"direct": peak_direct, "proxied": peak_proxied},
        # the three processes share this machine's cores with whatever else runs: the latencies depend on it
        "cpus": os.cpu_count(), "load_1m": os.getloadavg()[0],
    }


def table(r: dict) -> str:
    s = r["settings"]
    return "\n".join([
        f"{s['streams']} concurrent streams, {r['aborted']} aborted after their first event, {s['events']} events "
        f"{s['gap_ms']:g} ms apart; {r['cpus']} CPUs, load {r['load_1m']:.1f}",
        "| path | TTFB p50 ms | TTFB p99 ms | upstream peak concurrency |",
        "|---|---|---|---|",
        *(f"| {k} | {r['ttfb_p50_ms'][k]:.1f} | {r['ttfb_p99_ms'][k]:.1f} | {r['upstream_peak'][k]} |"
          for k in ("direct", "proxied")),
        f"proxy TTFB overhead p50 {r['overhead_p50_ms']:.1f} ms; {r['byte_identical']}/{r['completed']} completed "
        f"streams byte-identical; proxy began {r['proxy_begun']}, in flight after {r['proxy_inflight_after']} "
        f"({r['drained_ms']:.0f} ms after the last client finished)",
    ])


def plot(r: dict, path: Path) -> None:
    plt = output.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, xs in r["ttfb_ms"].items():
        xs = sorted(xs)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"{k} (n={len(xs)})")
    ax.set_xlabel("time to first byte (ms)")
    ax.set_ylabel("fraction of streams")
    ax.set_title(f"{r['settings']['streams']} concurrent streams, direct and through the proxy", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--abort", type=float, default=0.3, help="share of streams closed after their first event")
    ap.add_argument("--events", type=int, default=8)
    ap.add_argument("--gap-ms", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--serve", choices=("upstream", "proxy"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    ap.add_argument("--hold", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve == "upstream":
        run_upstream(a.port, a.events, a.gap_ms, a.hold)
        return 0
    if a.serve == "proxy":
        run_proxy(a.port, a.upstream)
        return 0
    if not 0 <= a.abort < 1 or a.streams < 1:
        ap.error("--streams must be >= 1 and --abort in [0, 1)")
    try:
        check_dir(a.out, "--out")
    except ValueError as e:
        print(f"proxy_load: {e}", file=sys.stderr)
        return 2
    r = run(a.streams, a.abort, a.events, a.gap_ms, a.seed)
    files = output.write(a.out, "proxy_load", r, table(r), lambda p: plot(r, p))
    print(table(r))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
