"""The offline tenant's host pids, for NVML busy samples in a pod.

NVML names processes by host pid; the tenant publishes ``offline_pid`` from its own pid namespace (the offline
pod's). The device plugin's pid map (``--pid-map``, valve.device_plugin.pidmap) lists, per GPU, each compute
process's host pid, its pid in its own namespace and its pod's UID, in ``<gpu dir>/pids.json``
(valve.api.contract.PIDS_FILE). :class:`PidMap` is ``NvmlBusySampler``'s ``pids`` hook: the entries of this pod
(its UID from the downward API, valve.api.contract.ENV_POD_UID) whose own pid is the published one.

A missing, stale or unreadable map falls back to the published pid itself (right on a bare machine, where there
is one pid namespace; inside a pod NVML then finds nothing) and says so in one log line, again only once it was
back and went again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from valve.api.contract import PIDS_FILE, PIDS_FORMAT_VERSION

log = logging.getLogger(__name__)

# A map older than this many of its own intervals (at least STALE_MIN_S) is stale: its writer stopped.
STALE_INTERVALS = 5
STALE_MIN_S = 5.0


def parse_pid_map(text: str) -> dict:
    """The map's document; ValueError naming what is wrong with it."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("version") != PIDS_FORMAT_VERSION:
        raise ValueError(f"not a version {PIDS_FORMAT_VERSION} pid map")
    procs, t, interval = doc.get("processes"), doc.get("time"), doc.get("interval_s")
    if not isinstance(procs, list) or not all(isinstance(p, dict) for p in procs):
        raise ValueError("no processes list")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (t, interval)):
        raise ValueError("no time or interval_s")
    return doc


def staleness(doc: dict, now: float) -> str | None:
    """Why the map is too old to trust at ``now`` (Unix seconds), or None."""
    age = now - float(doc["time"])
    limit = max(STALE_MIN_S, STALE_INTERVALS * float(doc["interval_s"]))
    return f"stale: written {age:.1f} s ago (its writer's interval {doc['interval_s']} s)" if age > limit else None


def host_pids(doc: dict, pod_uid: str, ns_pid: int) -> set[int]:
    """The host pids of this pod's processes whose own pid is ``ns_pid`` (empty: none of them is on the GPU)."""
    uid = pod_uid.lower()
    out = set()
    for p in doc["processes"]:
        try:
            if p.get("pod_uid") == uid and int(p["ns_pid"]) == ns_pid:
                out.add(int(p["host_pid"]))
        except (KeyError, TypeError, ValueError):
            continue
    return out


class PidMap:
    """``pids`` for ``NvmlBusySampler``: the published pid -> its host pids through the map at ``path``. The file
    is read again only when it changed (a stat per call)."""

    def __init__(self, path: Path, pod_uid: str, clock: Callable[[], float] = time.time) -> None:
        self.path, self.pod_uid, self.clock = path, pod_uid, clock
        self._key: tuple[int, int, int] | None = None
        self._doc: dict | None = None
        self._error: str | None = None
        self.fallback: str | None = None  # why the identity is used now (None: the map is)
        self._said = False  # the line for the current fallback was logged

    def _load(self) -> tuple[dict | None, str | None]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._key = None
            return None, "missing (is the device plugin's pid map on? chart value devicePlugin.pidMap.enabled)"
        except OSError as e:
            self._key = None
            return None, f"unreadable ({e.strerror})"
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            self._key = key
            try:
                self._doc, self._error = parse_pid_map(self.path.read_text()), None
            except (OSError, UnicodeDecodeError, ValueError) as e:
                self._doc, self._error = None, f"corrupt: {e}"
        return self._doc, self._error

    def __call__(self, pid: int) -> set[int]:
        if pid <= 0:
            return set()
        doc, problem = self._load()
        if doc is not None:
            problem = staleness(doc, self.clock())
        if problem is not None:
            if not self._said:
                log.warning("enforcement: pid map %s %s: NVML samples are matched to pid %d itself, which a pod's "
                            "pid namespace does not share with the host", self.path, problem, pid)
                self._said = True
            self.fallback = problem
            return {pid}
        assert doc is not None
        if self._said:
            log.info("enforcement: pid map %s is usable again", self.path)
            self._said = False
        self.fallback = None
        return host_pids(doc, self.pod_uid, pid)


def pid_mapping(gpu_dir: Path, pod_uid: str | None) -> PidMap | None:
    """The arbiter's mapping for the GPU folder ``gpu_dir``: None (the identity) without a pod UID (a bare machine)."""
    return PidMap(gpu_dir / PIDS_FILE, pod_uid) if pod_uid else None
