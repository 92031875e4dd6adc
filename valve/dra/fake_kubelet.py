"""A stand-in for the kubelet's side of a DRA driver, for tests: a real gRPC client over unix sockets.

Like the kubelet's plugin watcher, `register()` dials a registration socket in the registry folder, calls
GetInfo, checks the plugin's type and versions, picks the newest DRA service version both sides speak, and
answers NotifyRegistrationStatus; `watch()` does it again whenever a new socket file appears there, as the
plugin watcher does for a socket it sees created (it follows the folder with inotify; this polls). `prepare()` /
`unprepare()` then call the DRA service as the kubelet does before a pod's containers start and after its last
pod is gone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import grpc

from valve.device_plugin.server import file_identity, supervise
from valve.dra.proto import pluginregistration_pb2 as reg_pb
from valve.dra.proto import pluginregistration_pb2_grpc as reg_grpc
from valve.dra.server import APIS, PLUGIN_TYPE

KUBELET_VERSIONS = ("v1", "v1beta1")  # what a 1.34 kubelet speaks, newest first


class RegistrationRefused(Exception):
    pass


@dataclass
class FakeDraKubelet:
    registry_dir: Path
    versions: tuple[str, ...] = KUBELET_VERSIONS
    info: reg_pb.PluginInfo | None = None
    version: str | None = None
    registrations: int = 0  # successful registrations by watch()
    registered: tuple[int, int, int] | None = None  # the socket file watch() last registered through
    _channels: list[grpc.Channel] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None

    def watch(self, socket_name: str, interval_s: float = 0.01) -> None:
        """Register through `<registry_dir>/<socket_name>` now and whenever a different file is there (deleted
        and created again), in a thread until close()."""
        path = self.registry_dir / socket_name

        def step() -> None:
            seen = file_identity(path)
            if seen is None or seen == self.registered:
                return
            self.register(socket_name)  # raises while it cannot: the next step tries again
            with self._cond:
                self.registered = file_identity(path)
                self.registrations += 1
                self._cond.notify_all()

        self._watcher = threading.Thread(target=supervise, args=(self._stop, interval_s, step, "plugin watch step"),
                                         name="fake-kubelet-watch", daemon=True)
        self._watcher.start()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until `predicate` holds, checked after each registration by watch(); TimeoutError after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"not true within {timeout}s ({self.registrations} registrations)")

    def register(self, socket_name: str, refuse: str | None = None, timeout: float = 5.0) -> str:
        """Register the plugin behind `<registry_dir>/<socket_name>`; returns the service version chosen.
        `refuse`: answer NotifyRegistrationStatus with this error instead (as a kubelet that rejects it)."""
        with grpc.insecure_channel(f"unix://{self.registry_dir / socket_name}") as channel:
            stub = reg_grpc.RegistrationStub(channel)
            info = stub.GetInfo(reg_pb.InfoRequest(), timeout=timeout, wait_for_ready=True)
            error = refuse
            offered = [v.removesuffix(f".{PLUGIN_TYPE}") for v in info.supported_versions]
            chosen = next((v for v in self.versions if v in offered), None)
            if info.type != PLUGIN_TYPE:
                error = f"plugin type {info.type!r}, expected {PLUGIN_TYPE}"
            elif chosen is None:
                error = f"none of the versions {list(info.supported_versions)} is supported"
            stub.NotifyRegistrationStatus(reg_pb.RegistrationStatus(plugin_registered=error is None,
                                                                    error=error or ""), timeout=timeout)
        if error is not None:
            raise RegistrationRefused(error)
        self.info, self.version = info, chosen
        return chosen

    def _api(self, version: str | None) -> tuple[ModuleType, object]:
        version = version or self.version
        if self.info is None or version is None:
            raise RuntimeError("register() first")
        pb, pb_grpc = APIS[version]
        channel = grpc.insecure_channel(f"unix://{self.info.endpoint}")
        self._channels.append(channel)
        return pb, pb_grpc.DRAPluginStub(channel)

    def prepare(self, *claims: tuple[str, str, str], version: str | None = None, timeout: float = 5.0):
        """NodePrepareResources for (namespace, uid, name) claims; the response's claims map."""
        pb, stub = self._api(version)
        req = pb.NodePrepareResourcesRequest(claims=[pb.Claim(namespace=n, uid=u, name=m) for n, u, m in claims])
        return stub.NodePrepareResources(req, timeout=timeout).claims

    def unprepare(self, *claims: tuple[str, str, str], version: str | None = None, timeout: float = 5.0):
        pb, stub = self._api(version)
        req = pb.NodeUnprepareResourcesRequest(claims=[pb.Claim(namespace=n, uid=u, name=m) for n, u, m in claims])
        return stub.NodeUnprepareResources(req, timeout=timeout).claims

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(10)
            self._watcher = None
        for c in self._channels:
            c.close()
        self._channels = []
