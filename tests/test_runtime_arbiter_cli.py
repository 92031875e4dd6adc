"""`valve runtime arbiter` as a real process: metrics, a SIGKILLed arbiter, bad specs, corrupt control files."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from waiting import until

from bench.harness.procs import free_port
from valve.runtime.cli import load_spec
from valve.runtime.control import (
    FILE_SIZE,
    FLAG_ARBITER,
    FLAG_CLOSE_ALLOWED,
    GATE_CLOSED,
    GATE_OPEN,
    ControlBlock,
    ControlBlockError,
    control_path,
)
from valve.runtime.gate.offline import Gate, HostGateBackend
from valve.runtime.online.signal import OnlineSignal

GPU = "GPU-11111111-2222-4333-8444-555555555555"


@pytest.fixture
def arbiter_proc(tmp_path):
    port = free_port()
    env = {**os.environ, "VALVE_RUNTIME_SPEC": json.dumps({"heartbeat_lease_ms": 300, "idle_hysteresis_ms": 2})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu", GPU, "--runtime-dir", str(tmp_path),
         "--metrics-port", str(port), "--no-memory"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    path = control_path(GPU, tmp_path)
    try:
        until(lambda: path.exists() and path.stat().st_size == FILE_SIZE, what="the control file")
        cb = ControlBlock.open(path)
        until(lambda: cb.fields.flags & FLAG_ARBITER, what="the arbiter's first step")
        yield proc, cb, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_arbiter_process_serves_metrics_and_gates(arbiter_proc):
    proc, cb, port = arbiter_proc
    assert cb.fields.lease_ns == 300_000_000
    until(lambda: "valve_preemptions_total" in scrape(port), what="metrics")
    assert cb.fields.flags & FLAG_CLOSE_ALLOWED  # clients may close the gate themselves ...
    sig = OnlineSignal(cb)
    sig.begin()  # ... if its heartbeat is within the lease, else (a loaded machine can hold it longer) it does
    until(lambda: cb.fields.gate == GATE_CLOSED, what="the gate closed for the request")
    until(lambda: metric(scrape(port), "valve_online_inflight") == 1, what="inflight gauge")
    sig.end()
    until(lambda: cb.fields.gate == GATE_OPEN, what="reopen after the hysteresis")
    text = scrape(port)
    assert metric(text, "valve_preemptions_total") == 1
    assert metric(text, "valve_gate_closed_seconds_total") > 0
    for name in ("valve_offline_progress_total", "valve_preemption_latency_seconds_bucket"):
        assert name in text
    proc.send_signal(signal.SIGTERM)  # a clean stop leaves the gate open and clears the flags
    assert proc.wait(20) == 0
    assert cb.fields.gate == GATE_OPEN and cb.fields.flags == 0


def test_killed_arbiter_does_not_stall_offline_beyond_the_lease(arbiter_proc):
    proc, cb, _ = arbiter_proc
    sig = OnlineSignal(cb)
    sig.begin()  # an online request in flight keeps the gate closed
    until(lambda: cb.fields.gate == GATE_CLOSED, what="the gate closed for the request")
    gate = Gate(cb, backend=HostGateBackend())  # lease from the control block (300 ms)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = threading.Event()
    t = threading.Thread(target=lambda: (gate(), done.set()), daemon=True)
    t.start()
    assert done.wait(30), "offline stalled on a dead arbiter"
    assert gate.forced_opens == 1 and cb.fields.forced_opens == 1 and cb.fields.gate == GATE_OPEN
    age_at_open = time.monotonic_ns() - cb.fields.heartbeat_ns
    assert age_at_open > 300_000_000  # not before the lease ran out
    sig.end()


def test_killed_online_process_is_reaped(arbiter_proc, tmp_path):
    _, cb, _ = arbiter_proc
    code = ("import sys, time; from valve.runtime.control import ControlBlock; from valve.runtime.online.signal import "
            "OnlineSignal; s = OnlineSignal(ControlBlock.open(sys.argv[1])); s.begin(); print('in', flush=True); "
            "time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(cb.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "in"
        until(lambda: cb.fields.online_inflight == 1, what="the child's request")
        child.kill()
        child.wait(10)
        until(lambda: cb.fields.online_inflight == 0 and cb.fields.gate == GATE_OPEN,
              what="the dead writer's slot reaped and the gate reopened")
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()


def test_bad_spec_is_a_clear_error(tmp_path):
    env = {**os.environ, "VALVE_RUNTIME_SPEC": json.dumps({"idle_hysteresis_ms": -1})}
    proc = subprocess.run(
        [sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu", GPU, "--runtime-dir", str(tmp_path),
         "--metrics-port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "invalid runtime spec from VALVE_RUNTIME_SPEC" in proc.stderr and "idle_hysteresis_ms" in proc.stderr


def test_load_spec_sources(tmp_path):
    assert load_spec(None, env="").idle_hysteresis_ms == 5.0
    y = tmp_path / "spec.yaml"
    y.write_text("idle_hysteresis_ms: 3\nreserve:\n  min_bytes: 0\n")
    spec = load_spec(str(y), env="")
    assert spec.idle_hysteresis_ms == 3 and spec.reserve.min_bytes == 0
    assert load_spec(None, env='{"queue_ahead": 4}').queue_ahead == 4
    os.environ["VALVE_TEST_SPEC"] = '{"queue_ahead": 5}'
    try:
        assert load_spec("env:VALVE_TEST_SPEC", env="").queue_ahead == 5  # the operator's --config env:NAME
    finally:
        del os.environ["VALVE_TEST_SPEC"]
    with pytest.raises(ValueError, match="VALVE_NOT_SET is not set"):
        load_spec("env:VALVE_NOT_SET")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_spec(None, env="{nope")
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        load_spec(None, env='{"idle_hysteresis": 3}')


# ---- corrupt control files -------------------------------------------------------------------------------
def corrupt(path, how):
    if how == "size":
        path.write_bytes(b"\0" * 100)
    elif how == "magic":
        data = bytearray(path.read_bytes())
        data[0:4] = b"XXXX"
        path.write_bytes(bytes(data))
    elif how == "version":
        data = bytearray(path.read_bytes())
        data[4:8] = (99).to_bytes(4, "little")
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,message", [
    ("size", "size 100 bytes, expected 4096"),
    ("magic", "bad magic"),
    ("version", "layout version 99"),
])
def test_corrupt_control_files_are_rejected_clearly(tmp_path, how, message, monkeypatch):
    path = control_path(GPU, tmp_path)
    ControlBlock.create(path).close()
    corrupt(path, how)
    with pytest.raises(ControlBlockError, match=message):
        ControlBlock.open(path)
    monkeypatch.setenv("VALVE_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(ControlBlockError, match=message):  # the offline client refuses it too
        Gate(gpu_uuid=GPU, backend="host")
    cb, reason = ControlBlock.open_or_create(path)  # the arbiter re-initialises it, saying why
    assert message.split()[0] in reason and cb.fields.gate == GATE_OPEN
    ControlBlock.open(path).close()


def test_missing_control_file_is_a_clear_error(tmp_path):
    with pytest.raises(ControlBlockError, match="no control file .is the arbiter running"):
        Gate(ControlBlock.open(control_path(GPU, tmp_path)))
