"""The device plugin driven over gRPC by a fake kubelet (a real gRPC server on a unix socket)."""

from __future__ import annotations

import os
import stat
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from waiting import until

from valve.device_plugin.api import pb
from valve.device_plugin.backend import SimBackend, sim_uuid
from valve.device_plugin.config import PluginConfig
from valve.device_plugin.fake_kubelet import FakeKubelet, FakePodResources
from valve.device_plugin.server import SOCKET_MODE, DevicePlugin, InitError

ONLINE, OFFLINE = "valve.io/online-gpu", "valve.io/offline-gpu"




def make_config(base: Path, **kw) -> PluginConfig:
    defaults = dict(
        device_plugin_dir=base / "dp",
        runtime_root=base / "run",
        state_dir=base / "state",
        pod_resources_socket=None,
        metrics_port=None,
    )
    return PluginConfig(**{**defaults, **kw})


@pytest.fixture
def node(short_dir: Path) -> Iterator[SimpleNamespace]:
    """A fake kubelet and the plugin on a simulated 4-GPU node, registered."""
    kubelet = FakeKubelet(short_dir / "dp").start()
    backend = SimBackend(4)
    config = make_config(short_dir)
    plugin = DevicePlugin(config, backend)
    plugin.start()
    plugin.wait_registrations(1)  # not the kubelet's count: a restart must not cut a round in half
    yield SimpleNamespace(kubelet=kubelet, backend=backend, plugin=plugin, config=config, dir=short_dir)
    plugin.stop()
    kubelet.stop()


def call(kubelet: FakeKubelet, resource: str, method: str, request):
    stub, channel = kubelet.stub(resource)
    with channel:
        return getattr(stub, method)(request, timeout=5)


def allocate(kubelet: FakeKubelet, resource: str, *containers: list[str]) -> pb.AllocateResponse:
    req = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=c) for c in containers])
    return call(kubelet, resource, "Allocate", req)


def preferred(kubelet, resource, available, size=1, must=()) -> list[str]:
    req = pb.PreferredAllocationRequest(
        container_requests=[
            pb.ContainerPreferredAllocationRequest(
                available_deviceIDs=available, must_include_deviceIDs=list(must), allocation_size=size
            )
        ]
    )
    return list(call(kubelet, resource, "GetPreferredAllocation", req).container_responses[0].deviceIDs)


def health(resp: pb.ListAndWatchResponse) -> list[str]:
    return [d.health for d in resp.devices]


def test_registration_fields(node) -> None:
    regs = {r.resource_name: r for r in node.kubelet.registrations}
    assert set(regs) == {ONLINE, OFFLINE}
    for resource, r in regs.items():
        assert r.version == "v1beta1"
        assert r.endpoint == resource.replace("/", "-") + ".sock"
        assert "/" not in r.endpoint and (node.config.device_plugin_dir / r.endpoint).is_socket()
        assert r.options.get_preferred_allocation_available and not r.options.pre_start_required
        opts = call(node.kubelet, resource, "GetDevicePluginOptions", pb.Empty())
        assert opts == r.options
        assert call(node.kubelet, resource, "PreStartContainer", pb.PreStartContainerRequest()) == (
            pb.PreStartContainerResponse()
        )


def test_list_and_watch_streams_devices_and_health_changes(node) -> None:
    k, be = node.kubelet, node.backend
    for resource in (ONLINE, OFFLINE):
        first = k.wait_list(resource, lambda r: len(r.devices) == 4)
        assert [d.ID for d in first.devices] == be.uuids
        assert health(first) == ["Healthy"] * 4
        assert [[n.ID for n in d.topology.nodes] for d in first.devices] == [[0], [0], [1], [1]]
    be.inject_xid(be.uuids[2], 43)  # application XID: ignored
    be.inject_xid(be.uuids[1], 79)  # fallen off the bus: critical (handled after the first, in order)
    for resource in (ONLINE, OFFLINE):
        k.wait_list(resource, lambda r: health(r) == ["Healthy", "Unhealthy", "Healthy", "Healthy"])
    reg = node.plugin.metrics.registry

    def healthy(gpu: str) -> float | None:
        return reg.get_sample_value("valve_device_healthy", {"gpu": gpu, "resource": OFFLINE})
    # the gauges follow the device lists (set right after the table changes, on the health thread)
    until(lambda: healthy(be.uuids[1]) == 0, "the health gauge of the lost GPU")
    assert healthy(be.uuids[2]) == 1

    be.lose(be.uuids[0])
    k.wait_list(ONLINE, lambda r: health(r) == ["Unhealthy", "Unhealthy", "Healthy", "Healthy"])
    be.set_health(be.uuids[1], True)
    k.wait_list(OFFLINE, lambda r: health(r) == ["Unhealthy", "Healthy", "Healthy", "Healthy"])


