"""Serving the two resources on unix sockets, registering with the kubelet, and re-registering after a
kubelet restart (kubelet.sock recreated) or the loss of our sockets."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from valve.api.contract import plugin_socket
from valve.device_plugin.allocation import AllocationRecord, SlotTracker
from valve.device_plugin.annotate import Annotator, PodClient, wishes_from_api
from valve.device_plugin.api import UNIX_PATH_MAX, VERSION, pb, pb_grpc
from valve.device_plugin.backend import Backend
from valve.device_plugin.config import PluginConfig
from valve.device_plugin.devices import DeviceTable
from valve.device_plugin.health import DeviceEvent, health_change
from valve.device_plugin.metrics import PluginMetrics
from valve.device_plugin.pidmap import PidMapWriter
from valve.device_plugin.service import MAX_STREAMS, UNARY_WORKERS, DevicePluginService, ensure_runtime_dir

log = logging.getLogger(__name__)


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """Identifies one incarnation of a file: a recreated socket differs even if the inode number is reused."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


SKIP_REASONS = {"mig": "MIG mode is enabled (its instances need MIG-aware allocation; disable MIG to use it "
                       "with Valve)"}


class InitError(RuntimeError):
    """Nothing to advertise (no GPU found, or every GPU skipped): `--fail-on-init-error` decides what follows."""


def run_idle(config: PluginConfig, reason: str, stop: threading.Event, metrics: PluginMetrics | None = None) -> None:
    """`--no-fail-on-init-error`: stay up without registering (a DaemonSet pod that exits would crash-loop)
    and say why, in the log and a metric, until stopped."""
    metrics = metrics or PluginMetrics()
    metrics.init_error.set(1)
    log.error("not advertising any GPU: %s", reason)
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port, config.metrics_addr)
    try:
        stop.wait()
    finally:
        metrics.close()


# The kubelet (root, like the plugin) is the sockets' one client: no other user of the node may call Allocate or
# watch the devices. Owner read/write only (a socket's x bits mean nothing: this is 0700's equivalent).
SOCKET_MODE = 0o600
_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def _owner_only_files():
    """umask 077 while gRPC creates a socket, so it is never open to others, not even until the chmod after it.
    The umask is the process's: the lock keeps two servers from restoring each other's; any other file made
    meanwhile is only narrower, and those the plugin shares (the runtime dirs) get explicit modes."""
    with _UMASK_LOCK:
        old = os.umask(0o077)
        try:
            yield
        finally:
            os.umask(old)


def serve_unix(socket_path: Path, add: Callable[[grpc.Server], None], workers: int, name: str) -> grpc.Server:
    """A started gRPC server on a fresh unix socket at `socket_path` (one left by an earlier run is replaced),
    readable and writable by its owner only. `add` puts the services on the server."""
    if len(str(socket_path).encode()) > UNIX_PATH_MAX:
        raise ValueError(f"socket path longer than {UNIX_PATH_MAX} bytes: {socket_path}")
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name))
    add(server)
    with _owner_only_files():
        server.add_insecure_port(f"unix://{socket_path}")
        server.start()
    os.chmod(socket_path, SOCKET_MODE)  # whatever gRPC did with the umask
    return server


def supervise(stop: threading.Event, interval_s: float, step: Callable[[], None], what: str) -> None:
    """Run `step` every `interval_s` until `stop`; a step that fails is logged and the next one still runs."""
    while not stop.is_set():
        try:
            step()
        except Exception:
            log.exception("%s failed", what)
        stop.wait(interval_s)


class PluginServer:
    """One resource's gRPC server on `<device_plugin_dir>/<endpoint>`."""

    def __init__(self, service: DevicePluginService, socket_path: Path) -> None:
        if len(str(socket_path).encode()) > UNIX_PATH_MAX:
            raise ValueError(f"socket path longer than {UNIX_PATH_MAX} bytes: {socket_path}")
        self.service = service
        self.socket_path = socket_path
        self._server: grpc.Server | None = None

    def start(self) -> None:
        workers = MAX_STREAMS + UNARY_WORKERS  # streams are capped at MAX_STREAMS: unary calls always get a thread
        self._server = serve_unix(self.socket_path, lambda s: pb_grpc.add_DevicePluginServicer_to_server(
            self.service, s), workers, f"dp-{self.service.role}")
        log.info("serving %s on %s", self.service.resource, self.socket_path)

    def stop(self, grace: float = 0.2) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    def register(self, kubelet_socket: Path, timeout: float = 5.0) -> None:
        req = pb.RegisterRequest(
            version=VERSION,
            endpoint=self.socket_path.name,
            resource_name=self.service.resource,
            options=self.service.options(),
        )
        with grpc.insecure_channel(f"unix://{kubelet_socket}") as channel:
            pb_grpc.RegistrationStub(channel).Register(req, timeout=timeout)
        log.info("registered %s with the kubelet at %s", self.service.resource, kubelet_socket)


