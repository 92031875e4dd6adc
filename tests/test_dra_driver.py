"""The DRA driver driven over real gRPC (unix sockets) by a fake kubelet: registration, prepare/unprepare,
per-claim errors, restart from the checkpoint; on a simulated 4-GPU node."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from valve.api.dra import DRIVER, device_name
from valve.device_plugin.backend import SimBackend
from valve.dra.cdi import CDI_KIND, spec_path
from valve.dra.driver import Driver, DriverConfig
from valve.dra.fake_kubelet import FakeDraKubelet, RegistrationRefused
from valve.dra.server import DRA_SOCKET, REGISTRATION_SOCKET, DraPlugin

NODE = "node-a"
NS = "team"


class Claims:
    """ResourceClaims by (namespace, name), counting reads; `error` makes every read fail."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.reads = 0
        self.error: Exception | None = None

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.objects.get((namespace, name))

    def add(self, claim: dict[str, Any]) -> tuple[str, str, str]:
        meta = claim["metadata"]
        self.objects[(meta["namespace"], meta["name"])] = claim
        return meta["namespace"], meta["uid"], meta["name"]


def allocated(name: str, uid: str, device: str, *, pool: str = NODE, requests=("online", "offline"),
              config: Any = None) -> dict[str, Any]:
    """A claim as the scheduler leaves it: each request allocated `device` of `pool`."""
    devices: dict[str, Any] = {"results": [{"request": r, "driver": DRIVER, "pool": pool, "device": device}
                                           for r in requests]}
    if config is not None:
        devices["config"] = [{"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": config}}]
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": NS, "uid": uid},
            "status": {"allocation": {"devices": devices}}}


def make_driver(base: Path, gpus, claims, **kw) -> Driver:
    cfg = DriverConfig(node_name=NODE, cdi_dir=base / "cdi", runtime_root=base / "run", state_dir=base / "state",
                       **kw)
    return Driver(cfg, gpus, claims, device_name)


@pytest.fixture
def node(short_dir: Path) -> Iterator[SimpleNamespace]:
    backend = SimBackend(4, node=NODE)
    gpus = backend.discover()
    claims = Claims()
    env = SimpleNamespace(dir=short_dir, gpus=gpus, claims=claims, plugins=[])

    def start(**kw) -> DraPlugin:
        plugin = DraPlugin(make_driver(short_dir, gpus, claims, **kw), short_dir / "plugin", short_dir / "registry")
        plugin.start()
        env.plugins.append(plugin)
        kubelet = FakeDraKubelet(short_dir / "registry")
        kubelet.register(REGISTRATION_SOCKET)
        env.kubelet = kubelet
        return plugin

    env.start = start
    env.plugin = start()
    yield env
    env.kubelet.close()
    for p in env.plugins:
        p.stop()


def spec_of(env, uid: str) -> dict[str, Any]:
    return json.loads(spec_path(env.dir / "cdi", uid).read_text())


def edits(spec: dict[str, Any], request: str, uid: str) -> dict[str, Any]:
    dev = next(d for d in spec["devices"] if d["name"] == f"{uid}-{request}")
    return {"env": dict(e.split("=", 1) for e in dev["containerEdits"]["env"]),
            "mounts": dev["containerEdits"]["mounts"]}


# ---- registration ------------------------------------------------------------------------------------------


def test_registration_offers_both_dra_versions_and_the_kubelet_picks_v1(node) -> None:
    info = node.kubelet.info
    assert info.type == "DRAPlugin" and info.name == DRIVER
    assert info.endpoint == str(node.dir / "plugin" / DRA_SOCKET)
    assert list(info.supported_versions) == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    assert node.kubelet.version == "v1"
    assert node.plugin.registration.wait_status(5) == (True, "")
    assert stat.S_ISSOCK(os.stat(node.dir / "registry" / f"{DRIVER}-reg.sock").st_mode)