def test_allocate_returns_env_and_mounts(node) -> None:
    be, root = node.backend, node.config.runtime_root
    resp = allocate(node.kubelet, OFFLINE, [be.uuids[1]], [be.uuids[3]])
    assert len(resp.container_responses) == 2
    for uuid, c in zip([be.uuids[1], be.uuids[3]], resp.container_responses, strict=True):
        assert dict(c.envs) == {
            "NVIDIA_VISIBLE_DEVICES": uuid,
            "CUDA_VISIBLE_DEVICES": uuid,
            "VALVE_GPU_UUID": uuid,
            "VALVE_ROLE": "offline",
            "VALVE_RUNTIME_DIR": str(root),
        }
        assert [(m.container_path, m.host_path, m.read_only) for m in c.mounts] == [
            (str(root / uuid), str(root / uuid), False)
        ]
        assert stat.S_IMODE((root / uuid).stat().st_mode) == 0o700
    online = allocate(node.kubelet, ONLINE, [be.uuids[1]]).container_responses[0]
    assert online.envs["VALVE_ROLE"] == "online" and online.envs["CUDA_VISIBLE_DEVICES"] == be.uuids[1]
    reg = node.plugin.metrics.registry
    assert reg.get_sample_value("valve_allocations_total", {"resource": OFFLINE}) == 2
    assert reg.get_sample_value("valve_allocations_total", {"resource": ONLINE}) == 1
    assert reg.get_sample_value("valve_devices", {"resource": ONLINE}) == 4


def test_bad_requests_get_clear_errors(node) -> None:
    k, be = node.kubelet, node.backend

    def error(fn, *args) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            fn(*args)
        return info.value

    e = error(allocate, k, ONLINE, ["GPU-does-not-exist"])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown device ID" in e.details() and "GPU-does-not-exist" in e.details() and ONLINE in e.details()
    assert error(allocate, k, ONLINE).code() == grpc.StatusCode.INVALID_ARGUMENT  # no containers
    e = error(allocate, k, ONLINE, [])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "no device IDs" in e.details()
    e = error(preferred, k, OFFLINE, be.uuids[:2], 3)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "allocation_size 3" in e.details()
    e = error(preferred, k, OFFLINE, be.uuids[:2], 1, [be.uuids[3]])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "must_include" in e.details()
    e = error(preferred, k, OFFLINE, ["bogus"], 1)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "'bogus'" in e.details()
    be.lose(be.uuids[0])
    k.wait_list(ONLINE, lambda r: r.devices[0].health == "Unhealthy", timeout=1.0)
    e = error(allocate, k, ONLINE, [be.uuids[0]])
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "unhealthy" in e.details()


class KubeletBook:
    """What the kubelet knows: which slots of each resource are assigned. Schedules like the kubelet does:
    GetPreferredAllocation over the free slots, then Allocate."""

    def __init__(self, kubelet: FakeKubelet, uuids: list[str]) -> None:
        self.kubelet, self.uuids = kubelet, uuids
        self.assigned: dict[str, set[str]] = {ONLINE: set(), OFFLINE: set()}

    def schedule(self, resource: str) -> str:
        free = [u for u in self.uuids if u not in self.assigned[resource]]
        (chosen,) = preferred(self.kubelet, resource, free)
        allocate(self.kubelet, resource, [chosen])
        self.assigned[resource].add(chosen)
        return chosen

    def end(self, resource: str, uuid: str) -> None:
        self.assigned[resource].discard(uuid)


