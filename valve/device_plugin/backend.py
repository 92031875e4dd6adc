"""GPU backends: what the plugin needs from NVML, and a simulated node with the same interface."""

from __future__ import annotations

import queue
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from valve.device_plugin.health import DeviceEvent

Emit = Callable[[DeviceEvent], None]


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_bytes: int
    pci_bus_id: str
    numa_node: int | None  # None: the platform reports no NUMA affinity


@dataclass(frozen=True)
class GpuUsage:
    utilization_ratio: float  # 0..1
    memory_used_bytes: int


class Backend(Protocol):
    name: str

    def discover(self) -> list[GpuInfo]:
        """The GPUs on this node, in a stable order."""
        ...

    def watch(self, stop: threading.Event, emit: Emit) -> None:
        """Block until `stop` is set, passing XID, device-loss and health events to `emit`."""
        ...

    def usage(self, uuid: str) -> GpuUsage | None:
        """Current utilization and used memory, or None if unknown."""
        ...

    def compute_pids(self, uuid: str) -> list[int] | None:
        """Host pids of the processes computing on the GPU (the pid map's input), or None if unknown."""
        ...

    def close(self) -> None: ...


SIM_NAMESPACE = uuidlib.UUID("5d0c7f3e-2a51-4b8e-9b51-6c2f0d7a9e10")


def sim_uuid(node: str, index: int) -> str:
    """A stable fake GPU UUID in NVML's format: the same node name and index always give the same one."""
    return "GPU-" + str(uuidlib.uuid5(SIM_NAMESPACE, f"{node}/{index}"))


class SimBackend:
    """N virtual GPUs with stable UUIDs; tests set health, inject XIDs and device loss, and set usage."""

    name = "sim"

    def __init__(
        self,
        count: int = 4,
        node: str = "sim-node",
        memory_bytes: int = 80 * 1024**3,
        numa_nodes: int = 2,
        gpu_name: str = "Valve Simulated GPU",
        mig: Iterable[int] = (),
    ) -> None:
        if count < 1:
            raise ValueError("the simulated backend needs at least one GPU")
        mig = set(mig)
        if not mig <= set(range(count)):
            raise ValueError(f"MIG GPU indexes {sorted(mig - set(range(count)))} out of 0..{count - 1}")
        per_numa = max(1, -(-count // max(1, numa_nodes)))
        self._gpus = [
            GpuInfo(
                index=i,
                uuid=sim_uuid(node, i),
                name=gpu_name,
                memory_bytes=memory_bytes,
                pci_bus_id=f"00000000:{0x10 + i:02X}:00.0",
                numa_node=(i // per_numa) if numa_nodes > 0 else None,
            )
            for i in range(count)
        ]
        # MIG-enabled GPUs are found and skipped, as the NVML backend does.
        self.skipped = {g.uuid: "mig" for g in self._gpus if g.index in mig}
        self._gpus = [g for g in self._gpus if g.uuid not in self.skipped]
        self._events: queue.Queue[DeviceEvent] = queue.Queue()
        self._usage: dict[str, GpuUsage] = {g.uuid: GpuUsage(0.0, 0) for g in self._gpus}
        self._pids: dict[str, list[int]] = {g.uuid: [] for g in self._gpus}

    def discover(self) -> list[GpuInfo]:
        return list(self._gpus)

    def driver_version(self) -> str | None:
        return "sim"

    @property
    def uuids(self) -> list[str]:
        return [g.uuid for g in self._gpus]

    # Test and demo controls.
    def inject_xid(self, uuid: str, xid: int) -> None:
        self._events.put(DeviceEvent("xid", self._known(uuid), xid=xid, detail=f"simulated XID {xid}"))

    def lose(self, uuid: str) -> None:
        self._events.put(DeviceEvent("lost", self._known(uuid), detail="simulated device loss"))

    def set_health(self, uuid: str, healthy: bool) -> None:
        self._events.put(DeviceEvent("health", self._known(uuid), healthy=healthy, detail="simulated"))

    def set_usage(self, uuid: str, utilization_ratio: float, memory_used_bytes: int) -> None:
        self._usage[self._known(uuid)] = GpuUsage(utilization_ratio, memory_used_bytes)

    def set_processes(self, uuid: str, pids: Iterable[int]) -> None:
        self._pids[self._known(uuid)] = list(pids)

    def _known(self, uuid: str) -> str:
        if uuid not in self._usage:
            raise KeyError(f"no simulated GPU {uuid}")
        return uuid

    # Backend interface.
    def watch(self, stop: threading.Event, emit: Emit) -> None:
        while not stop.is_set():
            try:
                event = self._events.get(timeout=0.05)
            except queue.Empty:
                continue
            emit(event)

    def usage(self, uuid: str) -> GpuUsage | None:
        return self._usage.get(uuid)

    def compute_pids(self, uuid: str) -> list[int] | None:
        return list(self._pids[uuid]) if uuid in self._pids else None

    def close(self) -> None:
        pass
