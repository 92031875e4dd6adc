"""The DevicePlugin gRPC service for one resource (online or offline slots of every GPU)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc

from valve.api.contract import ENV_GPU_UUID, ENV_ROLE, ENV_RUNTIME_DIR
from valve.device_plugin.allocation import SlotTracker, preferred_allocation
from valve.device_plugin.api import HEALTHY, UNHEALTHY, pb, pb_grpc
from valve.device_plugin.devices import DeviceState, DeviceTable
from valve.device_plugin.metrics import PluginMetrics

log = logging.getLogger(__name__)
# Each ListAndWatch stream holds a server thread for its life: streams are capped and the pool has room for unary
# calls on top (server.py), so extra streams cannot starve Allocate. The kubelet keeps one stream per resource.
MAX_STREAMS = 16
UNARY_WORKERS = 8


class RequestError(ValueError):
    """A request the plugin rejects with INVALID_ARGUMENT."""


class UnhealthyError(RuntimeError):
    """Allocate asked for a device that is Unhealthy (FAILED_PRECONDITION)."""


def ensure_runtime_dir(root: Path, uuid: str, mode: int = 0o700) -> Path:
    """Create `<root>/<uuid>` with `mode` (whatever the umask); the root itself stays world-traversable."""
    if not root.is_dir():  # one made here is 0755 whatever the umask; an existing one keeps the admin's mode
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(root, 0o755)
    path = root / uuid
    path.mkdir(mode=mode, exist_ok=True)
    os.chmod(path, mode)
    return path


def device_message(state: DeviceState) -> pb.Device:
    topology = None
    if state.gpu.numa_node is not None:
        topology = pb.TopologyInfo(nodes=[pb.NUMANode(ID=state.gpu.numa_node)])
    return pb.Device(ID=state.gpu.uuid, health=HEALTHY if state.healthy else UNHEALTHY, topology=topology)


def check_known(ids: Sequence[str], table: DeviceTable, resource: str, what: str) -> None:
    unknown = [i for i in ids if table.gpu(i) is None]
    if unknown:
        raise RequestError(
            f"{what}: unknown device ID(s) {', '.join(map(repr, unknown))} for {resource}; "
            f"this node advertises {', '.join(table.uuids)}"
        )


def allocation_env(role: str, uuids: Sequence[str], runtime_root: Path) -> dict[str, str]:
    """The env a container of this role gets with these GPUs (the DRA driver's CDI specs set the same)."""
    joined = ",".join(uuids)
    return {
        "NVIDIA_VISIBLE_DEVICES": joined,
        "CUDA_VISIBLE_DEVICES": joined,
        ENV_GPU_UUID: joined,
        ENV_ROLE: role,
        ENV_RUNTIME_DIR: str(runtime_root),
    }


def container_allocation(role: str, uuids: Sequence[str], runtime_root: Path) -> pb.ContainerAllocateResponse:
    """Env and mounts for a container given these GPUs in this role."""
    envs = allocation_env(role, uuids, runtime_root)
    mounts = [pb.Mount(container_path=str(runtime_root / u), host_path=str(runtime_root / u)) for u in uuids]
    return pb.ContainerAllocateResponse(envs=envs, mounts=mounts)


class DevicePluginService(pb_grpc.DevicePluginServicer):
    def __init__(
        self,
        role: str,
        resource: str,
        table: DeviceTable,
        slots: SlotTracker,
        runtime_root: Path,
        runtime_dir_mode: int = 0o700,
        metrics: PluginMetrics | None = None,
        on_allocate: Callable[[], None] | None = None,
        wishes: Callable[[str], list[str]] | None = None,
    ) -> None:
        self.role = role
        self.resource = resource
        self.table = table
        self.slots = slots
        self.runtime_root = runtime_root
        self.runtime_dir_mode = runtime_dir_mode
        self.metrics = metrics
        self.on_allocate = on_allocate  # e.g. the pod annotator's kick
        self.wishes = wishes  # resource -> GPUs the node's pending pods ask for (None: no API access)
        self.stopped = threading.Event()
        self.streams = 0  # ListAndWatch streams being served
        self._streams_lock = threading.Lock()

    def admit_stream(self) -> bool:
        """Take a stream place; False when MAX_STREAMS are open (the caller refuses the stream)."""
        with self._streams_lock:
            if self.streams >= MAX_STREAMS:
                return False
            self.streams += 1
            return True

    def leave_stream(self) -> None:
        with self._streams_lock:
            self.streams -= 1

    # Plain functions the handlers call (tested directly too).
    def options(self) -> pb.DevicePluginOptions:
        return pb.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    def device_list(self) -> pb.ListAndWatchResponse:
        _, states = self.table.snapshot()
        return pb.ListAndWatchResponse(devices=[device_message(s) for s in states])

    def preferred(self, request: pb.PreferredAllocationRequest) -> pb.PreferredAllocationResponse:
        if not request.container_requests:
            raise RequestError("GetPreferredAllocation: no container requests")
        out = pb.PreferredAllocationResponse()
        for i, req in enumerate(request.container_requests):
            available, must, size = list(req.available_deviceIDs), list(req.must_include_deviceIDs), req.allocation_size
            what = f"GetPreferredAllocation container {i}"
            check_known(available + must, self.table, self.resource, what)
            if size < 1 or size > len(available):
                raise RequestError(f"{what}: allocation_size {size} must be between 1 and {len(available)} (available)")
            if not set(must) <= set(available):
                raise RequestError(f"{what}: must_include_deviceIDs are not all in available_deviceIDs")
            if len(set(must)) > size:
                raise RequestError(f"{what}: {len(set(must))} must_include_deviceIDs exceed allocation_size {size}")
            self.slots.seen_available(self.role, available)
            wanted = self._wishes()
            chosen = preferred_allocation(self.role, available, must, size, self.slots.taken(), self.table.uuids,
                                          wanted=wanted)
            log.info("%s preferred %s from %d available (taken by %s)", self.resource, chosen, len(available),
                     self.slots.last_source)
            out.container_responses.append(pb.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return out

    def _wishes(self) -> list[str]:
        if self.wishes is None:
            return []
        try:
            return self.wishes(self.resource)
        except Exception as e:  # noqa: BLE001 - without the API, fall back to the slot rule alone
            log.warning("could not read the pending pods' GPU wishes: %s", e)
            return []

    def allocate(self, request: pb.AllocateRequest) -> pb.AllocateResponse:
        if not request.container_requests:
            raise RequestError("Allocate: no container requests")
        for i, req in enumerate(request.container_requests):
            if not req.devices_ids:
                raise RequestError(f"Allocate container {i}: no device IDs")
            check_known(list(req.devices_ids), self.table, self.resource, f"Allocate container {i}")
        out = pb.AllocateResponse()
        for i, req in enumerate(request.container_requests):
            uuids = list(dict.fromkeys(req.devices_ids))
            sick = [u for u in uuids if not self.table.is_healthy(u)]
            if sick:
                raise UnhealthyError(f"Allocate container {i}: device(s) {', '.join(sick)} are unhealthy")
            for u in uuids:
                ensure_runtime_dir(self.runtime_root, u, self.runtime_dir_mode)
            out.container_responses.append(container_allocation(self.role, uuids, self.runtime_root))
            self.slots.allocated(self.role, uuids)
            if self.metrics:
                self.metrics.allocations.labels(self.resource).inc()
            log.info("%s allocated %s", self.resource, uuids)
        if self.on_allocate is not None:
            self.on_allocate()
        return out

    # gRPC handlers.
    def GetDevicePluginOptions(self, request, context):
        return self.options()

    def ListAndWatch(self, request, context) -> Iterator[pb.ListAndWatchResponse]:
        if not self.admit_stream():
            msg = (f"{self.resource}: {MAX_STREAMS} ListAndWatch streams are open already (the kubelet needs one); "
                   "refusing another so that Allocate keeps a thread")
            log.warning("%s", msg)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, msg)
        try:
            seen = None
            while not self.stopped.is_set() and context.is_active() and not self.table.closed:
                version, states = self.table.snapshot()
                if version != seen:
                    seen = version
                    yield pb.ListAndWatchResponse(devices=[device_message(s) for s in states])
                self.table.wait_change(seen, 0.25)
        finally:
            self.leave_stream()

    def GetPreferredAllocation(self, request, context):
        return self._guard(self.preferred, request, context)

    def Allocate(self, request, context):
        return self._guard(self.allocate, request, context)

    def PreStartContainer(self, request, context):
        return pb.PreStartContainerResponse()

    def _guard(self, fn, request, context):
        try:
            return fn(request)
        except UnhealthyError as e:
            log.warning("%s", e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except RequestError as e:
            log.warning("%s", e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
