"""One-line errors: a bad address or a node the device plugin cannot serve prints one stderr line and exits 2."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import until

from valve.device_plugin.config import PluginConfig
from valve.device_plugin.metrics import PluginMetrics
from valve.device_plugin.server import run_idle
from valve.netaddr import check_host, parse_listen

# The device plugin as `python -m valve.device_plugin`, with NVML failing as it does on a node without the driver
# (whatever this machine has).
NO_NVML = """
import sys, pynvml
import valve.device_plugin.nvml as m
def no_nvml(self, *a, **k):
    raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
m.NvmlBackend.__init__ = no_nvml
from valve.device_plugin.__main__ import app
sys.argv[0] = "valve device-plugin"
app()
"""


# Outside a cluster whatever runs the tests (in-cluster, the device plugin would first check its Node).
ENV = {**{k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}, "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def _one_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_parse_listen_and_check_host() -> None:
    assert parse_listen(":9000") == ("0.0.0.0", 9000)
    assert parse_listen("localhost:0") == ("localhost", 0)
    assert parse_listen("[::]:81") == ("::", 81)
    for bad in ("9000", "host:port:x", "a:b:9000", "::1:9000", ":65536", ":-1", "[::1:9000", "bad host:1", ":",
                ":٩"):
        with pytest.raises(ValueError, match=r"expected \[HOST\]:PORT"):
            parse_listen(bad)
    assert check_host("0.0.0.0") == "0.0.0.0" and check_host("[::1]") == "::1" and check_host("node-1.local")
    for bad in ("0.0.0.0:9402", "a b", "", "host:port:x", "-x"):
        with pytest.raises(ValueError, match="--metrics-addr"):
            check_host(bad)


@pytest.mark.parametrize("listen", ["9000", "host:port:x", ":70000"])
def test_proxy_bad_listen_is_one_line(listen: str) -> None:
    proc = _run(["-m", "valve.cli", "runtime", "proxy", "--listen", listen, "--metrics-port", "0"])
    assert repr(listen) in _one_line(proc, "valve runtime proxy: --listen ")


def test_proxy_bad_upstream_is_one_line() -> None:
    proc = _run(["-m", "valve.cli", "runtime", "proxy", "--upstream", "127.0.0.1:8000", "--metrics-port", "0"])
    _one_line(proc, "valve runtime proxy: --upstream '127.0.0.1:8000'")


def test_proxy_bad_gpu_list_is_one_line() -> None:
    proc = _run(["-m", "valve.cli", "runtime", "proxy", "--gpu", "GPU-a,,GPU-b", "--metrics-port", "0"])
    _one_line(proc, "valve runtime proxy: --gpu: invalid GPU UUID ''")


def test_proxy_port_in_use_ends_with_one_line(busy_port: int) -> None:
    proc = _run(["-m", "valve.cli", "runtime", "proxy", "--listen", f"127.0.0.1:{busy_port}", "--metrics-port", "0"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"valve runtime proxy: --listen: cannot listen on 127.0.0.1:{busy_port}: ")


def test_arbiter_metrics_port_in_use_ends_with_one_line(busy_port: int, tmp_path: Path) -> None:
    proc = _run(["-m", "valve.cli", "runtime", "arbiter", "--gpu", "GPU-x", "--runtime-dir", str(tmp_path),
                 "--metrics-port", str(busy_port), "--no-memory", "--enforce", "off"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"valve runtime arbiter: --metrics-port: cannot listen on 0.0.0.0:{busy_port}: Address already in use")


@pytest.mark.parametrize("addr", ["0.0.0.0:9402", "host:port:x"])
def test_device_plugin_bad_metrics_addr_is_one_line(addr: str, short_dir: Path) -> None:
    proc = _run(["-m", "valve.device_plugin", "--backend", "sim", "--metrics-addr", addr,
                 "--device-plugin-dir", str(short_dir / "dp"), "--state-dir", str(short_dir / "state")])
    assert repr(addr) in _one_line(proc, "valve device-plugin: --metrics-addr ")
    assert not (short_dir / "dp").exists()  # nothing started


def test_device_plugin_without_nvml_is_one_line_naming_the_fix(short_dir: Path) -> None:
    proc = _run(["-c", NO_NVML, "--device-plugin-dir", str(short_dir / "dp"), "--metrics-port", "0",
                 "--pod-resources-socket", "none"])
    line = _one_line(proc, "valve device-plugin: NVML is not available (")
    assert "NVIDIA driver" in line and "--no-fail-on-init-error" in line and "--backend sim" in line


def test_device_plugin_without_nvml_can_stay_up_advertising_nothing(short_dir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", NO_NVML, "--no-fail-on-init-error", "--device-plugin-dir",
                             str(short_dir / "dp"), "--metrics-port", "0", "--pod-resources-socket", "none"],
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "not advertising any GPU: NVML is not available" in line, line
        assert proc.poll() is None and not (short_dir / "dp").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_idle_plugin_reports_its_init_error_as_a_metric() -> None:
    metrics, stop = PluginMetrics(), threading.Event()
    t = threading.Thread(target=run_idle, args=(PluginConfig(metrics_port=None), "no NVML", stop, metrics))
    t.start()
    try:
        until(lambda: metrics.registry.get_sample_value("valve_device_plugin_init_error") == 1, "init_error 1")
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def test_device_plugin_with_only_mig_gpus_is_one_line(short_dir: Path) -> None:
    proc = _run(["-m", "valve.device_plugin", "--backend", "sim", "--sim-gpus", "2", "--sim-mig", "0,1",
                 "--device-plugin-dir", str(short_dir / "dp"), "--runtime-root", str(short_dir / "run"),
                 "--state-dir", str(short_dir / "state"), "--metrics-port", "0", "--pod-resources-socket", "none",
                 "--log-level", "error"])
    _one_line(proc, "valve device-plugin: the sim backend found no GPUs to advertise (2 skipped: mig); ")


def test_operator_metrics_port_in_use_is_one_line(busy_port: int) -> None:
    proc = _run(["-m", "valve.cli", "operator", "--metrics-port", str(busy_port), "--health-port", "0"])
    _one_line(proc, f"valve operator: --metrics-port: cannot listen on 0.0.0.0:{busy_port}: ")


def test_operator_health_port_in_use_is_one_line(busy_port: int) -> None:
    # checked before the API client: kopf would start its liveness endpoint only later, in a task of its own
    proc = _run(["-m", "valve.cli", "operator", "--metrics-port", "0", "--health-port", str(busy_port)])
    _one_line(proc, f"valve operator: --health-port: cannot listen on 0.0.0.0:{busy_port}: Address already in use")


def test_operator_health_port_on_an_address_not_of_this_machine_is_one_line() -> None:
    proc = _run(["-m", "valve.cli", "operator", "--metrics-port", "0", "--health-port", "8080",
                 "--health-addr", "192.0.2.1"])  # TEST-NET-1: never a local address
    _one_line(proc, "valve operator: --health-port: cannot listen on 192.0.2.1:8080: ")


def test_proxy_metrics_port_in_use_is_one_line(busy_port: int) -> None:
    proc = _run(["-m", "valve.cli", "runtime", "proxy", "--listen", "127.0.0.1:0", "--metrics-port", str(busy_port)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"valve runtime proxy: --metrics-port: cannot listen on 127.0.0.1:{busy_port}: Address already in use")


@pytest.mark.parametrize("idle", [False, True], ids=["serving", "no-nvml"])
def test_device_plugin_metrics_port_in_use_is_one_line(busy_port: int, short_dir: Path, idle: bool) -> None:
    common = ["--device-plugin-dir", str(short_dir / "dp"), "--runtime-root", str(short_dir / "run"),
              "--state-dir", str(short_dir / "state"), "--pod-resources-socket", "none",
              "--metrics-addr", "127.0.0.1", "--metrics-port", str(busy_port), "--log-level", "critical"]
    args = ["-c", NO_NVML, "--no-fail-on-init-error", *common] if idle else \
        ["-m", "valve.device_plugin", "--backend", "sim", *common]
    proc = _run(args)
    _one_line(proc, f"valve device-plugin: cannot start: --metrics-port: cannot listen on 127.0.0.1:{busy_port}: "
                    "Address already in use")


def test_operator_webhook_without_its_certificate_is_one_line(tmp_path) -> None:
    proc = _run(["-m", "valve.cli", "operator", "--metrics-port", "0", "--health-port", "0",
                 "--webhook-port", "9443", "--webhook-cert-dir", str(tmp_path)])
    assert "tls.crt" in _one_line(proc, "valve operator: --webhook-cert-dir: no ")
    proc = _run(["-m", "valve.cli", "operator", "--metrics-port", "0", "--health-port", "0", "--webhook-port", "9443"])
    _one_line(proc, "valve operator: --webhook-cert-dir: the webhook needs --webhook-cert-dir")
