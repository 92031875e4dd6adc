"""`python -m valve.engine.offline ARGS` with two additions for the chaos suite (the runner, its engine, its pool
and its reclaim handler are the real ones):

- the device's view: after every map and unmap of the simulated backend, ``$VALVE_TEST_DEVICE_BYTES`` holds
  "PID BYTES", the memory this process has mapped (what NVML reports per process on a GPU);
- with ``$VALVE_TEST_MID_RECLAIM`` set, the first reclaim answer stops in the middle: inside ``KVPool.reclaim``,
  victims chosen, live blocks moved and the stream waited for, just before the victim chunks are unmapped (their
  memory not yet released, the arbiter's acknowledgement not written), it writes that file (the request's bytes)
  and waits there for good, so the test's SIGKILL lands mid-reclaim every time."""

from __future__ import annotations

import os
import runpy
import sys
import threading

from valve.runtime.memory.pool import KVPool
from valve.runtime.memory.sim import SimBackend

DEVICE = os.environ["VALVE_TEST_DEVICE_BYTES"]
MARKER = os.environ.get("VALVE_TEST_MID_RECLAIM")
inside = threading.local()
real_reclaim, real_map, real_unmap = KVPool.reclaim, SimBackend.map, SimBackend.unmap


def publish(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)  # whole or absent: the test never reads half a file


def reclaim(self, nbytes, *args, **kwargs):
    inside.nbytes = nbytes
    try:
        return real_reclaim(self, nbytes, *args, **kwargs)
    finally:
        inside.nbytes = None


def map_(self, offsets, nbytes):
    real_map(self, offsets, nbytes)
    publish(DEVICE, f"{os.getpid()} {self.mapped_bytes()}")


def unmap(self, offsets, nbytes):
    asked = getattr(inside, "nbytes", None)
    if MARKER and asked is not None:
        publish(MARKER, str(asked))
        threading.Event().wait()  # held here until the test kills the process
    real_unmap(self, offsets, nbytes)
    publish(DEVICE, f"{os.getpid()} {self.mapped_bytes()}")


KVPool.reclaim, SimBackend.map, SimBackend.unmap = reclaim, map_, unmap
sys.argv[0] = "valve.engine.offline"
runpy.run_module("valve.engine.offline", run_name="__main__", alter_sys=True)
