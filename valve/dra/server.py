"""The kubelet-facing side: the DRA service (v1 and v1beta1) and the plugin-registration service on unix sockets.

The kubelet's plugin watcher finds `<registry dir>/gpu.valve.io-reg.sock`, calls GetInfo (type DRAPlugin, our
name, the DRA socket, the service versions we serve) and then NotifyRegistrationStatus; it then calls
NodePrepareResources / NodeUnprepareResources on the DRA socket, in the newest version both sides speak.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from valve.api.dra import DRIVER
from valve.device_plugin.api import UNIX_PATH_MAX
from valve.dra.driver import ClaimError, ClaimRef, Driver, first_line
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


def servicer(driver: Driver, pb: ModuleType, pb_grpc: ModuleType) -> Any:
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
                    continue
                except Exception as e:  # a bug or a disk error: still this claim's error, not the call's
                    log.exception("prepare of %s failed", ref)
                    out.claims[c.uid].error = f"{ref}: {first_line(e)}"
                    continue
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
                except Exception as e:
                    out.claims[c.uid].error = str(e) if isinstance(e, ClaimError) else first_line(e)
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


def _serve(socket_path: Path, add: Any, name: str) -> grpc.Server:
    if len(str(socket_path).encode()) > UNIX_PATH_MAX:
        raise ValueError(f"socket path longer than {UNIX_PATH_MAX} bytes: {socket_path}")
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)  # a socket left by an earlier run
    server = grpc.server(ThreadPoolExecutor(max_workers=8, thread_name_prefix=name))
    add(server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    return server


class DraPlugin:
    """Both sockets: the DRA service first (the kubelet dials it right after GetInfo), then registration."""

    def __init__(self, driver: Driver, plugin_dir: Path, registry_dir: Path) -> None:
        self.driver = driver
        self.dra_socket = plugin_dir / DRA_SOCKET
        self.registration_socket = registry_dir / REGISTRATION_SOCKET
        self.registration = Registration(self.dra_socket)
        self._servers: list[grpc.Server] = []

    def start(self) -> None:
        def add_dra(server: grpc.Server) -> None:
            for pb, pb_grpc in APIS.values():
                pb_grpc.add_DRAPluginServicer_to_server(servicer(self.driver, pb, pb_grpc), server)

        self._servers.append(_serve(self.dra_socket, add_dra, "dra"))
        self._servers.append(_serve(self.registration_socket,
                                    lambda s: reg_grpc.add_RegistrationServicer_to_server(self.registration, s),
                                    "dra-reg"))
        log.info("serving %s (%s) on %s, registration on %s", DRIVER, ", ".join(SUPPORTED_VERSIONS),
                 self.dra_socket, self.registration_socket)

    def stop(self) -> None:
        # Registration socket first: a kubelet that sees it go unregisters the driver before the DRA socket goes.
        for server, path in zip(reversed(self._servers), (self.registration_socket, self.dra_socket), strict=False):
            server.stop(1).wait()
            path.unlink(missing_ok=True)
        self._servers = []
