"""The kubelet restarted ten times under a running device plugin (a fake kubelet over real gRPC on unix sockets, as
the kubelet's device manager restarts: kubelet.sock recreated and the plugin sockets wiped), with an allocation
after each restart. Nothing may be lost: every restart ends with both resources registered again and all GPUs
listed healthy to the new kubelet, every allocation made before is still in the plugin's record, and the
re-created sockets keep their mode."""

from __future__ import annotations

import json
import stat
import time

from valve.device_plugin.api import pb
from valve.device_plugin.backend import SimBackend
from valve.device_plugin.config import PluginConfig
from valve.device_plugin.fake_kubelet import FakeKubelet
from valve.device_plugin.server import SOCKET_MODE, DevicePlugin
from valve.stats import percentile

RESTARTS = 10
GPUS = 4
RESOURCES = {"online": "valve.io/online-gpu", "offline": "valve.io/offline-gpu"}


def allocate(kubelet: FakeKubelet, resource: str, gpu: str) -> pb.AllocateResponse:
    stub, channel = kubelet.stub(resource)
    with channel:
        req = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[gpu])])
        return stub.Allocate(req, timeout=5)


def all_listed_healthy(kubelet: FakeKubelet) -> None:
    for resource in RESOURCES.values():
        kubelet.wait_list(resource, lambda r: len(r.devices) == GPUS and all(d.health == "Healthy" for d in r.devices))


def test_kubelet_restarted_ten_times_loses_no_device_and_no_allocation(short_dir, figures):
    kubelet = FakeKubelet(short_dir / "dp").start()
    backend = SimBackend(GPUS)
    config = PluginConfig(device_plugin_dir=short_dir / "dp", runtime_root=short_dir / "run",
                          state_dir=short_dir / "state", pod_resources_socket=None, metrics_port=None)
    plugin = DevicePlugin(config, backend)
    plugin.start()
    allocated: dict[str, set[str]] = {role: set() for role in RESOURCES}
    recover_ms = []
    try:
        plugin.wait_registrations(1)
        all_listed_healthy(kubelet)
        for i in range(RESTARTS):
            role = ("online", "offline")[i % 2]
            gpu = backend.uuids[(i // 2) % GPUS]
            resp = allocate(kubelet, RESOURCES[role], gpu)
            assert resp.container_responses[0].envs["VALVE_GPU_UUID"] == gpu
            allocated[role].add(gpu)
            t0 = time.monotonic()
            kubelet.restart(wipe_plugin_sockets=True)
            all_listed_healthy(kubelet)  # registered again, and the new kubelet's streams list every GPU
            recover_ms.append((time.monotonic() - t0) * 1e3)
            plugin.wait_registrations(i + 2)
            for resource in RESOURCES.values():
                sock = kubelet.endpoint(resource)
                assert stat.S_IMODE(sock.stat().st_mode) == SOCKET_MODE, sock
        record = json.loads((short_dir / "state" / "allocations.json").read_text())
        assert {role: set(record[role]) for role in RESOURCES} == allocated  # no allocation forgotten
        assert plugin.registrations == RESTARTS + 1
    finally:
        plugin.stop()
        kubelet.stop()
    figures.update(restarts=RESTARTS, allocations_kept=sum(map(len, allocated.values())),
                   restart_to_relisted_p50_ms=round(percentile(recover_ms, 50), 1),
                   restart_to_relisted_max_ms=round(max(recover_ms), 1))
