"""bench/proxy_load.py: many concurrent streams through the proxy, some aborted by their clients, at a small size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.proxy_load import ROOT, run


@pytest.mark.timeout(180)
def test_streams_through_the_proxy_are_byte_identical_and_leave_nothing_in_flight():
    # 120 streams held open until all are (the upstream's barrier): more than aiohttp's default cap of 100
    r = run(streams=120, abort=0.3, events=4, gap_ms=5.0, seed=1, hold=True)
    assert r["aborted"] == 36 and r["completed"] == 84
    assert r["byte_identical"] == r["completed"]  # every stream that ran to its end got the upstream's bytes
    assert r["proxy_begun"] == 120 and r["proxy_inflight_after"] == 0  # aborted ones ended their requests too
    assert r["upstream_peak"] == {"direct": 120, "proxied": 120}  # no connection cap: all open at once, each wave
    assert len(r["ttfb_ms"]["direct"]) == len(r["ttfb_ms"]["proxied"]) == 120
    assert all(x > 0 for x in r["ttfb_ms"]["proxied"])


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "proxy_load.py"), "--out", str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == f"proxy_load: --out {str(tmp_path / 'f')!r}: is a file, not a folder"


def test_committed_result_holds():
    r = json.loads((ROOT / "bench" / "results" / "proxy_load.json").read_text())
    s = r["settings"]
    assert s["streams"] == 1000 and s["abort"] == 0.3
    assert r["byte_identical"] == r["completed"] == 700 and r["proxy_inflight_after"] == 0
    assert r["upstream_peak"]["proxied"] == 1000
    text = " ".join((ROOT / "docs" / "proxy.md").read_text().split())
    for figure in (f"(load {r['load_1m']:.1f} when it ended", f"all {r['completed']} streams that ran to the end",
                   f"began {r['proxy_begun']:,} requests and had {r['proxy_inflight_after']} in flight "
                   f"{r['drained_ms']:.0f} ms after",
                   f"direct {r['ttfb_p50_ms']['direct']:.0f}/{r['ttfb_p99_ms']['direct']:.0f} ms, proxied "
                   f"{r['ttfb_p50_ms']['proxied']:.0f}/{r['ttfb_p99_ms']['proxied']:.0f} ms; the proxy's overhead p50 "
                   f"{r['overhead_p50_ms']:.0f} ms"):
        assert figure in text, figure
