"""Child processes of the benchmarks, always stopped.

- ``Child``: a command in its own process group, output to a log file (engines, arbiters);
- ``Worker``: a child that answers JSON commands on stdin with JSON lines on stdout (``emit`` and ``commands`` are
  its side); a worker is usually the benchmark script itself run with a role argument.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class ChildFailed(RuntimeError):
    pass


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now, and never one this process handed out before: the kernel may give a
    just-released port out again at once (about one pair of calls in 25,000), and two servers of one run must not
    be told the same port."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def child_env(extra: dict | None = None, one_thread: bool = False) -> dict:
    """This environment with the checkout on PYTHONPATH (the children import valve and bench from it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["_TYPER_STANDARD_TRACEBACK"] = "1"  # plain tracebacks in the logs (the error line last, not boxed)
    if one_thread:  # two engines on a small CPU box: one thread each
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


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


# ---- workers: JSON commands on stdin, JSON lines on stdout -----------------------------------------------------
def emit(msg: dict, prefix: str = "") -> None:
    """The worker's side: one message to the orchestrator."""
    sys.stdout.write(prefix + json.dumps(msg) + "\n")
    sys.stdout.flush()


def commands(quit_cmd: str = "exit") -> queue.Queue:
    """The worker's side: commands from stdin on a queue; EOF (the orchestrator went away) becomes ``quit_cmd``."""
    q: queue.Queue = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            if line.strip():
                q.put(json.loads(line))
        q.put({"cmd": quit_cmd})

    threading.Thread(target=read, daemon=True).start()
    return q


class Worker:
    """The orchestrator's side of a worker. Lines on its stdout that start with ``prefix`` and parse as JSON are
    messages; others are echoed to our stderr. Its stderr goes to ``log`` if given (else ours)."""

    def __init__(self, name: str, cmd: list[str], env: dict | None = None, log: Path | None = None,
                 prefix: str = "", quit_cmd: str = "exit", cwd: Path | None = None) -> None:
        self.name, self.prefix, self.quit_cmd, self.log_path = name, prefix, quit_cmd, log
        self._log = open(log, "w") if log else None  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1, cwd=str(cwd or ROOT))
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(self.prefix):
                try:
                    self.lines.put(json.loads(line[len(self.prefix):]))
                    continue
                except json.JSONDecodeError:
                    pass
            print(f"[{self.name}] {line.rstrip()}", file=sys.stderr)
        self.lines.put(None)

    def tail(self, n: int = 3000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def _why(self) -> str:
        t = self.tail()
        return f"; log:\n{t}" if t else ""

    def send(self, **cmd) -> None:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as e:
            raise ChildFailed(f"{self.name}: cannot send {cmd} ({e}){self._why()}") from e

    def recv(self, timeout: float, what: str = "an answer", errors: bool = True) -> dict:
        """The next message; ChildFailed on timeout, on exit, and (``errors``) on a message with an ``error``."""
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise ChildFailed(f"{self.name}: no {what} within {timeout:.0f} s{self._why()}") from None
        if msg is None:
            try:
                rc = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                rc = None
            raise ChildFailed(f"{self.name} exited (rc {rc}) before {what}{self._why()}")
        if errors and "error" in msg:
            raise ChildFailed(f"{self.name}: {msg['error']}{self._why()}")
        return msg

    def expect(self, *events: str, timeout: float = 300.0) -> dict:
        """The next message, which must be one of ``events`` (its ``event`` field)."""
        msg = self.recv(timeout, "/".join(events), errors=False)
        if msg.get("event") not in events:
            raise ChildFailed(f"{self.name}: expected {'/'.join(events)}, got {msg}")
        return msg

    def stop(self, timeout: float = 15.0) -> None:
        """``quit_cmd``, then SIGTERM, then SIGKILL."""
        if self.proc.poll() is None:
            try:
                self.send(cmd=self.quit_cmd)
                self.proc.stdin.close()
            except (ChildFailed, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self._log:
            self._log.close()