def test_an_older_kubelet_gets_v1beta1_and_one_without_a_common_version_is_refused(node) -> None:
    older = FakeDraKubelet(node.dir / "registry", versions=("v1beta1",))
    assert older.register(REGISTRATION_SOCKET) == "v1beta1"
    with pytest.raises(RegistrationRefused, match="none of the versions"):
        FakeDraKubelet(node.dir / "registry", versions=("v1alpha4",)).register(REGISTRATION_SOCKET)
    ok, error = node.plugin.registration.wait_status(5)
    assert not ok and "v1.DRAPlugin" in error  # the plugin heard why


# ---- prepare / unprepare -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_prepare_gives_each_request_its_role_on_one_gpu_and_is_idempotent(node, version) -> None:
    gpu = node.gpus[2]
    ref = node.claims.add(allocated("chat-gpu", "uid-1", device_name(gpu.uuid)))
    got = node.kubelet.prepare(ref, version=version)
    assert set(got) == {"uid-1"} and got["uid-1"].error == ""
    devices = {tuple(d.request_names): d for d in got["uid-1"].devices}
    assert set(devices) == {("online",), ("offline",)}
    for request, d in devices.items():
        assert (d.pool_name, d.device_name) == (NODE, device_name(gpu.uuid))
        assert list(d.cdi_device_ids) == [f"{CDI_KIND}=uid-1-{request[0]}", f"nvidia.com/gpu={gpu.uuid}"]

    spec = spec_of(node, "uid-1")
    assert spec["kind"] == CDI_KIND and spec["cdiVersion"]
    gpu_dir = str(node.dir / "run" / gpu.uuid)
    for role in ("online", "offline"):
        e = edits(spec, role, "uid-1")
        assert e["env"]["VALVE_ROLE"] == role
        assert e["env"]["VALVE_GPU_UUID"] == e["env"]["CUDA_VISIBLE_DEVICES"] == gpu.uuid
        assert e["env"]["VALVE_RUNTIME_DIR"] == str(node.dir / "run")
        assert "LD_PRELOAD" not in e["env"]  # gate hooks (the default config)
        assert [(m["hostPath"], m["containerPath"]) for m in e["mounts"]] == [(gpu_dir, gpu_dir)]
    assert stat.S_IMODE(os.stat(gpu_dir).st_mode) == 0o700

    # The kubelet asks again (a retry, the pair's second pod): same answer, no second read, spec untouched.
    before = os.stat(spec_path(node.dir / "cdi", "uid-1"))
    again = node.kubelet.prepare(ref, version=version)
    assert again["uid-1"] == got["uid-1"]
    assert node.claims.reads == 1
    assert os.stat(spec_path(node.dir / "cdi", "uid-1")).st_mtime_ns == before.st_mtime_ns

    done = node.kubelet.unprepare(ref, version=version)
    assert set(done) == {"uid-1"} and done["uid-1"].error == ""
    assert not spec_path(node.dir / "cdi", "uid-1").exists()
    assert node.plugin.driver.prepared() == []
    assert node.kubelet.unprepare(ref, version=version)["uid-1"].error == ""  # twice: still fine
    assert os.path.isdir(gpu_dir)  # the GPU's runtime folder outlives the claim (the device plugin's too)


def test_claim_config_asks_for_the_preload_gate_and_carries_the_runtime_settings(node) -> None:
    gpu = node.gpus[0]
    config = {"apiVersion": "valve.io/v1alpha1", "kind": "ColocationConfig", "gate": "preload",
              "runtime": {"idleHysteresisMs": 7, "evictionPolicy": "fifo"}}
    ref = node.claims.add(allocated("batch-gpu", "uid-2", device_name(gpu.uuid), config=config))
    assert node.kubelet.prepare(ref)["uid-2"].error == ""
    spec = spec_of(node, "uid-2")
    offline, online = edits(spec, "offline", "uid-2"), edits(spec, "online", "uid-2")
    lib = node.plugin.driver.cfg.preload_library
    assert offline["env"]["LD_PRELOAD"] == lib and (lib, lib) in [(m["hostPath"], m["containerPath"])
                                                                   for m in offline["mounts"]]
    assert "LD_PRELOAD" not in online["env"]  # the online server is never gated
    runtime = json.loads(online["env"]["VALVE_RUNTIME_SPEC"])
    assert runtime["idle_hysteresis_ms"] == 7 and runtime["eviction_policy"] == "fifo"


