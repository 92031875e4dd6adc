"""Every component binds its metrics (and the operator its health) endpoint to the address it is given: a flag or
VALVE_METRICS_ADDR, which the chart and the operator set to the pod IP. Real processes and sockets: the endpoint
answers on 127.0.0.2 and nothing listens on 127.0.0.1 at that port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from waiting import until

from bench.harness.procs import free_port
from valve.api.contract import ENV_METRICS_ADDR

ADDR = "127.0.0.2"  # a loopback address other than 127.0.0.1 (Linux answers on all of 127/8)
ENV = {**{k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", ENV_METRICS_ADDR)},
       "PYTHONUNBUFFERED": "1"}


def get(host: str, port: int, path: str) -> int | None:
    """The HTTP status, or None when nothing listens there."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as r:
            return r.status
    except (ConnectionRefusedError, urllib.error.URLError):
        return None


def refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


@contextmanager
def running(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env or ENV)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serves_only_on(proc: subprocess.Popen, log: Path, port: int, path: str = "/metrics") -> None:
    until(lambda: proc.poll() is not None or get(ADDR, port, path) == 200,
          f"{path} on {ADDR}:{port}", timeout=30)
    assert proc.poll() is None, log.read_text()
    assert refused("127.0.0.1", port), f"something answers on 127.0.0.1:{port}"


@pytest.mark.parametrize("via", ["flag", "env"])
def test_arbiter_binds_metrics_to_the_given_address(tmp_path: Path, via: str) -> None:
    port = free_port(ADDR)
    args = ["-m", "valve.cli", "runtime", "arbiter", "--gpu", "GPU-x", "--runtime-dir", str(tmp_path),
            "--metrics-port", str(port), "--no-memory", "--enforce", "off"]
    args += ["--metrics-addr", ADDR] if via == "flag" else []
    env = {**ENV, ENV_METRICS_ADDR: ADDR} if via == "env" else ENV
    with running(args, tmp_path / "log", env) as proc:
        serves_only_on(proc, tmp_path / "log", port)


def test_proxy_binds_metrics_to_the_given_address_not_its_listen_host(tmp_path: Path) -> None:
    listen, port = free_port("127.0.0.1"), free_port(ADDR)
    args = ["-m", "valve.cli", "runtime", "proxy", "--listen", f"127.0.0.1:{listen}", "--metrics-port", str(port)]
    with running(args, tmp_path / "log", {**ENV, ENV_METRICS_ADDR: ADDR}) as proc:
        serves_only_on(proc, tmp_path / "log", port)
        assert refused(ADDR, listen) and not refused("127.0.0.1", listen)  # --listen is its own


def test_device_plugin_binds_metrics_to_the_given_address(short_dir: Path) -> None:
    port = free_port(ADDR)
    args = ["-m", "valve.device_plugin", "--backend", "sim", "--sim-gpus", "1", "--device-plugin-dir",
            str(short_dir / "dp"), "--runtime-root", str(short_dir / "run"), "--state-dir", str(short_dir / "state"),
            "--pod-resources-socket", "none", "--metrics-port", str(port), "--log-level", "error"]
    with running(args, short_dir / "log", {**ENV, ENV_METRICS_ADDR: ADDR}) as proc:
        serves_only_on(proc, short_dir / "log", port)


def test_dra_driver_binds_metrics_to_the_given_address(short_dir: Path) -> None:
    from operator_harness import write_kubeconfig

    port = free_port(ADDR)
    # --no-publish: no API call until a claim is prepared, so an API server that is not there is never asked.
    kubeconfig = write_kubeconfig(short_dir / "kubeconfig", f"http://127.0.0.1:{free_port('127.0.0.1')}")
    args = ["-m", "valve.cli", "dra-driver", "--backend", "sim", "--sim-gpus", "1", "--node-name", "n1",
            "--no-publish", "--plugin-dir", str(short_dir / "p"), "--registry-dir", str(short_dir / "r"),
            "--cdi-dir", str(short_dir / "cdi"), "--state-dir", str(short_dir / "s"), "--runtime-root",
            str(short_dir / "run"), "--metrics-port", str(port), "--log-level", "error"]
    with running(args, short_dir / "log", {**ENV, "KUBECONFIG": str(kubeconfig), ENV_METRICS_ADDR: ADDR}) as proc:
        serves_only_on(proc, short_dir / "log", port)


def test_operator_binds_metrics_and_health_to_the_given_address(tmp_path: Path) -> None:
    pytest.importorskip("kopf")
    kmock = pytest.importorskip("kmock")
    from operator_harness import ValveKube, write_kubeconfig

    metrics, health = free_port(ADDR), free_port(ADDR)

    async def scenario() -> None:
        async with ValveKube() as kube, kmock.Server(kube):
            kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(kube.url))
            args = ["-m", "valve.cli", "operator", "--metrics-port", str(metrics), "--health-port", str(health)]
            env = {**ENV, "KUBECONFIG": str(kubeconfig), ENV_METRICS_ADDR: ADDR}
            with running(args, tmp_path / "log", env) as proc:
                # the emulator answers in this event loop: wait in a thread
                await asyncio.to_thread(serves_only_on, proc, tmp_path / "log", health, "/healthz")
                await asyncio.to_thread(serves_only_on, proc, tmp_path / "log", metrics)

    asyncio.run(scenario())
