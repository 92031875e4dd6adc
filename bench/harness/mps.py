"""An MPS control daemon private to one run: its own pipe and log directories, stopped on exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.harness.procs import ChildFailed

CONTROL = "nvidia-cuda-mps-control"


def missing(device: str) -> str | None:
    """Why MPS cannot be started here, or None."""
    if device != "cuda":
        return "MPS needs a CUDA device"
    if shutil.which(CONTROL) is None:
        return f"{CONTROL} not found"
    if os.geteuid() != 0:
        return "starting the MPS daemon needs root"
    return None


class Daemon:
    """``with Daemon(workdir) as mps:`` runs the clients started with ``mps.env`` (the two MPS variables) under it."""

    def __init__(self, workdir: Path) -> None:
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(Path(workdir) / "mps-pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(Path(workdir) / "mps-log")}
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)
        self.started = False

    def start(self) -> Daemon:
        r = subprocess.run([CONTROL, "-d"], env={**os.environ, **self.env}, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise ChildFailed(f"{CONTROL} -d failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            subprocess.run([CONTROL], input="quit\n", env={**os.environ, **self.env}, capture_output=True, text=True,
                           timeout=30)
            self.started = False
            time.sleep(1.0)  # the daemon and its server exit asynchronously; the next variant must not meet them

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
