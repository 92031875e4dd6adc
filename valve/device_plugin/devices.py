"""The node's GPUs and their health, shared by the online and offline resources; waiters see changes at once."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from valve.device_plugin.backend import GpuInfo
from valve.device_plugin.health import HealthChange

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceState:
    gpu: GpuInfo
    healthy: bool
    reason: str = ""


class DeviceTable:
    def __init__(self, gpus: list[GpuInfo]) -> None:
        if len({g.uuid for g in gpus}) != len(gpus):
            raise ValueError("duplicate GPU UUIDs")
        self._gpus = {g.uuid: g for g in gpus}
        self._healthy = {g.uuid: True for g in gpus}
        self._reason = {g.uuid: "" for g in gpus}
        self._version = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def uuids(self) -> list[str]:
        return list(self._gpus)

    def gpu(self, uuid: str) -> GpuInfo | None:
        return self._gpus.get(uuid)

    def is_healthy(self, uuid: str) -> bool:
        with self._cond:
            return self._healthy.get(uuid, False)

    def apply(self, change: HealthChange) -> list[str]:
        """Apply a health change (uuid None: every GPU); returns the UUIDs whose health changed."""
        targets = self.uuids if change.uuid is None else [change.uuid]
        changed = []
        with self._cond:
            for uuid in targets:
                if uuid not in self._healthy:
                    log.info("health event for unknown GPU %s ignored", uuid)
                    continue
                if self._healthy[uuid] != change.healthy:
                    self._healthy[uuid] = change.healthy
                    self._reason[uuid] = change.reason
                    changed.append(uuid)
            if changed:
                self._version += 1
                self._cond.notify_all()
        for uuid in changed:
            log.warning("GPU %s is now %s (%s)", uuid, "healthy" if change.healthy else "unhealthy", change.reason)
        return changed

    def snapshot(self) -> tuple[int, list[DeviceState]]:
        with self._cond:
            return self._version, [DeviceState(g, self._healthy[u], self._reason[u]) for u, g in self._gpus.items()]

    def wait_change(self, seen_version: int, timeout: float) -> bool:
        """Wait until the version differs from `seen_version`; False on timeout or when closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen_version or self._closed, timeout)
            return self._version != seen_version and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
