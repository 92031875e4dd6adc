"""A real Prometheus (Debian's 2.42 here and in CI) scrapes Valve's components on loopback; every alert rule's
series and every dashboard query of the chart must return series with the labels the rule or panel groups by.

The components: the arbiter (`valve runtime arbiter` on a simulated GPU, driven by a real online client and an
offline client's progress in its control block), the device plugin (simulated GPUs, registered with a fake
kubelet), the proxy (`valve runtime proxy` in front of a small streaming engine, three real requests through it)
and the operator (kopf against the kmock emulator, placing one ColocationPair and following one ColocationPolicy).
Static scrape labels stand in for what the chart's PodMonitor/ServiceMonitor relabelling adds in a cluster
(namespace, pair, node).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from test_alerts import all_rules, needs_helm, rules_file
from test_chart_dashboard import DASHBOARD
from waiting import until

from bench.harness.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus")
pytestmark = [needs_helm, pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed "
                                             "(apt-get install prometheus)")]
GPU = "GPU-prom-0"
# series no component needs to produce in this test, and why (anything else empty is a failure)
EMPTY_HERE: dict[str, str] = {}


class OperatorWithAPair:
    """The operator (kopf, in its own thread) against the kmock emulator, reconciling one ColocationPair on a GPU
    node: its metrics land in the process's registry, which Prometheus scrapes with the rest."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready, self._stop, self.error = threading.Event(), None, None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)
        self._thread.start()
        until(lambda: self._ready.is_set() or self.error is not None, "the operator placing a pair", timeout=120)
        if self.error is not None:
            raise self.error

    async def _main(self) -> None:
        from operator_harness import emulated, pair_body

        from valve.api import policy as pol

        self._stop = asyncio.Event()
        try:
            async with emulated() as env:
                env.add_node("gpu-a", 1)
                await env.start_operator()
                await env.api.create_pair(pair_body(), env.namespace)
                await env.until(lambda: env.pod("chat-online"), "the pair's online pod", timeout=60)
                # a ColocationPolicy selecting no pod yet: its per-policy series, at 0
                policies = f"/apis/{pol.API_VERSION}/namespaces/{env.namespace}/{pol.PLURAL}"
                code, _ = await env.api.call("POST", policies, {
                    "apiVersion": pol.API_VERSION, "kind": pol.KIND, "metadata": {"name": "batch"},
                    "spec": {"selector": {"matchLabels": {"app": "chat"}}, "offline": {"template": {
                        "spec": {"containers": [{"name": "batch", "image": "batch:1"}]}}}}})
                assert code in (200, 201)

                async def policy_status():
                    return ((await env.api.call("GET", f"{policies}/batch"))[1].get("status") or {}).get("message")
                await env.until(policy_status, "the policy's status", timeout=60)
                self._ready.set()
                await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            self.error = e

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


class StreamingEngine(BaseHTTPRequestHandler):
    """An engine's /v1/completions answering with three SSE tokens, a few ms apart (its service time)."""

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(3):
            time.sleep(0.005)
            self.wfile.write(f'data: {{"choices": [{{"text": "t{i}"}}]}}\n\n'.encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


def accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict]:
        got = get(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert got["status"] == "success", (expr, got)
        return got["data"]["result"]

    def targets_up(self) -> bool:
        try:
            active = get(f"{self.base}/api/v1/targets")["data"]["activeTargets"]
        except OSError:
            return False
        return bool(active) and all(t["health"] == "up" for t in active)


def serve_registry(registry) -> tuple[int, object]:
    from prometheus_client import start_http_server

    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    return server.server_port, server


def drive_arbiter(path: Path, rounds: int) -> None:
    """A real online client's requests (gate closures) and an offline client's progress and pool."""
    from valve.runtime.control import ControlBlock
    from valve.runtime.online.signal import OnlineSignal

    cb = ControlBlock.open(path)
    sig = OnlineSignal(cb)
    for _ in range(rounds):
        sig.begin()
        cb.fields.offline_pool_bytes = 2 << 30
        time.sleep(0.01)
        sig.end()
        cb.fields.offline_progress += 50
        time.sleep(0.02)
    sig.close()


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    from prometheus_client import REGISTRY

    from valve.device_plugin.backend import SimBackend
    from valve.device_plugin.config import PluginConfig
    from valve.device_plugin.fake_kubelet import FakeKubelet
    from valve.device_plugin.server import DevicePlugin
    from valve.operator import metrics as operator_metrics  # noqa: F401 - registers the operator's metrics

    tmp = tmp_path_factory.mktemp("prom")
    short = Path(tempfile_short())
    stops = []
    try:
        arbiter_port = free_port()
        arbiter = subprocess.Popen(
            [sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu", GPU, "--runtime-dir", str(tmp / "run"),
             "--metrics-port", str(arbiter_port), "--pair", "web"],
            env={"PYTHONPATH": str(ROOT), "PATH": ""}, stdout=subprocess.DEVNULL,
            stderr=(tmp / "arbiter.log").open("w"))  # files, not pipes: a full pipe nobody reads blocks a writer
        stops.append(lambda: (arbiter.send_signal(signal.SIGTERM), arbiter.wait(timeout=30)))
        upstream = ThreadingHTTPServer(("127.0.0.1", 0), StreamingEngine)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        stops.append(upstream.shutdown)
        until((tmp / "run" / GPU / "control").exists, "the arbiter's control block", timeout=30)
        proxy_listen, proxy_port = free_port(), free_port()
        proxy = subprocess.Popen(
            [sys.executable, "-m", "valve.cli", "runtime", "proxy", "--listen", f"127.0.0.1:{proxy_listen}",
             "--upstream", f"http://127.0.0.1:{upstream.server_port}", "--gpu", GPU, "--runtime-dir",
             str(tmp / "run"), "--metrics-port", str(proxy_port)],
            env={"PYTHONPATH": str(ROOT), "PATH": ""}, stdout=subprocess.DEVNULL, stderr=(tmp / "proxy.log").open("w"))
        stops.append(lambda: (proxy.send_signal(signal.SIGTERM), proxy.wait(timeout=30)))
        until(lambda: accepts(proxy_listen), "the proxy listening", timeout=60, poll=0.05)
        for _ in range(3):  # real streamed requests through the proxy: its TTFT/TPOT histograms and the signal
            body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 3, "stream": True}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{proxy_listen}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.read().endswith(b"data: [DONE]\n\n")
        stops.append(OperatorWithAPair().stop)
        operator_port, operator_server = serve_registry(REGISTRY)
        stops.append(operator_server.shutdown)
        kubelet = FakeKubelet(short / "dp").start()
        stops.append(kubelet.stop)
        backend = SimBackend(2)
        for uuid in backend.uuids:
            backend.set_usage(uuid, 0.5, 1 << 30)
        plugin = DevicePlugin(PluginConfig(device_plugin_dir=short / "dp", runtime_root=short / "run",
                                           state_dir=short / "state", pod_resources_socket=None, metrics_port=0,
                                           metrics_addr="127.0.0.1"), backend)
        plugin.start()
        stops.append(plugin.stop)
        plugin.wait_registrations(1)

        port = free_port()
        runtime = {"namespace": "team", "pair": "web", "node": "n1"}
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "valve-runtime", "static_configs": [
                    {"targets": [f"127.0.0.1:{arbiter_port}"], "labels": {**runtime, "pod": "web-offline"}},
                    {"targets": [f"127.0.0.1:{proxy_port}"], "labels": {**runtime, "pod": "web-online"}}]},
                {"job_name": "valve-operator", "honor_labels": True, "static_configs": [  # as the ServiceMonitor
                    {"targets": [f"127.0.0.1:{operator_port}"], "labels": {"namespace": "valve-system"}}]},
                {"job_name": "valve-device-plugin", "static_configs": [
                    {"targets": [f"127.0.0.1:{plugin.metrics.port}"],
                     "labels": {"namespace": "valve-system", "node": "n1"}}]},
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        server = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
            stderr=(tmp / "prometheus.log").open("w"))
        stops.append(lambda: (server.terminate(), server.wait(timeout=30)))
        p = Prom(port)
        until(p.targets_up, "Prometheus to scrape every target", timeout=60, poll=0.2)
        control = tmp / "run" / GPU / "control"
        until(control.exists, "the arbiter's control block", timeout=30)
        drive_arbiter(control, 20)
        # rates need two scrapes of the driven counters
        until(lambda: p.query("rate(valve_preemptions_total[1m]) > 0"), "a preemption rate", timeout=60, poll=0.2)
        yield p
    finally:
        for stop in reversed(stops):
            stop()
        shutil.rmtree(short, ignore_errors=True)


