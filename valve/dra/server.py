"""The kubelet-facing side: the DRA service (v1 and v1beta1) and the plugin-registration service on unix sockets.

The kubelet's plugin watcher finds `<registry dir>/gpu.valve.io-reg.sock`, calls GetInfo (type DRAPlugin, our
name, the DRA socket, the service versions we serve) and then NotifyRegistrationStatus; it then calls
NodePrepareResources / NodeUnprepareResources on the DRA socket, in the newest version both sides speak.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from valve.api.dra import DRIVER
from valve.device_plugin.server import file_identity, serve_unix, supervise
from valve.dra.driver import ClaimError, ClaimRef, Driver, first_line
from valve.dra.metrics import DraMetrics
from valve.dra.proto import dra_v1_pb2, dra_v1_pb2_grpc, dra_v1beta1_pb2, dra_v1beta1_pb2_grpc
from valve.dra.proto import pluginregistration_pb2 as reg_pb
from valve.dra.proto import pluginregistration_pb2_grpc as reg_grpc

log = logging.getLogger(__name__)
PLUGIN_TYPE = "DRAPlugin"
# The kubelet picks one of these "<version>.DRAPlugin" service names (k8s.io/kubelet/pkg/apis/dra/*/types.go).
APIS: dict[str, tuple[ModuleType, ModuleType]] = {
    "v1": (dra_v1_pb2, dra_v1_pb2_grpc),
    "v1beta1": (dra_v1beta1_pb2, dra_v1beta1_pb2_grpc),
}
SUPPORTED_VERSIONS = [f"{v}.{PLUGIN_TYPE}" for v in APIS]
REGISTRATION_SOCKET = f"{DRIVER}-reg.sock"
DRA_SOCKET = "dra.sock"


def servicer(driver: Driver, pb: ModuleType, pb_grpc: ModuleType, metrics: DraMetrics) -> Any:
    """The DRAPlugin service of one API version; both versions have the same messages."""

    class Service(pb_grpc.DRAPluginServicer):
        def NodePrepareResources(self, request, context):
            out = pb.NodePrepareResourcesResponse()
            for c in request.claims:
                ref = ClaimRef(c.namespace, c.uid, c.name)
                try:
                    prepared = driver.prepare(ref)
                except ClaimError as e:
                    log.warning("prepare failed: %s", e)
                    out.claims[c.uid].error = str(e)
                    metrics.prepares.labels("error").inc()
                    continue
                except Exception as e:  # a bug or a disk error: still this claim's error, not the call's
                    log.exception("prepare of %s failed", ref)
                    out.claims[c.uid].error = f"{ref}: {first_line(e)}"
                    metrics.prepares.labels("error").inc()
                    continue
                metrics.prepares.labels("ok").inc()
                out.claims[c.uid].devices.extend(
                    pb.Device(request_names=[d.request], pool_name=d.pool, device_name=d.device, cdi_device_ids=ids)
                    for d, ids in prepared)
            return out

        def NodeUnprepareResources(self, request, context):
            out = pb.NodeUnprepareResourcesResponse()
            for c in request.claims:
                try:
                    driver.unprepare(ClaimRef(c.namespace, c.uid, c.name))
                    out.claims[c.uid].SetInParent()  # an entry for every claim, even without an error
                    metrics.unprepares.labels("ok").inc()
                except Exception as e:
                    out.claims[c.uid].error = str(e) if isinstance(e, ClaimError) else first_line(e)
                    metrics.unprepares.labels("error").inc()
            return out

    return Service()


class Registration(reg_grpc.RegistrationServicer):
    def __init__(self, endpoint: Path) -> None:
        self.endpoint = endpoint
        self.statuses: list[tuple[bool, str]] = []
        self._cond = threading.Condition()

    def GetInfo(self, request, context):
        return reg_pb.PluginInfo(type=PLUGIN_TYPE, name=DRIVER, endpoint=str(self.endpoint),
                                 supported_versions=SUPPORTED_VERSIONS)

    def NotifyRegistrationStatus(self, request, context):
        if request.plugin_registered:
            log.info("registered with the kubelet as %s", DRIVER)
        else:
            log.error("the kubelet refused the registration: %s", request.error or "(no reason given)")
        with self._cond:
            self.statuses.append((request.plugin_registered, request.error))
            self._cond.notify_all()
        return reg_pb.RegistrationStatusResponse()

    def wait_status(self, timeout: float) -> tuple[bool, str]:
        with self._cond:
            if not self._cond.wait_for(lambda: self.statuses, timeout):
                raise TimeoutError(f"no registration status from the kubelet within {timeout}s")
            return self.statuses[-1]


class DraPlugin:
    """Both sockets: the DRA service first (the kubelet dials it right after GetInfo), then registration. While it
    runs, a socket deleted or replaced under it (a node clean-up, the plugin folders recreated) is served again:
    the DRA socket and then the registration socket, whose new file makes the kubelet's plugin watcher register
    the driver again; a lost registration socket alone is recreated alone."""

    def __init__(self, driver: Driver, plugin_dir: Path, registry_dir: Path, watch_interval_s: float = 1.0,
                 metrics: DraMetrics | None = None) -> None:
        self.driver = driver
        self.metrics = metrics or DraMetrics()
        self.metrics.track_prepared(lambda: len(driver.prepared()))
        self.dra_socket = plugin_dir / DRA_SOCKET
        self.registration_socket = registry_dir / REGISTRATION_SOCKET
        self.registration = Registration(self.dra_socket)
        self.watch_interval_s = watch_interval_s
        self.restarts = 0  # sockets served again after they went
        self._servers: dict[Path, grpc.Server] = {}
        self._served: dict[Path, tuple[int, int, int] | None] = {}  # each socket's file as we made it
        self._lock = threading.Lock()  # the watch thread and stop() never restart and stop at once
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    def _add(self, path: Path) -> Callable[[grpc.Server], None]:
        if path == self.dra_socket:
            def add(server: grpc.Server) -> None:
                for pb, pb_grpc in APIS.values():
                    pb_grpc.add_DRAPluginServicer_to_server(servicer(self.driver, pb, pb_grpc, self.metrics),
                                                            server)
            return add
        return lambda server: reg_grpc.add_RegistrationServicer_to_server(self.registration, server)

    def _serve(self, path: Path) -> None:
        old = self._servers.pop(path, None)
        if old is not None:
            old.stop(1).wait()
        self._servers[path] = serve_unix(path, self._add(path), 8, "dra" if path == self.dra_socket else "dra-reg")
        self._served[path] = file_identity(path)

    def start(self) -> None:
        with self._lock:
            self._serve(self.dra_socket)
            self._serve(self.registration_socket)
        log.info("serving %s (%s) on %s, registration on %s", DRIVER, ", ".join(SUPPORTED_VERSIONS),
                 self.dra_socket, self.registration_socket)
        self._stop.clear()
        self._watch = threading.Thread(target=supervise, name="dra-socket-watch", daemon=True,
                                       args=(self._stop, self.watch_interval_s, self.tick, "socket watch step"))
        self._watch.start()

    def tick(self) -> list[Path]:
        """Serve again the sockets that are gone or are no longer our files; returns those served again."""
        with self._lock:
            if self._stop.is_set() or not self._servers:
                return []
            lost = [p for p in (self.dra_socket, self.registration_socket) if file_identity(p) != self._served[p]]
            if self.dra_socket in lost and self.registration_socket not in lost:
                lost.append(self.registration_socket)  # a new registration file: the kubelet registers us again
            for path in lost:
                log.warning("socket %s is gone: serving it again", path)
                self._serve(path)
            if lost:
                self.restarts += 1
                self.metrics.socket_restarts.inc()
            return lost

    def served(self, path: Path) -> tuple[int, int, int] | None:
        """The identity of the socket file the plugin made at `path` (valve.device_plugin.server.file_identity)."""
        with self._lock:
            return self._served.get(path)

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join(10)  # a tick in progress finishes before the servers go
            self._watch = None
        # Registration socket first: a kubelet that sees it go unregisters the driver before the DRA socket goes.
        with self._lock:
            for path in (self.registration_socket, self.dra_socket):
                server = self._servers.pop(path, None)
                if server is not None:
                    server.stop(1).wait()
                    path.unlink(missing_ok=True)
