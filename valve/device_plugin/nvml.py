"""NVML backend: discovery, XID/device-loss watch and usage through `pynvml` (nvidia-ml-py), imported lazily."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from valve.device_plugin.backend import Emit, GpuInfo, GpuUsage
from valve.device_plugin.health import DeviceEvent

log = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def sysfs_pci_address(bus_id: str) -> str:
    """NVML's "00000000:19:00.0" as sysfs names it: "0000:19:00.0"."""
    domain, rest = bus_id.split(":", 1)
    return f"{int(domain, 16):04x}:{rest.lower()}"


def numa_from_sysfs(bus_id: str, sys_root: Path = Path("/sys")) -> int | None:
    path = sys_root / "bus/pci/devices" / sysfs_pci_address(bus_id) / "numa_node"
    try:
        node = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


class NvmlBackend:
    """Real GPUs through NVML. `nvml` may be given (a module with pynvml's API) for tests."""

    name = "nvml"

    def __init__(self, nvml: Any = None, loss_poll_s: float = 5.0, wait_ms: int = 1000) -> None:
        if nvml is None:
            import pynvml as nvml
        self.nv = nvml
        self.loss_poll_s = loss_poll_s
        self.wait_ms = wait_ms
        self.nv.nvmlInit()
        self._handles: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}  # uuid -> reason, for GPUs found but not advertised

    def discover(self) -> list[GpuInfo]:
        nv = self.nv
        gpus = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(nv.nvmlDeviceGetUUID(h))
            if self._mig_enabled(h):
                # A MIG GPU's work runs in its instances, which need MIG-aware allocation: advertising the
                # whole GPU would hand tenants a device they cannot use as one.
                self.skipped[uuid] = "mig"  # the plugin logs it
                continue
            bus_id = _text(nv.nvmlDeviceGetPciInfo(h).busId)
            self._handles[uuid] = h
            gpus.append(
                GpuInfo(
                    index=i,
                    uuid=uuid,
                    name=_text(nv.nvmlDeviceGetName(h)),
                    memory_bytes=int(nv.nvmlDeviceGetMemoryInfo(h).total),
                    pci_bus_id=bus_id,
                    numa_node=self._numa_node(h, bus_id),
                )
            )
        return gpus

    def driver_version(self) -> str | None:
        """The NVIDIA driver's version (e.g. 580.159.04), for the DRA driver's device attributes."""
        try:
            return _text(self.nv.nvmlSystemGetDriverVersion())
        except Exception:  # an attribute, not a reason to fail
            return None

    def _mig_enabled(self, handle: Any) -> bool:
        nv = self.nv
        try:
            current, _pending = nv.nvmlDeviceGetMigMode(handle)
        except AttributeError:  # bindings older than MIG
            return False
        except nv.NVMLError as e:
            if getattr(e, "value", None) != nv.NVML_ERROR_NOT_SUPPORTED:  # NOT_SUPPORTED: a GPU without MIG
                log.warning("MIG mode of a GPU unreadable (%s): taken as disabled", e)
            return False
        return int(current) == int(getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1))

    def _numa_node(self, handle: Any, bus_id: str) -> int | None:
        try:
            node = int(self.nv.nvmlDeviceGetNumaNodeId(handle))
            if node >= 0:
                return node
        except Exception as e:  # older drivers or bindings lack it
            log.debug("nvmlDeviceGetNumaNodeId failed (%s); reading sysfs", e)
        return numa_from_sysfs(bus_id)

    def _handle(self, uuid: str) -> Any:
        if uuid not in self._handles:
            self._handles[uuid] = self.nv.nvmlDeviceGetHandleByUUID(uuid)
        return self._handles[uuid]

    def _register_events(self) -> Any:
        """An event set with XID events registered for every GPU that supports them, or None."""
        nv = self.nv
        event_set = nv.nvmlEventSetCreate()
        registered = 0
        for uuid, h in self._handles.items():
            try:
                supported = nv.nvmlDeviceGetSupportedEventTypes(h)
                mask = nv.nvmlEventTypeXidCriticalError & supported
                if not mask:
                    log.warning("GPU %s reports no XID events; only device loss is watched", uuid)
                    continue
                nv.nvmlDeviceRegisterEvents(h, mask, event_set)
                registered += 1
            except nv.NVMLError as e:
                if getattr(e, "value", None) == nv.NVML_ERROR_NOT_SUPPORTED:
                    log.warning("GPU %s does not support XID events; only device loss is watched", uuid)
                    continue
                raise
        if registered:
            return event_set
        nv.nvmlEventSetFree(event_set)
        return None

    def watch(self, stop: threading.Event, emit: Emit) -> None:
        nv = self.nv
        try:
            event_set = self._register_events()
        except nv.NVMLError as e:
            log.error("registering NVML events failed: %s; marking all GPUs unhealthy", e)
            emit(DeviceEvent("lost", None, detail=f"NVML event registration failed: {e}"))
            event_set = None
        lost: set[str] = set()
        next_poll = 0.0
        try:
            while not stop.is_set():
                if time.monotonic() >= next_poll:
                    self._poll_loss(lost, emit)
                    next_poll = time.monotonic() + self.loss_poll_s
                if event_set is None:
                    stop.wait(min(1.0, self.loss_poll_s))
                    continue
                self._wait_event(event_set, emit, stop)
        finally:
            if event_set is not None:
                nv.nvmlEventSetFree(event_set)

    def _wait_event(self, event_set: Any, emit: Emit, stop: threading.Event) -> None:
        nv = self.nv
        try:
            data = nv.nvmlEventSetWait_v2(event_set, self.wait_ms)
        except nv.NVMLError as e:
            if getattr(e, "value", None) == nv.NVML_ERROR_TIMEOUT:
                return
            log.error("waiting for NVML events failed: %s; marking all GPUs unhealthy", e)
            emit(DeviceEvent("lost", None, detail=f"NVML event wait failed: {e}"))
            stop.wait(1.0)
            return
        if not data.eventType & nv.nvmlEventTypeXidCriticalError:
            return
        try:
            uuid = _text(nv.nvmlDeviceGetUUID(data.device))
        except nv.NVMLError as e:
            log.error("XID %d on a GPU whose UUID NVML cannot give (%s): marking all unhealthy", data.eventData, e)
            emit(DeviceEvent("xid", None, xid=int(data.eventData)))
            return
        log.warning("XID %d on %s", data.eventData, uuid)
        emit(DeviceEvent("xid", uuid, xid=int(data.eventData)))

    def _poll_loss(self, lost: set[str], emit: Emit) -> None:
        nv = self.nv
        for uuid, h in list(self._handles.items()):
            if uuid in lost:
                continue
            try:
                nv.nvmlDeviceGetMemoryInfo(h)
            except nv.NVMLError as e:
                if getattr(e, "value", None) == nv.NVML_ERROR_GPU_IS_LOST:
                    lost.add(uuid)
                    log.error("GPU %s is lost", uuid)
                    emit(DeviceEvent("lost", uuid, detail="NVML: GPU is lost"))

    def usage(self, uuid: str) -> GpuUsage | None:
        nv = self.nv
        try:
            h = self._handle(uuid)
            util = nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
            used = int(nv.nvmlDeviceGetMemoryInfo(h).used)
        except nv.NVMLError as e:
            log.debug("usage of %s unavailable: %s", uuid, e)
            return None
        return GpuUsage(util, used)

    def compute_pids(self, uuid: str) -> list[int] | None:
        """Host pids of the GPU's compute processes (``nvmlDeviceGetComputeRunningProcesses``), None if unknown."""
        nv = self.nv
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(self._handle(uuid))
        except nv.NVMLError as e:
            log.debug("compute processes of %s unavailable: %s", uuid, e)
            return None
        return [int(p.pid) for p in procs]

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception as e:
            log.debug("nvmlShutdown: %s", e)
