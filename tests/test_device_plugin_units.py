"""Plain-function tests of the device plugin: XID policy, pairing rule, allocation record, backends, metrics."""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

from valve.device_plugin.allocation import AllocationRecord, preferred_allocation
from valve.device_plugin.backend import SimBackend, sim_uuid
from valve.device_plugin.devices import DeviceTable
from valve.device_plugin.health import DEFAULT_IGNORED_XIDS, DeviceEvent, XidPolicy, health_change, parse_xids
from valve.device_plugin.metrics import PluginMetrics
from valve.device_plugin.nvml import NvmlBackend, numa_from_sysfs, sysfs_pci_address
from valve.device_plugin.service import container_allocation, ensure_runtime_dir


# XID policy (NVIDIA k8s-device-plugin convention).
def test_default_policy_ignores_application_xids_only() -> None:
    p = XidPolicy()
    assert DEFAULT_IGNORED_XIDS == {13, 31, 43, 45, 68, 109}
    assert not any(p.is_critical(x) for x in (13, 31, 43, 45, 68, 109))
    assert all(p.is_critical(x) for x in (48, 63, 64, 74, 79, 94, 95))


def test_policy_disable_enable_and_all() -> None:
    p = XidPolicy.from_strings("79, 94", "31")
    assert not p.is_critical(79) and not p.is_critical(94) and not p.is_critical(13)
    assert p.is_critical(31) and p.is_critical(48)
    off = XidPolicy.from_strings("all")
    assert not off.is_critical(79) and not off.watches_xids
    off_but_48 = XidPolicy.from_strings("xids", "48")
    assert off_but_48.is_critical(48) and not off_but_48.is_critical(79) and off_but_48.watches_xids
    every = XidPolicy.from_strings("", "all")
    assert every.is_critical(13) and every.is_critical(109)
    assert parse_xids(" 1,,2 ") == (False, frozenset({1, 2}))
    with pytest.raises(ValueError, match="bad XID"):
        parse_xids("12,x")


def test_health_change_from_events() -> None:
    p = XidPolicy()
    assert health_change(DeviceEvent("xid", "g", xid=43), p) is None
    ch = health_change(DeviceEvent("xid", "g", xid=79), p)
    assert ch is not None and ch.uuid == "g" and not ch.healthy and "79" in ch.reason
    lost = health_change(DeviceEvent("lost", None), p)
    assert lost is not None and lost.uuid is None and not lost.healthy
    back = health_change(DeviceEvent("health", "g", healthy=True), p)
    assert back is not None and back.healthy


def test_device_table_versions_and_wait() -> None:
    be = SimBackend(2)
    t = DeviceTable(be.discover())
    v0, _ = t.snapshot()
    assert t.apply(health_change(DeviceEvent("xid", be.uuids[0], xid=79), XidPolicy())) == [be.uuids[0]]
    assert t.apply(health_change(DeviceEvent("xid", be.uuids[0], xid=79), XidPolicy())) == []  # no change
    assert t.wait_change(v0, 0.01)
    v1, states = t.snapshot()
    assert v1 == v0 + 1 and [s.healthy for s in states] == [False, True]
    start = time.monotonic()
    assert not t.wait_change(v1, 0.05) and time.monotonic() - start >= 0.04
    threading.Timer(0.05, t.apply, args=(health_change(DeviceEvent("lost", None), XidPolicy()),)).start()
    assert t.wait_change(v1, 2.0)
    assert not any(s.healthy for s in t.snapshot()[1])


# Pairing.
def _pick(role, available, taken, order, size=1, must=()):
    return preferred_allocation(role, available, list(must), size, taken, order)


def test_offline_prefers_gpu_with_online_only() -> None:
    order = ["g0", "g1", "g2", "g3"]
    taken = {"online": {"g0", "g2"}, "offline": {"g0"}}
    # g0's offline slot is taken, so the kubelet does not offer it.
    assert _pick("offline", ["g1", "g2", "g3"], taken, order) == ["g2"]
    # Nothing half-filled: an empty GPU, in discovery order.
    assert _pick("offline", ["g1", "g3"], taken, order) == ["g1"]


def test_online_prefers_empty_gpu_then_completes_a_lone_offline() -> None:
    order = ["g0", "g1", "g2", "g3"]
    assert _pick("online", ["g1", "g2", "g3"], {"online": {"g0"}, "offline": {"g0"}}, order) == ["g1"]
    # A lone offline (arrived before its online partner) is joined rather than split from its pair.
    assert _pick("online", ["g1", "g2", "g3"], {"online": {"g0"}, "offline": {"g0", "g3"}}, order) == ["g3"]