def test_each_bad_claim_gets_its_own_clear_error_and_the_good_one_is_prepared(node) -> None:
    dev = device_name(node.gpus[1].uuid)
    good = node.claims.add(allocated("good", "u-good", dev))
    not_allocated = node.claims.add({"metadata": {"name": "pending", "namespace": NS, "uid": "u-pending"}})
    elsewhere = node.claims.add(allocated("elsewhere", "u-else", dev, pool="node-b"))
    unknown_device = node.claims.add(allocated("ghost", "u-ghost", "gpu-00000000-0000-0000-0000-000000000000"))
    bad_request = node.claims.add(allocated("named", "u-named", dev, requests=("gpu",)))
    bad_config = node.claims.add(allocated("conf", "u-conf", dev, config={"apiVersion": "valve.io/v1alpha1",
                                                                         "kind": "ColocationConfig",
                                                                         "gate": "sometimes"}))
    replaced = node.claims.add(allocated("replaced", "u-new", dev))
    got = node.kubelet.prepare(good, not_allocated, elsewhere, unknown_device, bad_request, bad_config,
                               (NS, "u-old", "replaced"), (NS, "u-missing", "missing"), (NS, "", "no-uid"))
    errors = {uid: r.error for uid, r in got.items()}
    assert errors.pop("u-good") == "" and got["u-good"].devices
    assert errors == {
        "u-pending": f"ResourceClaim {NS}/pending (uid u-pending): not allocated",
        "u-else": f"ResourceClaim {NS}/elsewhere (uid u-else): device node-b/{dev} is not on this node "
                  f"({NODE}: {', '.join(sorted(device_name(g.uuid) for g in node.gpus))})",
        "u-ghost": errors["u-ghost"],
        "u-named": f"ResourceClaim {NS}/named (uid u-named): request 'gpu': a {DRIVER} request is named after "
                   "its role, online or offline",
        "u-conf": errors["u-conf"],
        "u-old": f"ResourceClaim {NS}/replaced (uid u-old): the API server has uid {replaced[1]} (the claim was "
                 "replaced)",
        "u-missing": f"ResourceClaim {NS}/missing (uid u-missing): not found",
        "": f"claim namespace='{NS}' name='no-uid' uid='': the kubelet must give namespace, name and uid",
    }
    assert "gpu-00000000" in errors["u-ghost"] and "is not on this node" in errors["u-ghost"]
    assert errors["u-conf"].startswith(f"config for {DRIVER} (valve.io/v1alpha1 ColocationConfig): gate: ")
    assert all("\n" not in e for e in errors.values())
    assert node.plugin.driver.prepared() == ["u-good"]
    assert sorted(p.name for p in (node.dir / "cdi").iterdir()) == [spec_path(node.dir / "cdi", "u-good").name]


def test_an_api_failure_is_the_claims_error_and_a_retry_succeeds(node) -> None:
    from kubernetes.client.exceptions import ApiException

    ref = node.claims.add(allocated("chat-gpu", "uid-3", device_name(node.gpus[0].uuid)))
    node.claims.error = ApiException(status=403, reason="Forbidden")
    err = node.kubelet.prepare(ref)["uid-3"].error
    assert err == f"ResourceClaim {NS}/chat-gpu (uid uid-3): cannot read it from the API server: 403 Forbidden"
    node.claims.error = None
    assert node.kubelet.prepare(ref)["uid-3"].error == ""


# ---- restart -----------------------------------------------------------------------------------------------


