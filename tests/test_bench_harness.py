"""bench/harness: the worker protocol, the MPS daemon's start/stop, the environment record and the result files."""

from __future__ import annotations

import json
import os
import stat
import sys
import types

import pytest

from bench.harness import env, mps, output, procs

WORKER = """
import sys
from bench.harness import procs
procs.emit({"event": "ready"}, prefix="@@")
print("not a message")
q = procs.commands(quit_cmd="quit")
while True:
    cmd = q.get()
    if cmd["cmd"] == "quit":
        break
    if cmd["cmd"] == "fail":
        procs.emit({"error": "asked to"}, prefix="@@")
    else:
        procs.emit({"event": "echo", "x": cmd["x"]}, prefix="@@")
print("bye", file=sys.stderr)
"""


def test_worker_protocol(tmp_path, capfd):
    w = procs.Worker("echo", [sys.executable, "-c", WORKER], env=procs.child_env(), log=tmp_path / "w.log",
                     prefix="@@", quit_cmd="quit")
    try:
        assert w.expect("ready", timeout=60) == {"event": "ready"}
        w.send(cmd="echo", x=3)
        assert w.recv(30) == {"event": "echo", "x": 3}
        w.send(cmd="fail")
        with pytest.raises(procs.ChildFailed, match="asked to"):
            w.recv(30)
    finally:
        w.stop()
    assert w.proc.returncode == 0
    assert "bye" in (tmp_path / "w.log").read_text()
    assert "[echo] not a message" in capfd.readouterr().err


def test_worker_exit_is_reported(tmp_path):
    w = procs.Worker("gone", [sys.executable, "-c", "import sys; sys.exit(3)"], log=tmp_path / "g.log")
    with pytest.raises(procs.ChildFailed, match=r"gone exited \(rc 3\)"):
        w.recv(60)
    w.stop()


def test_child_env_puts_the_checkout_first():
    e = procs.child_env({"X": "1"}, one_thread=True)
    assert e["PYTHONPATH"].split(os.pathsep)[0] == str(procs.ROOT) and e["X"] == "1"
    assert e.get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS", "1")
    assert 0 < procs.free_port() < 65536


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    # The kernel may give a just-released port out again at once; here it does so every time for one port.
    offers = iter([41000, 41000, 41000, 41001])

    class Socket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            self.port = next(offers)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(procs, "_handed_out", set())
    monkeypatch.setattr(procs, "socket", types.SimpleNamespace(socket=Socket))  # procs' own, not the module
    assert [procs.free_port(), procs.free_port()] == [41000, 41001]


def test_mps_missing_and_daemon_protocol(tmp_path, monkeypatch):
    assert mps.missing("cpu") == "MPS needs a CUDA device"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert mps.missing("cuda") == "nvidia-cuda-mps-control not found"
    log = tmp_path / "calls.log"
    fake = tmp_path / "bin" / "nvidia-cuda-mps-control"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat)" >> {log}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    if os.geteuid() != 0:
        assert mps.missing("cuda") == "starting the MPS daemon needs root"
    monkeypatch.setattr(mps.time, "sleep", lambda s: None)
    with mps.Daemon(tmp_path / "run") as d:
        assert d.env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "run" / "mps-pipe")
    d.stop()  # idempotent
    calls = log.read_text().splitlines()
    pipe = tmp_path / "run" / "mps-pipe"
    assert len(calls) == 2 and pipe.is_dir()
    assert calls[0].startswith(f"args=-d pipe={pipe}")
    assert calls[1] == f"args= pipe={pipe} stdin=quit"


def test_mps_start_failure_is_clear(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-cuda-mps-control"
    fake.write_text("#!/bin/sh\necho 'An instance of this daemon is already running' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(RuntimeError, match="already running"):
        mps.Daemon(tmp_path / "run").start()


def test_env_record_on_cpu():
    e = env.record("cpu", gpu="sim", gpu_uuid="GPU-x")
    assert e["device"] == "cpu" and e["gpu"] == "sim" and e["gpu_uuid"] == "GPU-x"
    assert e["python"] == ".".join(map(str, sys.version_info[:3])) and e["host"]
    assert "torch" in e and "cuda" in e and "driver" not in e


def test_output_files(tmp_path):
    assert output.clean({"a": [float("nan"), 1.0], "b": (2, float("inf"))}) == {"a": [None, 1.0], "b": [2, None]}
    assert output.slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert output.slug("NVIDIA H100 80GB HBM3", "-") == "nvidia-h100-80gb-hbm3"

    def plot(path):
        path.write_bytes(b"png")

    files = output.write(tmp_path / "o", "x", {"v": float("nan"), "p": tmp_path}, "table", plot)
    assert [f.name for f in files] == ["x.json", "x.png", "x.txt"]
    assert json.loads((tmp_path / "o" / "x.json").read_text()) == {"v": None, "p": str(tmp_path)}
    assert (tmp_path / "o" / "x.txt").read_text() == "table\n"
    output.write(tmp_path / "o", "y", {"v": float("nan")}, strict=False)
    assert "NaN" in (tmp_path / "o" / "y.json").read_text()
