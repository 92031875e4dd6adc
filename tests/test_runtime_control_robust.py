"""A control file truncated, replaced or re-versioned under live mappings: the arbiter, the offline client and the
online signal/proxy survive it (each in its own process: a regression would be a SIGBUS) and say so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.waiting import until

from bench.harness.procs import free_port
from valve.runtime.control import (
    FILE_SIZE,
    FLAG_ARBITER,
    MAGIC,
    VERSION,
    ControlBlock,
    Layout,
    block_problem,
    control_path,
)

GPU = "GPU-aaaaaaaa-2222-4333-8444-555555555555"

# A client process driven line by line: each command runs one call and prints the client's state as JSON.
CLIENT = r"""
import json, sys
from valve.runtime.control import ControlBlock
from valve.runtime.gate.offline import Gate, HostGateBackend
from valve.runtime.online.signal import OnlineSignal
cb = ControlBlock.open(sys.argv[1])
gate = Gate(cb, backend=HostGateBackend(), lease_ms=60_000, watchdog=False)
sig = OnlineSignal(cb)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "gate":
        gate()
    elif cmd == "begin":
        sig.begin()
    elif cmd == "end":
        sig.end()
    print(json.dumps({"ungated_offline": gate.ungated, "ungated_online": sig.ungated, "gated": sig.last_gated,
                      "problem": cb.problem, "generation": cb.generation, "passed": gate.passed}), flush=True)
"""


def truncate(path: Path) -> None:
    os.truncate(path, 0)


def replace_with_garbage(path: Path) -> None:
    tmp = path.with_name("garbage")
    tmp.write_bytes(b"\xff" * FILE_SIZE)
    os.rename(tmp, path)


def bump_version(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(Layout.version.offset)
        f.write((VERSION + 1).to_bytes(4, "little"))


class Client:
    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __call__(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"client died: rc {self.proc.wait(10)} (negative: the signal) {self.proc.stderr.read()}"
        return json.loads(line)

    def close(self) -> str:
        self.proc.stdin.close()
        assert self.proc.wait(20) == 0
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return err


@pytest.mark.parametrize("damage, problem", [(truncate, "truncated"), (replace_with_garbage, "replaced"),
                                             (bump_version, "layout version")])
def test_clients_survive_a_bad_block_and_reattach_to_a_new_one(tmp_path, damage, problem):
    path = control_path(GPU, tmp_path)
    ControlBlock.create(path).close()
    c = Client(path)
    try:
        st = c("gate")
        assert st["passed"] == 1 and st["ungated_offline"] == 0
        assert c("begin")["gated"] is True
        assert c("end")["ungated_online"] == 0
        damage(path)
        # offline runs ungated rather than touch the mapping (a replaced file is seen within RECHECK_NS: the old
        # mapping is safe to touch until then, it is only unlinked)
        st = until(lambda: (s := c("gate"))["problem"] and s, "the client to see the bad block")
        assert st["ungated_offline"] == 1 and problem in st["problem"]
        st = c("begin")  # online is served ungated, and counted
        assert st["gated"] is False and st["ungated_online"] == 1
        c("end")
        ControlBlock.create(path).close()  # an arbiter re-creates the file: both sides re-attach
        st = until(lambda: (s := c("gate"))["problem"] is None and s, "the client to re-attach")
        assert st["generation"] == 1
        assert c("begin")["gated"] is True
        fresh = ControlBlock.open(path)
        assert fresh.inflight() == 1 and fresh.fields.offline_progress >= 1  # counted in the new file
        c("end")
        assert fresh.inflight() == 0
    finally:
        err = c.close()
    assert err.count(problem) == 1  # one log line per problem, not one per call


def test_a_claim_in_a_new_mapping_counts_requests_already_in_flight(tmp_path):
    path = control_path(GPU, tmp_path)
    ControlBlock.create(path).close()
    c = Client(path)
    try:
        c("begin")
        c("begin")
        ControlBlock.create(path).close()  # replaced while two requests are in flight
        until(lambda: c("gate")["generation"] == 1, "the client to re-attach")
        c("end")  # the first end after re-attaching claims a slot holding both requests, then ends one
        assert ControlBlock.open(path).inflight() == 1
        c("end")
        assert ControlBlock.open(path).inflight() == 0
    finally:
        c.close()


def test_block_problem_names_each_case():
    assert block_problem(FILE_SIZE, 5, 5, MAGIC, VERSION, FILE_SIZE) is None
    assert "truncated to 0 bytes" in block_problem(0, 5, 5)
    assert block_problem(FILE_SIZE, 5, None) == "removed"
    assert "replaced" in block_problem(FILE_SIZE, 5, 6, MAGIC, VERSION, FILE_SIZE)
    assert "bad magic" in block_problem(FILE_SIZE, 5, 5, 0, VERSION, FILE_SIZE)
    assert "version 2" in block_problem(FILE_SIZE, 5, 5, MAGIC, 2, FILE_SIZE)


# ---- the arbiter process -------------------------------------------------------------------------------------
def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def valid(path: Path) -> ControlBlock | None:
    try:
        return ControlBlock.open(path)
    except Exception:  # noqa: BLE001 - not there or not valid yet
        return None


@pytest.mark.parametrize("damage", [truncate, replace_with_garbage, bump_version])
def test_arbiter_recreates_a_bad_block_and_keeps_running(tmp_path, damage):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu", GPU, "--runtime-dir", str(tmp_path),
         "--metrics-port", str(port), "--no-memory"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    path = control_path(GPU, tmp_path)
    try:
        cb = until(lambda: valid(path), "the control file")
        until(lambda: cb.fields.flags & FLAG_ARBITER, "the arbiter's first step")
        ino = path.stat().st_ino
        damage(path)
        fresh = until(lambda: (b := valid(path)) and path.stat().st_ino != ino and b, "a re-created control file")
        beat = fresh.fields.heartbeat_ns
        until(lambda: fresh.fields.heartbeat_ns > beat, "the arbiter's heartbeat in the new file")
        assert proc.poll() is None
        until(lambda: f'valve_control_block_recreated_total{{gpu="{GPU}"}} 1.0' in scrape(port), "the metric")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        out = proc.stdout.read()
        proc.stdout.close()
    assert rc == 0, out
    assert out.count("re-created it") == 1


# ---- the proxy process ---------------------------------------------------------------------------------------
class Upstream(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def test_proxy_serves_ungated_on_a_truncated_block_and_says_so(tmp_path):
    path = control_path(GPU, tmp_path)
    ControlBlock.create(path).close()
    up = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "valve.cli", "runtime", "proxy", "--listen", f"127.0.0.1:{port}", "--upstream",
         f"http://127.0.0.1:{up.server_address[1]}", "--gpu", GPU, "--runtime-dir", str(tmp_path),
         "--metrics-port", str(mport)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def post() -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=b"{}", method="POST")
        return urllib.request.urlopen(req, timeout=10).read()

    def answers() -> bool:
        try:
            return post() == b"ok"
        except OSError:
            return False

    try:
        until(answers, "the proxy to answer")
        cb = ControlBlock.open(path)
        assert cb.claimed_slots()  # the proxy signalled through the block
        truncate(path)
        for _ in range(3):
            assert post() == b"ok"
        text = scrape(mport)
        assert "valve_online_ungated_requests_total 3.0" in text
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        out = proc.stdout.read()
        proc.stdout.close()
        up.shutdown()
    assert out.count("truncated to 0 bytes") == 1
