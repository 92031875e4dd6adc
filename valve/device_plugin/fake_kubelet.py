"""A stand-in kubelet for tests and the GPU smoke run: a real gRPC Registration server on `kubelet.sock`.

Like the kubelet, it answers Register, then dials the plugin's endpoint and keeps a ListAndWatch stream open,
recording each device list it receives. It can also serve the PodResources API on a second socket.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from valve.api.contract import KUBELET_SOCKET
from valve.device_plugin.api import pb, pb_grpc
from valve.device_plugin.proto import podresources_pb2 as pr
from valve.device_plugin.proto import podresources_pb2_grpc as pr_grpc


class _Registration(pb_grpc.RegistrationServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet

    def Register(self, request, context):
        if request.version != "v1beta1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported version {request.version}")
        self.kubelet._on_register(request)
        return pb.Empty()


class FakeKubelet:
    def __init__(self, directory: Path, watch: bool = True) -> None:
        self.dir = Path(directory)
        self.socket = self.dir / KUBELET_SOCKET
        self.watch = watch
        self.registrations: list[pb.RegisterRequest] = []
        self.lists: dict[str, list[pb.ListAndWatchResponse]] = {}
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self._streams: list[grpc.Future] = []
        self._channels: list[grpc.Channel] = []
        self._generation = 0  # bumped by stop(): a stream of a stopped kubelet records nothing more

    # Server lifecycle.
    def start(self) -> FakeKubelet:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="fake-kubelet"))
        pb_grpc.add_RegistrationServicer_to_server(_Registration(self), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        with self._cond:
            self._generation += 1
        for s in self._streams:
            s.cancel()
        for c in self._channels:
            c.close()
        self._streams, self._channels = [], []
        if self._server is not None:
            self._server.stop(0).wait()
            self._server = None
        self.socket.unlink(missing_ok=True)

    def restart(self, wipe_plugin_sockets: bool = True) -> None:
        """What a kubelet restart looks like to a plugin: kubelet.sock deleted and created anew, and (as the
        kubelet's device manager does at start) the other sockets in the directory removed."""
        # The old socket's inode stays allocated until the new one exists, so the new file cannot reuse it.
        held = self.socket.with_name(self.socket.name + ".old")
        self.socket.rename(held)
        self.stop()
        if wipe_plugin_sockets:
            for p in self.dir.glob("*.sock"):
                p.unlink(missing_ok=True)
        with self._cond:
            self.lists = {}  # a new kubelet knows only the lists its own streams receive
        self.start()
        held.unlink()

    # Registration and the ListAndWatch streams.
    def _on_register(self, request: pb.RegisterRequest) -> None:
        with self._cond:
            self.registrations.append(request)
            self._cond.notify_all()
            generation = self._generation
        if self.watch:
            threading.Thread(target=self._follow, args=(request, generation), daemon=True).start()

    def _follow(self, request: pb.RegisterRequest, generation: int) -> None:
        channel = grpc.insecure_channel(f"unix://{self.dir / request.endpoint}")
        self._channels.append(channel)
        stream = pb_grpc.DevicePluginStub(channel).ListAndWatch(pb.Empty())
        self._streams.append(stream)
        try:
            for resp in stream:
                with self._cond:
                    if generation != self._generation:
                        return
                    self.lists.setdefault(request.resource_name, []).append(resp)
                    self._cond.notify_all()
        except grpc.RpcError:
            pass  # plugin or fake kubelet stopped

    def wait_registrations(self, count: int, timeout: float = 10.0) -> list[pb.RegisterRequest]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.registrations) >= count, timeout):
                raise TimeoutError(f"{len(self.registrations)} registrations after {timeout}s, wanted {count}")
            return list(self.registrations)

    def wait_list(
        self, resource: str, predicate: Callable[[pb.ListAndWatchResponse], bool], timeout: float = 10.0
    ) -> pb.ListAndWatchResponse:
        """The latest device list for `resource` once it satisfies `predicate`."""

        def latest():
            got = self.lists.get(resource)
            return got[-1] if got and predicate(got[-1]) else None

        with self._cond:
            if not self._cond.wait_for(lambda: latest() is not None, timeout):
                raise TimeoutError(f"no matching device list for {resource} within {timeout}s")
            return latest()

    def endpoint(self, resource: str) -> Path:
        for r in reversed(self.registrations):
            if r.resource_name == resource:
                return self.dir / r.endpoint
        raise KeyError(f"{resource} has not registered")

    def stub(self, resource: str) -> tuple[pb_grpc.DevicePluginStub, grpc.Channel]:
        """A client to the plugin's endpoint for `resource` (close the channel when done)."""
        channel = grpc.insecure_channel(f"unix://{self.endpoint(resource)}")
        return pb_grpc.DevicePluginStub(channel), channel


class _Lister(pr_grpc.PodResourcesListerServicer):
    def __init__(self, owner: FakePodResources) -> None:
        self.owner = owner

    def List(self, request, context):
        resp = pr.ListPodResourcesResponse()
        for i, entry in enumerate(list(self.owner.assigned)):
            resource, ids, namespace, name = (*entry, "default", f"pod-{i}")[:4]
            container = pr.ContainerResources(name="main", devices=[pr.ContainerDevices(resource_name=resource,
                                                                                        device_ids=ids)])
            resp.pod_resources.append(pr.PodResources(name=name, namespace=namespace, containers=[container]))
        return resp


class FakePodResources:
    """The kubelet PodResources API; `assigned` is a list of (resource name, device IDs[, namespace, name]),
    one pod each (default: namespace `default`, name `pod-<i>`)."""

    def __init__(self, socket: Path) -> None:
        self.socket = Path(socket)
        self.assigned: list[tuple[str, list[str]]] = []
        self._server: grpc.Server | None = None

    def start(self) -> FakePodResources:
        server = grpc.server(ThreadPoolExecutor(max_workers=2))
        pr_grpc.add_PodResourcesListerServicer_to_server(_Lister(self), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait()
        self.socket.unlink(missing_ok=True)
