"""Shared pieces of the chaos suite (tests/chaos/): an arbiter process to kill, an offline gate loop to watch, and
the ``figures`` fixture that records what each test measured into ``$VALVE_CHAOS_OUT`` (bench/chaos.py sets it)."""

from __future__ import annotations

import bisect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from waiting import until

from valve.runtime.control import FLAG_ARBITER, GATE_OPEN, ControlBlock, control_path
from valve.runtime.gate.offline import Gate, HostGateBackend

GPU = "GPU-c0a05c0a-0000-4000-8000-000000000001"
LEASE_MS = 200.0
OUT_ENV = "VALVE_CHAOS_OUT"


@pytest.fixture
def figures(request):
    """A dict the test fills with its measured figures; written under the test's name when $VALVE_CHAOS_OUT is
    set (merged into the file, so one pytest run of the suite fills one file)."""
    got: dict = {}
    yield got
    out = os.environ.get(OUT_ENV)
    if out and got:
        path = Path(out)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[request.node.name] = got
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def write_prompts(path: Path, n: int, seed: int) -> None:
    """``n`` offline prompts (random token ids, ids ``p0``..) for the tiny model, as the runner's JSONL input."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = [rng.randrange(256) for _ in range(rng.randint(4, 24))]
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt, "max_tokens": rng.randint(4, 12)}) + "\n")


def ms(ns: int) -> float:
    return round(ns / 1e6, 1)


def valid(path: Path) -> ControlBlock | None:
    try:
        return ControlBlock.open(path)
    except Exception:  # noqa: BLE001 - not there or not valid yet
        return None


class ArbiterProc:
    """`valve runtime arbiter` as a child process with a short lease, to kill and restart."""

    def __init__(self, root: Path, lease_ms: float = LEASE_MS, extra: tuple[str, ...] = ()) -> None:
        self.root, self.path = root, control_path(GPU, root)
        self.spec = root / "spec.json"
        self.spec.write_text(json.dumps({"heartbeat_lease_ms": lease_ms}))
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log = root / "arbiter.log"  # a file, not a pipe: a pipe nobody reads blocks the arbiter once full

    def start(self) -> int:
        """Start it; returns the monotonic ns it was started at."""
        t0 = time.monotonic_ns()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu", GPU, "--runtime-dir", str(self.root),
             "--metrics-port", "0", "--no-memory", "--spec", str(self.spec), *self.extra],
            stdout=subprocess.DEVNULL, stderr=self.log.open("a"), text=True)
        return t0

    def wait_ready(self, after_ns: int = 0) -> ControlBlock:
        cb = until(lambda: valid(self.path), "the control file")
        until(lambda: cb.fields.flags & FLAG_ARBITER and cb.fields.heartbeat_ns > after_ns, "the arbiter's heartbeat")
        return cb

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return time.monotonic_ns()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError(f"the arbiter ignored SIGTERM; its log ends: {self.log.read_text()[-2000:]}") from None


class OfflineLoop:
    """An offline tenant in a thread: a host-backend Gate called in a loop, with the time of every boundary."""

    def __init__(self, cb: ControlBlock, work_s: float = 0.001) -> None:
        self.gate = Gate(cb, backend=HostGateBackend())
        self.passes: list[int] = []
        self.errors: list[BaseException] = []
        self.work_s = work_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.gate()
                self.passes.append(time.monotonic_ns())
                time.sleep(self.work_s)  # the sub-layer's work
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)

    def count(self) -> int:
        return len(self.passes)

    def passed_after(self, t_ns: int) -> int | None:
        """The first boundary passed after ``t_ns`` (None: none yet)."""
        i = bisect.bisect_right(self.passes, t_ns)
        return self.passes[i] if i < len(self.passes) else None

    def parked(self) -> bool:
        """No boundary passed for 50 ms (it waits at the closed gate)."""
        return bool(self.passes) and time.monotonic_ns() - self.passes[-1] > 50_000_000

    def stop(self) -> None:
        self._stop.set()
        self.gate.close()
        self.thread.join(10)
        assert not self.errors, self.errors


def gate_open(cb: ControlBlock) -> bool:
    return cb.healthy() and cb.fields.gate == GATE_OPEN
