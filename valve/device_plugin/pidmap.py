"""The pid map (``--pid-map``): per GPU, which host pid is which pod's which pid.

NVML names a GPU's processes by host pid; a tenant knows (and publishes in the control block) only its pid in
its own pid namespace. The device plugin runs on the node with the host's pid namespace (the chart's
``devicePlugin.pidMap`` sets ``hostPID: true``), so it can join the two: for each process NVML lists on a GPU it
serves, it reads ``/proc/<pid>/status`` (``NSpid:``: the pid in each namespace, the host's first, the process's
own last) and ``/proc/<pid>/cgroup`` (the pod's UID in the kubelet's cgroup path), and writes the table as
``<runtime dir>/<gpu-uuid>/pids.json`` (valve.api.contract.PIDS_FILE), where the GPU's arbiter reads it
(valve.runtime.arbiter.pidmap).

Pure functions (parsing, building the table, the document) and a thin loop (:class:`PidMapWriter`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from valve.api.contract import PIDS_FILE, PIDS_FORMAT_VERSION

log = logging.getLogger(__name__)

# Written by root (the plugin), read by the arbiter (uid 65532) and anyone on the GPU: readable by all, writable
# by the owner only (the folder's sticky bit keeps others from replacing it).
FILE_MODE = 0o644

# The pod's cgroup folder, as the kubelet names it: cgroupfs `pod<uid>` (dashes), systemd
# `kubepods[-<qos>]-pod<uid with underscores>.slice`; the UID is a UUID (the API server's metadata.uid).
_UUID = r"[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}"
_POD_DIR = re.compile(rf"^(?:pod|.*-pod)({_UUID})(?:\.slice)?$")


def parse_nspid(status: str) -> tuple[int, ...] | None:
    """The ``NSpid:`` line of ``/proc/<pid>/status``: the pid in each pid namespace it is in, from the one of the
    reader's /proc (the host's, with hostPID) to the process's own. None without one (a kernel before 4.1)."""
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            try:
                pids = tuple(int(p) for p in line[len("NSpid:"):].split())
            except ValueError:
                return None
            return pids or None
    return None


def pod_uid_from_cgroup(cgroup: str) -> str | None:
    """The pod UID in ``/proc/<pid>/cgroup`` (cgroup v1: a line per hierarchy; v2: ``0::<path>``), lower case with
    dashes, or None for a process outside a pod. The path may be relative to the reader's cgroup namespace
    (``/../../kubepods-besteffort-pod<uid>.slice/...``): the pod's folder is found wherever it is in it."""
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        for part in reversed(path.split("/")):
            m = _POD_DIR.match(part)
            if m:
                return m.group(1).replace("_", "-").lower()
    return None


def process_entry(proc_root: Path, pid: int) -> dict | None:
    """``{host_pid, ns_pid, pod_uid}`` of one host pid, or None when it is gone (or its /proc is unreadable)."""
    try:
        status = (proc_root / str(pid) / "status").read_text()
        cgroup = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    nspid = parse_nspid(status)
    if nspid is None or nspid[0] != pid:  # a /proc of another pid namespace: these are not NVML's pids
        return None
    return {"host_pid": pid, "ns_pid": nspid[-1], "pod_uid": pod_uid_from_cgroup(cgroup)}


def build_table(proc_root: Path, pids: Iterable[int]) -> tuple[list[dict], list[int]]:
    """The entries of the GPU's processes (NVML's host pids), sorted by host pid, and the pids not found in
    ``proc_root`` (gone meanwhile, or a /proc that is not the host's)."""
    entries, missing = [], []
    for pid in sorted(set(pids)):
        e = process_entry(proc_root, pid)
        if e is None:
            missing.append(pid)
        else:
            entries.append(e)
    return entries, missing


def document(gpu: str, entries: list[dict], now: float, interval_s: float) -> dict:
    """The file's content: ``time`` (Unix seconds) and ``interval_s`` let the reader tell a stale table."""
    return {"version": PIDS_FORMAT_VERSION, "gpu": gpu, "time": now, "interval_s": interval_s, "processes": entries}


def write_atomic(path: Path, doc: dict) -> None:
    """Write ``doc`` as JSON under a temporary name and rename it over ``path``: a reader sees the old table or the
    new one, never half a file. Mode FILE_MODE whatever the umask."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w") as fh:
            fd = -1
            json.dump(doc, fh, separators=(",", ":"))
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


class PidMapWriter:
    """Every ``interval_s``, per GPU: NVML's compute processes (``compute_pids(uuid)``: host pids, None when
    NVML cannot say) -> the table -> ``<runtime_root>/<uuid>/pids.json``."""

    def __init__(self, uuids: Iterable[str], compute_pids: Callable[[str], list[int] | None], runtime_root: Path,
                 interval_s: float = 1.0, proc_root: Path = Path("/proc"), clock: Callable[[], float] = time.time):
        self.uuids = list(uuids)
        self.compute_pids = compute_pids
        self.runtime_root, self.proc_root = runtime_root, proc_root
        self.interval_s, self.clock = interval_s, clock
        self._warned: set[str] = set()  # problems logged once, not every pass

    def step(self) -> None:
        for uuid in self.uuids:
            pids = self.compute_pids(uuid)
            if pids is None:
                self._once(f"nvml:{uuid}", "pid map: NVML lists no processes of %s: its %s is not updated", uuid,
                           PIDS_FILE)
                continue
            entries, missing = build_table(self.proc_root, pids)
            if missing and not entries:
                # NVML's pids are host pids: none of them here means this /proc is another pid namespace's
                self._once("hostpid", "pid map: NVML's processes %s are not in %s: does the pod run with hostPID?",
                           missing, self.proc_root)
            try:
                write_atomic(self.runtime_root / uuid / PIDS_FILE,
                             document(uuid, entries, self.clock(), self.interval_s))
            except OSError as e:
                self._once(f"write:{uuid}", "pid map: cannot write %s: %s", self.runtime_root / uuid / PIDS_FILE, e)

    def _once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def run(self, stop: threading.Event) -> None:
        log.info("pid map: %s of %d GPU(s) every %.1fs (from %s)", PIDS_FILE, len(self.uuids), self.interval_s,
                 self.proc_root)
        while not stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("pid map pass failed")
            stop.wait(self.interval_s)