class DevicePlugin:
    """Discovers GPUs, serves the online and offline resources and keeps them registered and healthy."""

    def __init__(self, config: PluginConfig, backend: Backend, metrics: PluginMetrics | None = None,
                 pods: Any = None) -> None:
        self.config = config
        self.pods = pods  # the annotator's API access (default: PodClient from in-cluster config)
        self.annotator: Annotator | None = None
        self.pid_map: PidMapWriter | None = None
        self.backend = backend
        self.metrics = metrics or PluginMetrics()
        self.table: DeviceTable | None = None
        self.services: dict[str, DevicePluginService] = {}
        self.servers: list[PluginServer] = []
        self.registrations = 0  # successful registration rounds (both resources)
        self._rounds = threading.Condition()
        self._registered_to: tuple[int, int, int] | None = None
        self._restart_needed = False
        self._next_try = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # Lifecycle.
    def start(self) -> None:
        cfg = self.config
        gpus = self.backend.discover()
        skipped: dict[str, str] = dict(getattr(self.backend, "skipped", {}))
        for uuid, reason in skipped.items():
            log.warning("GPU %s not advertised: %s", uuid, SKIP_REASONS.get(reason, reason))
        for reason in {"mig", *skipped.values()}:
            self.metrics.skipped.labels(reason).set(sum(r == reason for r in skipped.values()))
        self.metrics.init_error.set(0)
        if not gpus:
            also = f" to advertise ({len(skipped)} skipped: {', '.join(sorted(set(skipped.values())))})" if skipped else ""
            raise InitError(f"the {self.backend.name} backend found no GPUs{also}")
        self.table = DeviceTable(gpus)
        for g in gpus:
            ensure_runtime_dir(cfg.runtime_root, g.uuid, cfg.runtime_dir_mode)
            log.info("GPU %d %s %s, %d MiB, PCI %s, NUMA %s", g.index, g.uuid, g.name, g.memory_bytes >> 20,
                     g.pci_bus_id, g.numa_node)
        resources = {res: role for role, res in cfg.roles.items()}
        slots = SlotTracker(AllocationRecord(cfg.state_dir), resources, cfg.pod_resources_socket)
        self.annotator = self._make_annotator(resources)
        kick = self.annotator.kick if self.annotator is not None else None
        wishes = None
        if (self.annotator is not None and cfg.node_name and cfg.pod_resources_socket is not None
                and hasattr(self.annotator.pods, "list_node")):
            wishes = wishes_from_api(self.annotator.pods, cfg.node_name, cfg.pod_resources_socket, resources)
        for role, resource in cfg.roles.items():
            svc = DevicePluginService(role, resource, self.table, slots, cfg.runtime_root, cfg.runtime_dir_mode,
                                      self.metrics, on_allocate=kick, wishes=wishes)
            self.services[role] = svc
            self.servers.append(PluginServer(svc, cfg.device_plugin_dir / plugin_socket(resource)))
            self.metrics.devices.labels(resource).set(len(gpus))
            self.metrics.allocations.labels(resource)  # export 0 before the first allocation
            self.metrics.registered.labels(resource).set(0)
        self._publish_health()
        if cfg.metrics_port is not None:
            self.metrics.serve(cfg.metrics_port, cfg.metrics_addr)
        for s in self.servers:
            s.start()
        self._spawn("health", self._watch_health)
        self._spawn("kubelet-watch", self._supervise)
        if cfg.metrics_port is not None:
            self._spawn("usage", self._poll_usage)
        if self.annotator is not None:
            self._spawn("annotate", self.annotator.run)
        if cfg.pid_map:
            writer = self.pid_map = PidMapWriter(self.table.uuids, self.backend.compute_pids, cfg.runtime_root,
                                                 cfg.pid_map_interval_s, cfg.proc_root)
            self._spawn("pid-map", lambda: writer.run(self._stop))

    def _make_annotator(self, resources: dict[str, str]) -> Annotator | None:
        cfg = self.config
        if not cfg.annotate:
            log.info("pod annotation off: the operator and sidecars will not learn the pods' GPUs from this plugin")
            return None
        if cfg.pod_resources_socket is None:
            log.warning("pod annotation needs the PodResources socket (--pod-resources-socket): off")
            return None
        return Annotator(cfg.pod_resources_socket, resources, self.pods or PodClient(), node_name=cfg.node_name,
                         interval_s=cfg.annotate_interval_s)

    def stop(self) -> None:
        self._stop.set()
        # The supervisor first: a tick that saw our sockets vanish mid-stop would start the servers again.
        for t in self._threads:
            if t.name == "device-plugin-kubelet-watch":
                t.join(timeout=10.0)
        if self.annotator is not None:
            self.annotator.stop()
        for svc in self.services.values():
            svc.stopped.set()
        if self.table is not None:
            self.table.close()
        for s in self.servers:
            s.stop()
        for t in self._threads:
            t.join(timeout=5.0)
        self.backend.close()
        self.metrics.close()
        log.info("device plugin stopped; sockets removed")

    def _spawn(self, name: str, target) -> None:
        t = threading.Thread(target=target, name=f"device-plugin-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    # Health.
    def _watch_health(self) -> None:
        try:
            self.backend.watch(self._stop, self.on_event)
        except Exception:
            log.exception("health watch failed; marking all GPUs unhealthy")
            self.on_event(DeviceEvent("lost", None, detail="health watch failed"))

    def on_event(self, event: DeviceEvent) -> list[str]:
        change = health_change(event, self.config.xid_policy)
        if change is None:
            log.info("ignored %s event (XID %d) on %s", event.kind, event.xid, event.uuid)
            return []
        assert self.table is not None
        changed = self.table.apply(change)
        if changed:
            self._publish_health()
        return changed

    def _publish_health(self) -> None:
        assert self.table is not None
        _, states = self.table.snapshot()
        for resource in self.config.roles.values():
            for s in states:
                self.metrics.healthy.labels(s.gpu.uuid, resource).set(1 if s.healthy else 0)

    def update_usage(self) -> None:
        assert self.table is not None
        for uuid in self.table.uuids:
            u = self.backend.usage(uuid)
            if u is not None:
                self.metrics.utilization.labels(uuid).set(u.utilization_ratio)
                self.metrics.memory_used.labels(uuid).set(u.memory_used_bytes)

    def _poll_usage(self) -> None:
        while not self._stop.is_set():
            self.update_usage()
            self._stop.wait(self.config.metrics_interval_s)

    # Registration.
    def _supervise(self) -> None:
        supervise(self._stop, self.config.watch_interval_s, self.tick, "kubelet watch step")

    def tick(self) -> None:
        """One step: (re)start servers and (re)register if kubelet.sock is new or our sockets vanished."""
        kid = file_identity(self.config.kubelet_socket)
        if kid is None:
            if self._registered_to is not None:
                log.warning("kubelet.sock is gone; waiting for the kubelet to come back")
                self._set_registered(False)
                self._registered_to = None
                self._restart_needed = True
            return
        sockets_ok = all(s.socket_path.exists() for s in self.servers)
        if kid == self._registered_to and sockets_ok:
            return
        if time.monotonic() < self._next_try:
            return
        if self._registered_to is not None or not sockets_ok:
            self._restart_needed = True
        if self._restart_needed:
            log.info("kubelet restarted or our sockets vanished: restarting the plugin servers")
            for s in self.servers:
                s.stop()
                s.start()
            self._restart_needed = False
        try:
            for s in self.servers:
                s.register(self.config.kubelet_socket)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            log.warning("registration with the kubelet failed (%s): retrying in %.1fs", code, self.config.register_retry_s)
            self._registered_to = None
            self._set_registered(False)
            self._next_try = time.monotonic() + self.config.register_retry_s
            return
        self._registered_to = kid
        self._set_registered(True)
        with self._rounds:
            self.registrations += 1
            self._rounds.notify_all()

    def _set_registered(self, on: bool) -> None:
        for s in self.servers:
            self.metrics.registered.labels(s.service.resource).set(1 if on else 0)

    def wait_registrations(self, rounds: int, timeout: float = 10.0) -> None:
        """Until `rounds` registration rounds have completed. The kubelet records a Register before the
        plugin sees the reply, so the kubelet's count runs ahead of the plugin's."""
        with self._rounds:
            if not self._rounds.wait_for(lambda: self.registrations >= rounds, timeout):
                raise TimeoutError(f"{self.registrations} registration rounds after {timeout}s, wanted {rounds}")

    @property
    def registered(self) -> bool:
        return self._registered_to is not None