def test_preferred_allocation_pairs_online_and_offline_on_one_gpu(node) -> None:
    book, g = KubeletBook(node.kubelet, node.backend.uuids), node.backend.uuids
    # Pairs arriving online first.
    on1 = book.schedule(ONLINE)
    assert book.schedule(OFFLINE) == on1 == g[0]
    on2 = book.schedule(ONLINE)
    assert on2 == g[1] and book.schedule(OFFLINE) == on2
    # Two onlines before their offlines: each offline joins a GPU holding an online alone.
    on3, on4 = book.schedule(ONLINE), book.schedule(ONLINE)
    assert {on3, on4} == {g[2], g[3]}
    assert {book.schedule(OFFLINE), book.schedule(OFFLINE)} == {g[2], g[3]}
    assert book.assigned[ONLINE] == book.assigned[OFFLINE] == set(g)
    # An offline pod ends; its replacement goes back next to the online tenant it left.
    book.end(OFFLINE, g[1])
    assert book.schedule(OFFLINE) == g[1]


def test_preferred_allocation_offline_first_keeps_the_pair(node) -> None:
    book, g = KubeletBook(node.kubelet, node.backend.uuids), node.backend.uuids
    off1 = book.schedule(OFFLINE)
    assert off1 == g[0] and book.schedule(ONLINE) == g[0]
    on2 = book.schedule(ONLINE)
    assert on2 == g[1] and book.schedule(OFFLINE) == g[1]


def test_allocation_record_survives_plugin_restart(short_dir: Path) -> None:
    kubelet = FakeKubelet(short_dir / "dp").start()
    backend = SimBackend(4)
    config = make_config(short_dir)
    first = DevicePlugin(config, backend)
    first.start()
    first.wait_registrations(1)
    allocate(kubelet, ONLINE, [backend.uuids[2]])
    first.stop()
    second = DevicePlugin(config, SimBackend(4))
    second.start()
    try:
        second.wait_registrations(1)
        assert preferred(kubelet, OFFLINE, backend.uuids) == [backend.uuids[2]]
    finally:
        second.stop()
        kubelet.stop()


def test_pod_resources_api_is_used_when_reachable(short_dir: Path) -> None:
    kubelet = FakeKubelet(short_dir / "dp").start()
    pods = FakePodResources(short_dir / "pr.sock").start()
    backend = SimBackend(4)
    plugin = DevicePlugin(make_config(short_dir, pod_resources_socket=short_dir / "pr.sock"), backend)
    plugin.start()
    try:
        plugin.wait_registrations(1)
        pods.assigned = [(ONLINE, [backend.uuids[3]]), ("example.com/other", [backend.uuids[1]])]
        assert preferred(kubelet, OFFLINE, backend.uuids) == [backend.uuids[3]]
        assert plugin.services["offline"].slots.last_source == "pod-resources"
        # The record says g0's online slot is taken, but the kubelet (PodResources) is the truth.
        allocate(kubelet, ONLINE, [backend.uuids[0]])
        pods.assigned = [(ONLINE, [backend.uuids[1]])]
        assert preferred(kubelet, OFFLINE, backend.uuids) == [backend.uuids[1]]
        pods.stop()  # unreachable: fall back to the record
        assert preferred(kubelet, OFFLINE, backend.uuids) == [backend.uuids[0]]
        assert plugin.services["offline"].slots.last_source == "record"
    finally:
        plugin.stop()
        kubelet.stop()


