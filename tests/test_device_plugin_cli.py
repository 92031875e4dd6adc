"""`valve device-plugin` as a process: registers with a fake kubelet, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer
from typer.testing import CliRunner

from valve.device_plugin.api import pb
from valve.device_plugin.cli import register
from valve.device_plugin.fake_kubelet import FakeKubelet
from valve.device_plugin.health import DEFAULT_IGNORED_XIDS

ONLINE, OFFLINE = "valve.io/online-gpu", "valve.io/offline-gpu"




def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command, so `device-plugin` stays a sub-command as in `valve`
        pass

    return app


def test_help_lists_the_flags() -> None:
    result = CliRunner().invoke(_app(), ["device-plugin", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for flag in ("--backend", "--device-plugin-dir", "--online-resource", "--runtime-root", "--state-dir",
                 "--disable-xids", "--metrics-port", "--pod-resources-socket"):
        assert flag in result.output
    assert ",".join(map(str, sorted(DEFAULT_IGNORED_XIDS))) in result.output


def test_bad_flags_are_rejected() -> None:
    result = CliRunner().invoke(_app(), ["device-plugin", "--backend", "sim", "--disable-xids", "1,x"])
    assert result.exit_code != 0 and "bad XID" in result.output


def test_sigterm_stops_cleanly_and_removes_sockets(short_dir: Path) -> None:
    dp = short_dir / "dp"
    kubelet = FakeKubelet(dp).start()
    cmd = [sys.executable, "-m", "valve.device_plugin", "--backend", "sim", "--sim-gpus", "2",
           "--device-plugin-dir", str(dp), "--runtime-root", str(short_dir / "run"),
           "--state-dir", str(short_dir / "state"), "--pod-resources-socket", "none", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        regs = kubelet.wait_registrations(2, timeout=20.0)
        assert {r.resource_name for r in regs} == {ONLINE, OFFLINE}
        lst = kubelet.wait_list(ONLINE, lambda r: len(r.devices) == 2)
        stub, channel = kubelet.stub(OFFLINE)
        with channel:
            resp = stub.Allocate(pb.AllocateRequest(
                container_requests=[pb.ContainerAllocateRequest(devices_ids=[lst.devices[1].ID])]), timeout=5)
        assert resp.container_responses[0].envs["VALVE_GPU_UUID"] == lst.devices[1].ID
        assert (short_dir / "state" / "allocations.json").exists()
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, out
        assert time.monotonic() - start < 5.0
        assert "sockets removed" in out
        assert sorted(p.name for p in dp.iterdir()) == ["kubelet.sock"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kubelet.stop()
