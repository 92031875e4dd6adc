"""The DRA driver's Prometheus metrics, scraped from its real /metrics endpoint (prometheus-client's HTTP server)
after real gRPC calls by the fake kubelet: prepared claims, prepare/unprepare by result, publish errors."""

from __future__ import annotations

import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from test_dra_driver import NODE, NS, Claims, allocated, make_driver

from valve.api.dra import device_name
from valve.device_plugin.backend import SimBackend
from valve.dra.fake_kubelet import FakeDraKubelet
from valve.dra.metrics import DraMetrics
from valve.dra.server import REGISTRATION_SOCKET, DraPlugin
from valve.dra.slices import publish_loop


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the endpoint serves: {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def by_result(samples, name: str) -> dict[str, float]:
    return {dict(labels)["result"]: v for (n, labels), v in samples.items() if n == name}


def test_prepare_and_unprepare_are_counted_by_result_and_the_prepared_claims_are_served(short_dir) -> None:
    gpus = SimBackend(2, node=NODE).discover()
    claims = Claims()
    good = claims.add(allocated("chat-gpu", "uid-m", device_name(gpus[1].uuid)))
    metrics = DraMetrics()
    port = metrics.serve(0, "127.0.0.1")
    plugin = DraPlugin(make_driver(short_dir, gpus, claims), short_dir / "plugin", short_dir / "registry",
                       metrics=metrics)
    plugin.start()
    kubelet = FakeDraKubelet(short_dir / "registry")
    try:
        kubelet.register(REGISTRATION_SOCKET)
        start = scrape(port)
        assert start[("valve_dra_prepared_claims", ())] == 0
        assert by_result(start, "valve_dra_prepare_total") == {"ok": 0, "error": 0}  # exported before any call
        assert by_result(start, "valve_dra_unprepare_total") == {"ok": 0, "error": 0}

        got = kubelet.prepare(good, (NS, "uid-missing", "missing"))
        assert got["uid-m"].error == "" and "not found" in got["uid-missing"].error
        assert kubelet.prepare(good)["uid-m"].error == ""  # again: answered from the checkpoint, still prepared
        after = scrape(port)
        assert by_result(after, "valve_dra_prepare_total") == {"ok": 2, "error": 1}
        assert after[("valve_dra_prepared_claims", ())] == 1

        done = kubelet.unprepare(good, (NS, "", "no-uid"))
        assert done["uid-m"].error == "" and done[""].error
        end = scrape(port)
        assert by_result(end, "valve_dra_unprepare_total") == {"ok": 1, "error": 1}
        assert end[("valve_dra_prepared_claims", ())] == 0
        assert end[("valve_dra_socket_restarts_total", ())] == 0
    finally:
        kubelet.close()
        plugin.stop()
        metrics.close()


class Refusing:
    """A slice publisher the API server refuses `times` times, then accepts."""

    def __init__(self, times: int) -> None:
        self.left = times

    def publish(self, body) -> str:
        if self.left:
            self.left -= 1
            raise RuntimeError("(403) Forbidden")
        return "created"


def test_each_refused_publish_attempt_is_a_publish_error() -> None:
    metrics = DraMetrics()
    port = metrics.serve(0, "127.0.0.1")
    stop, published = threading.Event(), threading.Event()
    body = {"metadata": {"name": f"{NODE}-gpu.valve.io"}, "spec": {"devices": [{}]}}
    t = threading.Thread(target=publish_loop, args=(Refusing(3), body, stop, published),
                         kwargs={"retry_s": 0.001, "metrics": metrics}, daemon=True)
    t.start()
    try:
        assert published.wait(10), "never published"
        assert scrape(port)[("valve_dra_publish_errors_total", ())] == 3
    finally:
        stop.set()
        t.join(5)
        metrics.close()
