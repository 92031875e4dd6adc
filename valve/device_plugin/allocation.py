"""Which GPU slots are taken, and the preferred-allocation rule that puts an online/offline pair on one GPU.

Taken slots come from the kubelet PodResources API when its socket answers; otherwise from the plugin's own
record of Allocate calls, persisted as JSON in the state directory so a plugin restart keeps it. The record
never hears of a pod ending, so it forgets a slot when the kubelet offers that slot as available again in a
GetPreferredAllocation call for the same resource.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from valve.api.contract import ANN_WANT_GPU, OFFLINE, ONLINE, ROLES

STATE_DIR_MODE = 0o700

log = logging.getLogger(__name__)

def other(role: str) -> str:
    return OFFLINE if role == ONLINE else ONLINE


def preferred_allocation(
    role: str,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    taken: dict[str, set[str]],
    order: Sequence[str],
    wanted: Sequence[str] = (),
) -> list[str]:
    """Choose `size` devices from `available` (all of `must_include` first).

    Rank of a GPU for a request of `role`: -1 if a pending pod of this role on the node asks for it
    (`valve.io/want-gpu`, see `pending_wishes`) and this role's slot is free, 0 if the other role's slot is
    taken and this role's slot is free (completes a pair), 1 if both slots are free (a fresh GPU), 2 otherwise.
    Ties go to discovery order. The kubelet does not say which pod a request is for, so a wish is only sure
    to be the requester's when it is the only one on the node; the operator keeps it so.
    So on a node where pairs arrive online first, online takes an empty GPU and its offline partner joins it;
    if a lone offline arrived first, the next online joins it instead of splitting the pair.
    """
    pos = {u: i for i, u in enumerate(order)}
    mine, theirs = taken.get(role, set()), taken.get(other(role), set())

    wishes = set(wanted)

    def rank(u: str) -> tuple[int, int]:
        if u in wishes and u not in mine:
            r = -1
        elif u in theirs and u not in mine:
            r = 0
        elif u not in theirs and u not in mine:
            r = 1
        else:
            r = 2
        return r, pos.get(u, len(pos))

    chosen = list(dict.fromkeys(must_include))
    rest = sorted((u for u in dict.fromkeys(available) if u not in chosen), key=rank)
    return chosen + rest[: max(0, size - len(chosen))]


def pending_wishes(pods: Iterable[dict[str, Any]], resource: str, allocated: Iterable[tuple[str, str]] = ()) -> list[str]:
    """GPUs asked for (`valve.io/want-gpu`) by the node's pods that request `resource` and wait for it.

    `pods`: the node's pods from the API; `allocated`: (namespace, name) of pods PodResources already lists
    with devices (their wish is fulfilled or moot).
    """
    done = set(allocated)
    out = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        want = (meta.get("annotations") or {}).get(ANN_WANT_GPU)
        if not want or meta.get("deletionTimestamp") or status.get("phase", "Pending") != "Pending":
            continue
        if (meta.get("namespace"), meta.get("name")) in done:
            continue
        containers = (pod.get("spec") or {}).get("containers") or []
        if any(resource in {**((c.get("resources") or {}).get("limits") or {}),
                            **((c.get("resources") or {}).get("requests") or {})} for c in containers):
            out.append(want)
    return list(dict.fromkeys(out))


class AllocationRecord:
    """Slots handed out by Allocate, per role, persisted in `<state_dir>/allocations.json`."""

    FILE = "allocations.json"

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / self.FILE
        self._lock = threading.Lock()
        self._slots: dict[str, dict[str, float]] = {r: {} for r in ROLES}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            for role in ROLES:
                self._slots[role] = {str(k): float(v) for k, v in data.get(role, {}).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as e:
            log.warning("ignoring unreadable allocation record %s: %s", self.path, e)

    def _save(self) -> None:
        # root's alone (which pod holds which GPU): 0700 even when the chart's hostPath made it 0755
        self.path.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        if stat.S_IMODE(self.path.parent.stat().st_mode) != STATE_DIR_MODE:
            os.chmod(self.path.parent, STATE_DIR_MODE)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, **self._slots}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def taken(self) -> dict[str, set[str]]:
        with self._lock:
            return {r: set(s) for r, s in self._slots.items()}

    def add(self, role: str, uuids: Iterable[str]) -> None:
        with self._lock:
            now = time.time()
            for u in uuids:
                self._slots[role][u] = now
            self._save()

    def release(self, role: str, uuids: Iterable[str]) -> list[str]:
        """Forget slots the kubelet reports free; returns those forgotten."""
        with self._lock:
            gone = [u for u in uuids if u in self._slots[role]]
            for u in gone:
                del self._slots[role][u]
            if gone:
                self._save()
            return gone


class PodResourcesUnavailable(RuntimeError):
    pass


def list_pod_resources(socket: Path, timeout: float) -> Any:
    """One kubelet PodResources List call; raises PodResourcesUnavailable saying why."""
    from valve.device_plugin.proto import podresources_pb2 as pr
    from valve.device_plugin.proto import podresources_pb2_grpc as pr_grpc

    if not socket.exists():
        raise PodResourcesUnavailable(f"PodResources socket {socket} does not exist")
    try:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            return pr_grpc.PodResourcesListerStub(channel).List(pr.ListPodResourcesRequest(), timeout=timeout)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else e
        raise PodResourcesUnavailable(f"PodResources List at {socket} failed: {code}") from None


def pod_resources_taken(socket: Path, resources: dict[str, str], timeout: float = 1.0) -> dict[str, set[str]] | None:
    """Slots in use per role from the kubelet PodResources API (`resources`: resource name -> role).

    Returns None when the socket is absent or does not answer.
    """
    try:
        resp = list_pod_resources(socket, timeout)
    except PodResourcesUnavailable as e:
        log.debug("%s", e)
        return None
    taken: dict[str, set[str]] = {r: set() for r in ROLES}
    for pod in resp.pod_resources:
        for container in pod.containers:
            for dev in container.devices:
                role = resources.get(dev.resource_name)
                if role:
                    taken[role].update(dev.device_ids)
    return taken


class SlotTracker:
    """Taken slots: PodResources when reachable, else the persisted record (which is always kept up to date)."""

    def __init__(self, record: AllocationRecord, resources: dict[str, str], pod_resources_socket: Path | None) -> None:
        self.record = record
        self.resources = resources  # resource name -> role
        self.pod_resources_socket = pod_resources_socket
        self.last_source = "record"

    def taken(self) -> dict[str, set[str]]:
        if self.pod_resources_socket is not None:
            live = pod_resources_taken(self.pod_resources_socket, self.resources)
            if live is not None:
                self.last_source = "pod-resources"
                return live
        self.last_source = "record"
        return self.record.taken()

    def seen_available(self, role: str, available: Iterable[str]) -> None:
        self.record.release(role, available)

    def allocated(self, role: str, uuids: Iterable[str]) -> None:
        self.record.add(role, uuids)