def test_pairing_respects_must_include_and_size() -> None:
    order = ["g0", "g1", "g2", "g3"]
    taken = {"online": {"g1", "g3"}, "offline": set()}
    assert _pick("offline", order, taken, order, size=2) == ["g1", "g3"]
    assert _pick("offline", order, taken, order, size=2, must=["g0"]) == ["g0", "g1"]


# Allocation record.
def test_allocation_record_persists_and_releases(tmp_path: Path) -> None:
    rec = AllocationRecord(tmp_path / "state")
    rec.add("online", ["g0"])
    rec.add("offline", ["g0", "g1"])
    again = AllocationRecord(tmp_path / "state")  # a plugin restart
    assert again.taken() == {"online": {"g0"}, "offline": {"g0", "g1"}}
    assert again.release("offline", ["g1", "g2"]) == ["g1"]
    assert AllocationRecord(tmp_path / "state").taken()["offline"] == {"g0"}
    data = json.loads((tmp_path / "state" / "allocations.json").read_text())
    assert data["version"] == 1 and set(data["online"]) == {"g0"}


def test_allocation_record_survives_a_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "allocations.json").write_text("{not json")
    rec = AllocationRecord(tmp_path)
    assert rec.taken() == {"online": set(), "offline": set()}
    rec.add("online", ["g"])
    assert AllocationRecord(tmp_path).taken()["online"] == {"g"}


# Allocate artefacts.
def test_runtime_dir_mode_and_container_allocation(tmp_path: Path) -> None:
    root = tmp_path / "run"
    path = ensure_runtime_dir(root, "GPU-x", 0o700)
    assert path == root / "GPU-x" and stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE(ensure_runtime_dir(root, "GPU-y", 0o770).stat().st_mode) == 0o770
    resp = container_allocation("offline", ["GPU-x"], root)
    assert dict(resp.envs) == {
        "NVIDIA_VISIBLE_DEVICES": "GPU-x",
        "CUDA_VISIBLE_DEVICES": "GPU-x",
        "VALVE_GPU_UUID": "GPU-x",
        "VALVE_ROLE": "offline",
        "VALVE_RUNTIME_DIR": str(root),
    }
    assert [(m.container_path, m.host_path, m.read_only) for m in resp.mounts] == [
        (str(root / "GPU-x"), str(root / "GPU-x"), False)
    ]


# Backends.
def test_sim_backend_uuids_are_stable_and_distinct() -> None:
    a, b = SimBackend(4), SimBackend(4)
    assert a.uuids == b.uuids and len(set(a.uuids)) == 4
    assert all(u.startswith("GPU-") and len(u) == 40 for u in a.uuids)
    assert SimBackend(2, node="other").uuids[0] != a.uuids[0] and a.uuids[1] == sim_uuid("sim-node", 1)
    assert [g.numa_node for g in a.discover()] == [0, 0, 1, 1]
    with pytest.raises(KeyError):
        a.inject_xid("GPU-nope", 79)


class FakeNvml:
    """Just enough of pynvml's API, with pynvml's own error classes and constants."""

    NVMLError = pynvml.NVMLError
    NVML_ERROR_TIMEOUT = pynvml.NVML_ERROR_TIMEOUT
    NVML_ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError

    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE

    def __init__(self, n: int = 2, events_supported: bool = True, mig: tuple[int, ...] = (),
                 mig_error: int | None = None) -> None:
        self.mig = mig
        self.mig_error = mig_error
        self.uuids = [f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(n)]
        self.events: list[SimpleNamespace] = []
        self.lost: set[int] = set()
        self.events_supported = events_supported
        self.registered: list[int] = []
        self.shutdown = False

    def nvmlInit(self): pass
    def nvmlShutdown(self): self.shutdown = True
    def nvmlDeviceGetCount(self): return len(self.uuids)
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetHandleByUUID(self, u): return self.uuids.index(u)
    def nvmlDeviceGetUUID(self, h): return self.uuids[h]
    def nvmlDeviceGetName(self, h): return b"NVIDIA H100 80GB HBM3"
    def nvmlDeviceGetPciInfo(self, h): return SimpleNamespace(busId=f"00000000:{0x18 + h:02X}:00.0")
    def nvmlDeviceGetNumaNodeId(self, h):
        if h == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 0

    def nvmlDeviceGetMemoryInfo(self, h):
        if h in self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return SimpleNamespace(total=80 * 2**30, used=3 * 2**30)

    def nvmlDeviceGetMigMode(self, h):
        if self.mig_error is not None:
            raise pynvml.NVMLError(self.mig_error)
        return [int(h in self.mig), 0]

    def nvmlDeviceGetUtilizationRates(self, h): return SimpleNamespace(gpu=42, memory=10)
    def nvmlEventSetCreate(self): return "set"
    def nvmlEventSetFree(self, s): pass

    def nvmlDeviceGetSupportedEventTypes(self, h):
        return pynvml.nvmlEventTypeXidCriticalError if self.events_supported else 0

    def nvmlDeviceRegisterEvents(self, h, mask, s): self.registered.append(h)

    def nvmlEventSetWait_v2(self, s, ms):
        if self.events:
            return self.events.pop(0)
        time.sleep(0.01)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)


