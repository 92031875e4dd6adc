"""Child processes of the benchmark: each in its own process group, logged to a file, always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class ChildFailed(RuntimeError):
    pass


class Child:
    """One command in its own session (so stopping it stops whatever it started), output to ``log``."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path) -> None:
        self.name, self.cmd, self.log = name, cmd, Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # the group this child leads (start_new_session): nothing else
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM to the group, SIGKILL after ``timeout``. Returns the exit code."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
        self._signal_group(signal.SIGKILL)  # anything the child left behind in its group
        return self.proc.returncode

    def check(self) -> None:
        if not self.alive():
            raise ChildFailed(f"{self.name} exited with code {self.proc.returncode}: {' '.join(self.cmd)}\n"
                              f"--- last output ({self.log}) ---\n{self.tail()}")


def wait_for(what: str, ready: Callable[[], bool], timeout: float, children: list[Child] = (),
             poll: float = 0.05) -> None:
    """Poll ``ready`` until it is true; fail with the children's output if one dies or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        for c in children:
            c.check()
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {c.name} ({c.log}) ---\n{c.tail()}" for c in children)
            raise ChildFailed(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(poll)