@pytest.mark.parametrize("wipe", [True, False], ids=["kubelet-restart", "socket-only"])
def test_kubelet_sock_recreated_triggers_reregistration(node, wipe: bool) -> None:
    k = node.kubelet
    k.restart(wipe_plugin_sockets=wipe)
    node.plugin.wait_registrations(2)  # bounded: a missed restart never re-registers
    regs = k.registrations
    assert {r.resource_name for r in regs[2:]} == {ONLINE, OFFLINE}
    assert all((node.config.device_plugin_dir / r.endpoint).is_socket() for r in regs[2:])
    # The new kubelet gets a fresh device list and can allocate (restart() forgot the old kubelet's lists:
    # clearing here could drop the new stream's first list, which may already have come).
    k.wait_list(OFFLINE, lambda r: len(r.devices) == 4)
    resp = allocate(k, OFFLINE, [node.backend.uuids[0]])
    assert resp.container_responses[0].envs["VALVE_ROLE"] == "offline"
    assert node.plugin.registrations == 2


def test_kubelet_down_then_up_reregisters(node) -> None:
    k = node.kubelet
    k.stop()
    until(lambda: not node.plugin.registered, "the plugin to notice the kubelet is gone")
    k.start()
    node.plugin.wait_registrations(2)
    assert {r.resource_name for r in k.registrations[2:]} == {ONLINE, OFFLINE}


def test_stop_removes_sockets_and_ends_streams(short_dir: Path) -> None:
    kubelet = FakeKubelet(short_dir / "dp").start()
    plugin = DevicePlugin(make_config(short_dir), SimBackend(2))
    plugin.start()
    plugin.wait_registrations(1)
    kubelet.wait_list(ONLINE, lambda r: len(r.devices) == 2)
    stub, channel = kubelet.stub(ONLINE)
    stream = stub.ListAndWatch(pb.Empty())
    assert len(next(stream).devices) == 2
    start = time.monotonic()
    plugin.stop()
    assert time.monotonic() - start < 3.0
    assert sorted(p.name for p in (short_dir / "dp").iterdir()) == ["kubelet.sock"]
    with pytest.raises((grpc.RpcError, StopIteration)):  # the stream has ended
        next(stream)
    channel.close()
    kubelet.stop()


def test_sockets_and_state_are_the_owners_alone(short_dir: Path) -> None:
    """The kubelet (root) is the plugin sockets' one client; the allocation record is root's. The modes are the
    plugin's own, not the umask's: under umask 0 a socket would otherwise be 0777, open to every local user."""
    (short_dir / "state").mkdir(mode=0o755)  # as the chart's hostPath DirectoryOrCreate leaves it
    os.chmod(short_dir / "state", 0o755)
    old = os.umask(0)
    kubelet = FakeKubelet(short_dir / "dp").start()
    backend = SimBackend(2)
    plugin = DevicePlugin(make_config(short_dir), backend)
    try:
        plugin.start()
        plugin.wait_registrations(1)
        socks = [s.socket_path for s in plugin.servers]
        assert len(socks) == 2 and all(stat.S_ISSOCK(p.stat().st_mode) for p in socks)
        assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in socks} == {oct(SOCKET_MODE)} == {"0o600"}
        allocate(kubelet, OFFLINE, [backend.uuids[0]])
        assert stat.S_IMODE((short_dir / "state").stat().st_mode) == 0o700
        assert stat.S_IMODE((short_dir / "run").stat().st_mode) == 0o755  # made here: traversable, not 0777
    finally:
        os.umask(old)
        plugin.stop()
        kubelet.stop()


def test_metrics_endpoint(short_dir: Path) -> None:
    backend = SimBackend(2)
    plugin = DevicePlugin(make_config(short_dir, metrics_port=0, metrics_addr="127.0.0.1"), backend)
    plugin.start()
    try:
        backend.set_usage(backend.uuids[1], 0.25, 7 * 2**30)
        plugin.update_usage()
        body = urllib.request.urlopen(f"http://127.0.0.1:{plugin.metrics.port}/metrics", timeout=5).read().decode()
    finally:
        plugin.stop()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    g0, g1 = backend.uuids
    assert samples[("valve_devices", (("resource", ONLINE),))] == 2
    assert samples[("valve_device_healthy", (("gpu", g0), ("resource", OFFLINE)))] == 1
    assert samples[("valve_gpu_utilization_ratio", (("gpu", g1),))] == 0.25
    assert samples[("valve_gpu_memory_used_bytes", (("gpu", g1),))] == 7 * 2**30
    assert samples[("valve_gpu_utilization_ratio", (("gpu", g0),))] == 0