def tempfile_short() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="vp")  # unix socket paths must stay short


def grouping(expr: str) -> set[str]:
    """The labels the outermost aggregation groups by (all of them must be on every result)."""
    m = re.search(r"\bby \(([^)]*)\)", expr)
    return {x.strip() for x in m.group(1).split(",")} - {"le"} if m else set()


def assert_series(prom: Prom, expr: str, what: str) -> None:
    names = set(re.findall(r"\bvalve_[a-z0-9_]+", expr))
    got = until(lambda: prom.query(expr), f"{what}: {expr}", timeout=30, poll=0.5) \
        if not names & EMPTY_HERE.keys() else prom.query(expr)
    for series in got:
        missing = {k for k in grouping(expr) if not series["metric"].get(k)}
        assert not missing, f"{what}: {expr} returns {series['metric']} without {missing}"


def test_every_alert_rule_series_is_there(prom):
    import promql_parser

    for rule in all_rules(rules_file()):
        lhs = str(promql_parser.parse(rule["expr"]).lhs)  # the series the threshold compares
        assert_series(prom, lhs, rule["alert"])
        prom.query(rule["expr"])  # and the whole rule evaluates


def test_every_dashboard_query_returns_series(prom):
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$__range_s", "300").replace("$__range", "5m")
            for var in ("namespace", "pair", "node", "gpu"):  # Grafana's "All"
                expr = expr.replace(f"${var}", ".*")
            assert_series(prom, expr, f"panel {panel['title']!r}")


def test_dashboard_variables_find_their_values(prom):
    import dashboard as gen

    for name, _, query in gen.VARIABLES:
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", query)
        selector = re.sub(r'\$\w+', ".*", m.group(1))
        values = {s["metric"][m.group(2)] for s in prom.query(selector)}
        assert values == {{"namespace": "team", "pair": "web", "node": "n1", "gpu": GPU}[name]}, name


def test_scraped_labels_are_the_ones_the_views_use(prom):
    arb = prom.query(f'valve_preemptions_total{{gpu="{GPU}"}}')
    assert arb and arb[0]["metric"]["pair"] == "web" and float(arb[0]["value"][1]) >= 1
    healthy = prom.query("valve_device_healthy")
    assert {s["metric"]["resource"] for s in healthy} == {"valve.io/online-gpu", "valve.io/offline-gpu"}
    assert prom.query("min(valve_device_plugin_registered)")[0]["value"][1] == "1"
    # the operator's per-policy series keep the policy's namespace (honour_labels), not the scrape's valve-system
    policy = prom.query('valve_policy_offline_pods{policy="batch"}')
    assert {(s["metric"]["namespace"], s["metric"]["phase"], s["value"][1]) for s in policy} == {
        ("default", phase, "0") for phase in ("Pending", "Running", "Succeeded", "Failed", "Unknown")}
