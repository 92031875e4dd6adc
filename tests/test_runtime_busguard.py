"""The SIGBUS guard: a control file truncated between a check and a touch reads as zeros instead of killing the
process; any other SIGBUS keeps its old action. Each case runs in its own process (a failure is a signal)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

TRUNCATE_THEN_TOUCH = """
import os, sys
from valve.runtime import busguard
from valve.runtime.control import ControlBlock
cb = ControlBlock.create(sys.argv[1])
os.truncate(sys.argv[1], 0)
cb.fields.gate = 0  # a store into the truncated page: SIGBUS without the guard
print(cb.fields.magic, cb.healthy(), cb.problem, busguard.pages_replaced(), sep=";")
"""

# One thread truncates and restores the file as fast as it can while the main thread touches the header: a
# truncation lands at an arbitrary point of the touches, as in the window between a check and a touch.
RACE = """
import os, sys, threading
from valve.runtime import busguard
from valve.runtime.control import FILE_SIZE, ControlBlock
cb = ControlBlock.create(sys.argv[1])
stop = threading.Event()
def damage():
    while not stop.is_set():
        os.truncate(sys.argv[1], 0)
        os.truncate(sys.argv[1], FILE_SIZE)
t = threading.Thread(target=damage)
t.start()
touches = 0
while busguard.pages_replaced() == 0 and touches < 5_000_000:
    cb.fields.magic
    cb.fields.heartbeat_ns += 1
    touches += 1
stop.set()
t.join()
print(busguard.pages_replaced(), touches)
"""

FOREIGN = """
import faulthandler, mmap, os, sys
from valve.runtime.control import ControlBlock
faulthandler.enable()
ControlBlock.create(sys.argv[1])  # installs the guard
fd = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 4096)
mm = mmap.mmap(fd, 4096)
os.ftruncate(fd, 0)
mm[0]  # not a guarded range: SIGBUS as ever
"""


def run(code: str, *args, env_off: bool = False) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_off:
        env["VALVE_BUSGUARD"] = "off"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_a_touch_of_a_truncated_block_reads_zeros_and_the_check_sees_it(tmp_path):
    res = run(TRUNCATE_THEN_TOUCH, tmp_path / "control")
    assert res.returncode == 0, res.stderr
    magic, healthy, problem, replaced = res.stdout.strip().split(";")
    assert (magic, healthy, replaced) == ("0", "False", "1")
    assert problem.startswith("truncated to 0 bytes")


def test_without_the_guard_the_same_touch_kills_the_process(tmp_path):
    res = run(TRUNCATE_THEN_TOUCH, tmp_path / "control", env_off=True)
    assert res.returncode == -signal.SIGBUS


def test_truncations_racing_touches_never_kill_the_process(tmp_path):
    res = run(RACE, tmp_path / "control")
    assert res.returncode == 0, res.stderr
    replaced, touches = map(int, res.stdout.split())
    assert replaced == 1, f"no truncation landed in {touches} touches"


def test_a_sigbus_elsewhere_keeps_its_old_action(tmp_path):
    res = run(FOREIGN, tmp_path / "control", tmp_path / "other")
    assert res.returncode == -signal.SIGBUS
    assert "Bus error" in res.stderr  # faulthandler's handler, installed before the guard, still ran


def test_a_missing_library_says_so_once_and_runs_unguarded(tmp_path, monkeypatch):
    value = "/nonexistent/libvalvebusguard.so"
    code = """
    import logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from valve.runtime.control import ControlBlock
    ControlBlock.create(sys.argv[1]); ControlBlock.create(sys.argv[1])
    """
    monkeypatch.setenv("VALVE_BUSGUARD", value)
    res = run(code, tmp_path / "control")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "SIGBUS guard" in ln]
    assert len(lines) == 1 and value in lines[0], res.stderr