def test_mig_gpus_are_skipped_with_a_log_line_and_a_metric(short_dir: Path, caplog) -> None:
    kubelet = FakeKubelet(short_dir / "dp").start()
    backend = SimBackend(3, mig=[1])
    mig_uuid = sim_uuid("sim-node", 1)
    plugin = DevicePlugin(make_config(short_dir), backend)
    with caplog.at_level("WARNING", logger="valve.device_plugin.server"):
        plugin.start()
    try:
        plugin.wait_registrations(1)
        listed = kubelet.wait_list(ONLINE, lambda r: len(r.devices) == 2)
        assert mig_uuid not in {d.ID for d in listed.devices} and backend.uuids == [sim_uuid("sim-node", i)
                                                                                    for i in (0, 2)]
        lines = [r.getMessage() for r in caplog.records if mig_uuid in r.getMessage()]
        assert len(lines) == 1 and "MIG mode is enabled" in lines[0]
        assert plugin.metrics.registry.get_sample_value("valve_devices_skipped", {"reason": "mig"}) == 1
        assert plugin.metrics.registry.get_sample_value("valve_devices", {"resource": ONLINE}) == 2
        assert not (short_dir / "run" / mig_uuid).exists()
    finally:
        plugin.stop()
        kubelet.stop()


def test_only_mig_gpus_is_an_init_error(short_dir: Path) -> None:
    plugin = DevicePlugin(make_config(short_dir), SimBackend(2, mig=[0, 1]))
    with pytest.raises(InitError, match=r"found no GPUs to advertise \(2 skipped: mig\)"):
        plugin.start()
    plugin.stop()
    assert plugin.metrics.registry.get_sample_value("valve_devices_skipped", {"reason": "mig"}) == 2
    with pytest.raises(ValueError, match="out of 0..1"):
        SimBackend(2, mig=[2])


def test_extra_list_and_watch_streams_do_not_starve_allocate(node) -> None:
    from valve.device_plugin.service import MAX_STREAMS

    stub, channel = node.kubelet.stub(ONLINE)
    streams = []
    try:
        for _ in range(MAX_STREAMS - 1):  # the kubelet holds one already
            it = stub.ListAndWatch(pb.Empty(), timeout=20)
            next(it)  # served: it holds a server thread from now on
            streams.append(it)
        service = node.plugin.services["online"]
        assert service.streams == MAX_STREAMS
        resp = allocate(node.kubelet, ONLINE, [node.backend.uuids[0]])
        assert resp.container_responses[0].envs  # answered within the 5 s call timeout
        extra = stub.ListAndWatch(pb.Empty(), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            next(extra)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "ListAndWatch streams" in e.value.details()
    finally:
        for it in streams:
            it.cancel()
        channel.close()
    until(lambda: node.plugin.services["online"].streams == 1, "the cancelled streams to end")


def test_registered_gauge_follows_the_kubelet(short_dir: Path) -> None:
    (short_dir / "dp").mkdir()
    plugin = DevicePlugin(make_config(short_dir), SimBackend(2))
    plugin.start()
    reg = plugin.metrics.registry

    def registered() -> list[float | None]:
        return [reg.get_sample_value("valve_device_plugin_registered", {"resource": r}) for r in (ONLINE, OFFLINE)]

    kubelet = None
    try:
        assert registered() == [0, 0]  # no kubelet yet: the alert's condition
        kubelet = FakeKubelet(short_dir / "dp").start()
        plugin.wait_registrations(1)
        assert registered() == [1, 1]
        kubelet.stop()
        kubelet = None
        (short_dir / "dp" / "kubelet.sock").unlink(missing_ok=True)
        until(lambda: registered() == [0, 0], "the gauge to drop with kubelet.sock")
    finally:
        plugin.stop()
        if kubelet is not None:
            kubelet.stop()