def _collect(backend: NvmlBackend, until, timeout: float = 2.0) -> list[DeviceEvent]:
    got: list[DeviceEvent] = []
    stop = threading.Event()
    t = threading.Thread(target=backend.watch, args=(stop, got.append))
    t.start()
    deadline = time.monotonic() + timeout
    while not until(got) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(2.0)
    assert not t.is_alive()
    return got


def test_nvml_backend_discovery_and_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    import valve.device_plugin.nvml as nvml_mod

    monkeypatch.setattr(nvml_mod, "numa_from_sysfs", lambda bus: 1 if bus == "00000000:19:00.0" else None)
    fake = FakeNvml(2)
    be = NvmlBackend(nvml=fake)
    gpus = be.discover()
    assert [g.uuid for g in gpus] == fake.uuids
    assert gpus[0].name == "NVIDIA H100 80GB HBM3" and gpus[0].memory_bytes == 80 * 2**30
    assert gpus[0].pci_bus_id == "00000000:18:00.0" and gpus[0].numa_node == 0
    assert gpus[1].numa_node == 1  # NVML says not supported: read from sysfs
    u = be.usage(fake.uuids[0])
    assert u is not None and u.utilization_ratio == pytest.approx(0.42) and u.memory_used_bytes == 3 * 2**30
    be.close()
    assert fake.shutdown


def test_nvml_backend_skips_mig_gpus() -> None:
    fake = FakeNvml(3, mig=(0, 2))
    be = NvmlBackend(nvml=fake)
    assert [g.uuid for g in be.discover()] == [fake.uuids[1]]
    assert be.skipped == {fake.uuids[0]: "mig", fake.uuids[2]: "mig"}
    for error in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_UNKNOWN):  # no MIG; unreadable: not skipped
        no_mig = NvmlBackend(nvml=FakeNvml(2, mig_error=error))
        assert len(no_mig.discover()) == 2 and no_mig.skipped == {}


def test_nvml_backend_reports_xids_and_loss() -> None:
    fake = FakeNvml(2)
    be = NvmlBackend(nvml=fake, loss_poll_s=0.05)
    be.discover()
    fake.events.append(SimpleNamespace(device=1, eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=79))
    fake.lost.add(0)
    got = _collect(be, lambda g: len(g) >= 2)
    assert fake.registered == [0, 1]
    assert DeviceEvent("xid", fake.uuids[1], xid=79) in got
    assert any(e.kind == "lost" and e.uuid == fake.uuids[0] for e in got)
    assert sum(e.kind == "lost" for e in got) == 1  # reported once


def test_nvml_backend_without_event_support_still_watches_loss() -> None:
    fake = FakeNvml(1, events_supported=False)
    be = NvmlBackend(nvml=fake, loss_poll_s=0.05)
    be.discover()
    fake.lost.add(0)
    got = _collect(be, lambda g: len(g) >= 1, timeout=3.0)
    assert fake.registered == [] and [e.kind for e in got] == ["lost"]


def test_sysfs_numa(tmp_path: Path) -> None:
    assert sysfs_pci_address("00000000:3B:00.0") == "0000:3b:00.0"
    dev = tmp_path / "bus/pci/devices/0000:3b:00.0"
    dev.mkdir(parents=True)
    (dev / "numa_node").write_text("1\n")
    assert numa_from_sysfs("00000000:3B:00.0", tmp_path) == 1
    (dev / "numa_node").write_text("-1\n")
    assert numa_from_sysfs("00000000:3B:00.0", tmp_path) is None


def test_metrics_names() -> None:
    m = PluginMetrics()
    m.devices.labels("valve.io/online-gpu").set(4)
    m.healthy.labels("GPU-a", "valve.io/online-gpu").set(1)
    m.allocations.labels("valve.io/online-gpu").inc()
    m.utilization.labels("GPU-a").set(0.5)
    m.memory_used.labels("GPU-a").set(10)
    r = m.registry
    assert r.get_sample_value("valve_devices", {"resource": "valve.io/online-gpu"}) == 4
    assert r.get_sample_value("valve_device_healthy", {"gpu": "GPU-a", "resource": "valve.io/online-gpu"}) == 1
    assert r.get_sample_value("valve_allocations_total", {"resource": "valve.io/online-gpu"}) == 1
    assert r.get_sample_value("valve_gpu_utilization_ratio", {"gpu": "GPU-a"}) == 0.5
    assert r.get_sample_value("valve_gpu_memory_used_bytes", {"gpu": "GPU-a"}) == 10