def test_a_restarted_driver_recovers_prepared_claims_from_its_checkpoint(node) -> None:
    gpu = node.gpus[3]
    ref = node.claims.add(allocated("chat-gpu", "uid-4", device_name(gpu.uuid)))
    first = node.kubelet.prepare(ref)["uid-4"]
    spec = spec_of(node, "uid-4")
    node.kubelet.close()
    node.plugin.stop()
    assert not (node.dir / "plugin" / DRA_SOCKET).exists()

    # The API is unreachable after the restart, and the CDI folder (a tmpfs) was emptied.
    from kubernetes.client.exceptions import ApiException

    node.claims.error = ApiException(status=503, reason="Service Unavailable")
    spec_path(node.dir / "cdi", "uid-4").unlink()
    reads = node.claims.reads
    plugin = node.start()
    assert plugin.driver.prepared() == ["uid-4"]
    again = node.kubelet.prepare(ref)["uid-4"]
    assert again == first and node.claims.reads == reads  # from the checkpoint: not lost, not redone
    assert spec_of(node, "uid-4") == spec  # the same spec, written again
    assert node.kubelet.unprepare(ref)["uid-4"].error == ""
    assert plugin.driver.prepared() == [] and not spec_path(node.dir / "cdi", "uid-4").exists()


def test_an_unreadable_checkpoint_stops_the_start_instead_of_forgetting_claims(short_dir: Path) -> None:
    (short_dir / "state").mkdir()
    (short_dir / "state" / "checkpoint.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="checkpoint .* is unreadable"):
        make_driver(short_dir, SimBackend(1).discover(), Claims())


# ---- sockets lost while running ----------------------------------------------------------------------------


@pytest.mark.parametrize("lost", [DRA_SOCKET, REGISTRATION_SOCKET])
def test_a_socket_deleted_under_the_running_driver_is_served_again_and_registered_again(short_dir, lost) -> None:
    gpus = SimBackend(2, node=NODE).discover()
    claims = Claims()
    ref = claims.add(allocated("chat-gpu", "uid-5", device_name(gpus[0].uuid)))
    plugin = DraPlugin(make_driver(short_dir, gpus, claims), short_dir / "plugin", short_dir / "registry",
                       watch_interval_s=0.02)
    registration = short_dir / "registry" / REGISTRATION_SOCKET
    path = {DRA_SOCKET: short_dir / "plugin" / DRA_SOCKET, REGISTRATION_SOCKET: registration}[lost]
    kubelet = FakeDraKubelet(short_dir / "registry")
    plugin.start()
    try:
        kubelet.watch(REGISTRATION_SOCKET)  # registers as the kubelet's plugin watcher does, again on a new file
        kubelet.wait_until(lambda: kubelet.registered == plugin.served(registration))
        assert kubelet.prepare(ref)["uid-5"].error == ""
        before = plugin.served(registration)

        path.unlink()  # a node clean-up, or the plugin folder recreated
        # A fresh registration, through the registration socket's new file (the plugin made a new one).
        kubelet.wait_until(lambda: plugin.served(registration) not in (None, before)
                           and kubelet.registered == plugin.served(registration))
        assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert plugin.restarts == 1 and kubelet.registrations >= 2
        assert plugin.metrics.registry.get_sample_value("valve_dra_socket_restarts_total") == 1
        assert plugin.registration.statuses[-1] == (True, "")
        # NodePrepareResources works again, on a fresh connection to the DRA socket (answered from the checkpoint).
        again = kubelet.prepare(ref)
        assert again["uid-5"].error == "" and {d.device_name for d in again["uid-5"].devices} == \
            {device_name(gpus[0].uuid)}
        assert kubelet.unprepare(ref)["uid-5"].error == "" and plugin.driver.prepared() == []
    finally:
        kubelet.close()
        plugin.stop()
    assert not registration.exists() and not (short_dir / "plugin" / DRA_SOCKET).exists()
