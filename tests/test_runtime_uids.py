"""Tenants as different uids (arbiter 65532, online root, offline 1000) with the narrowest umask all attach: the
modes of the control file, the slots directory and the lock files are set explicitly, not taken from the umask."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from valve.runtime.control import DIR_MODE, FILE_MODE, SLOTS_DIR_MODE, control_path

GPU = "GPU-bbbbbbbb-2222-4333-8444-555555555555"
ARBITER, ONLINE, OFFLINE = 65532, 0, 1000

# Imports first (the interpreter lives where other uids cannot read), then drop to the uid, then act.
ROLE = r"""
import json, os, sys, time
from valve.api.runtime import RuntimeSpec
from valve.runtime.arbiter.loop import Arbiter
from valve.runtime.control import ControlBlock, control_path
from valve.runtime.gate.offline import Gate, HostGateBackend
from valve.runtime.online.signal import OnlineSignal
role, uid, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
os.umask(0o077)
path = control_path(sys.argv[4], root)
if role == "arbiter":
    cb, _ = ControlBlock.open_or_create(path)
    arb = Arbiter(cb, RuntimeSpec())
    arb.step(time.monotonic_ns())
    print(json.dumps({"inflight": cb.inflight(), "gate": cb.fields.gate}), flush=True)
else:
    cb = ControlBlock.open(path)
    if role == "offline":
        Gate(cb, backend=HostGateBackend(), watchdog=False)()
    sig = OnlineSignal(cb)
    sig.begin()
    print(json.dumps({"gated": sig.last_gated}), flush=True)
    sys.stdin.read()  # hold the slot until told
"""


def role(name: str, uid: int, root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ROLE, name, str(uid), str(root), GPU], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(p: subprocess.Popen) -> dict:
    line = p.stdout.readline()
    assert line, f"{p.args[3]} failed: {p.stderr.read()}"
    return json.loads(line)


def finish(p: subprocess.Popen) -> None:
    p.stdin.close()
    assert p.wait(20) == 0, p.stderr.read()
    p.stdout.close()
    p.stderr.close()


@pytest.fixture
def shared_dir():
    d = Path(tempfile.mkdtemp(prefix="valve-uids-"))  # not under pytest's 0700 tmp: every uid must reach it
    d.chmod(0o777)
    yield d
    shutil.rmtree(d)


def test_three_uids_attach_with_a_narrow_umask(shared_dir):
    if os.geteuid() != 0:
        pytest.fail("this test switches uids: run the suite as root (CI does)")
    arb = role("arbiter", ARBITER, shared_dir)
    assert result(arb)["inflight"] == 0
    finish(arb)
    path = control_path(GPU, shared_dir)
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE and path.stat().st_uid == ARBITER
    assert stat.S_IMODE(path.parent.stat().st_mode) == DIR_MODE
    online = role("online", ONLINE, shared_dir)
    assert result(online)["gated"] is True
    offline = role("offline", OFFLINE, shared_dir)  # a second online writer too: its own lock file
    assert result(offline)["gated"] is True
    slots = path.parent / "online-slots"
    assert stat.S_IMODE(slots.stat().st_mode) == SLOTS_DIR_MODE
    locks = sorted(slots.iterdir())
    assert [stat.S_IMODE(p.stat().st_mode) for p in locks] == [FILE_MODE] * 2
    assert {p.stat().st_uid for p in locks} == {ONLINE, OFFLINE}
    finish(offline)  # its slot is now dead; the online one lives
    again = role("arbiter", ARBITER, shared_dir)  # a restarted arbiter opens every lock file to reap
    got = result(again)
    finish(again)
    assert got["inflight"] == 1 and got["gate"] == 0  # the live request counted, and gated
    finish(online)


def test_arbiter_reports_an_unusable_runtime_dir_in_one_line(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    p = subprocess.run([sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu", GPU, "--runtime-dir",
                        str(blocker), "--metrics-port", "0", "--no-memory"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot create the control block" in err[0] and "Traceback" not in p.stderr, p.stderr
