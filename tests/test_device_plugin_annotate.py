"""The pod annotator: PodResources (a real gRPC server on a unix socket) -> valve.io/gpu-uuid and valve.io/role
on the pods, against a fake pod client, the plugin's Allocate, and kmock (RBAC verbs)."""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner
from waiting import until

from valve.api.contract import ANN_GPU, ANN_ROLE
from valve.device_plugin import rbac
from valve.device_plugin.annotate import (
    Annotator,
    PodDevices,
    PodInfo,
    annotate_by_default,
    annotation_patch,
    pods_with_devices,
)
from valve.device_plugin.api import pb
from valve.device_plugin.backend import SimBackend
from valve.device_plugin.cli import register
from valve.device_plugin.config import PluginConfig
from valve.device_plugin.fake_kubelet import FakeKubelet, FakePodResources
from valve.device_plugin.proto import podresources_pb2 as pr
from valve.device_plugin.server import DevicePlugin

ONLINE, OFFLINE = "valve.io/online-gpu", "valve.io/offline-gpu"
RESOURCES = {ONLINE: "online", OFFLINE: "offline"}




class FakePods:
    """The API server's pods, as the annotator sees them (get/patch), with every call recorded."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], PodInfo] = {}
        self.calls: list[tuple] = []
        self.fail: Exception | None = None

    def add(self, name: str, namespace: str = "default", node: str | None = "n1", uid: str | None = None,
            **annotations: str) -> None:
        self.pods[namespace, name] = PodInfo(uid or f"uid-{name}", node, dict(annotations))

    def get(self, namespace: str, name: str) -> PodInfo | None:
        self.calls.append(("get", namespace, name))
        if self.fail:
            raise self.fail
        pod = self.pods.get((namespace, name))
        return copy.deepcopy(pod) if pod else None

    def patch(self, namespace: str, name: str, body: dict) -> None:
        self.calls.append(("patch", namespace, name, body))
        pod = self.pods[namespace, name]
        if body["metadata"].get("uid", pod.uid) != pod.uid:
            raise RuntimeError("409 Conflict: uid precondition")
        pod.annotations.update(body["metadata"]["annotations"])

    def verbs(self) -> list[str]:
        return [c[0] for c in self.calls]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def kubelet_pods(short_dir: Path) -> Iterator[FakePodResources]:
    pods = FakePodResources(short_dir / "pr.sock").start()
    yield pods
    pods.stop()


def annotator(kubelet_pods: FakePodResources, pods: FakePods, clock=None, **kw) -> Annotator:
    return Annotator(kubelet_pods.socket, RESOURCES, pods, clock=clock or Clock(), **kw)


# Pure parts.

def test_pods_with_devices_keeps_valve_pods_only():
    def dev(resource, *ids):
        return pr.ContainerDevices(resource_name=resource, device_ids=list(ids))
    resp = pr.ListPodResourcesResponse(pod_resources=[
        pr.PodResources(name="on", namespace="a", containers=[pr.ContainerResources(devices=[dev(ONLINE, "G1")])]),
        pr.PodResources(name="nvidia", namespace="a", containers=[pr.ContainerResources(
            devices=[dev("nvidia.com/gpu", "G2")])]),
        pr.PodResources(name="plain", namespace="a", containers=[pr.ContainerResources()]),
        pr.PodResources(name="two", namespace="b", containers=[
            pr.ContainerResources(devices=[dev(OFFLINE, "G3")]),
            pr.ContainerResources(devices=[dev(OFFLINE, "G2"), dev(ONLINE, "G2")])]),
    ])
    assert pods_with_devices(resp, RESOURCES) == [
        PodDevices("a", "on", ("G1",), ("online",)),
        PodDevices("b", "two", ("G2", "G3"), ("online", "offline")),
    ]
    assert PodDevices("b", "two", ("G2", "G3"), ("online", "offline")).annotations() == {
        ANN_GPU: "G2,G3", ANN_ROLE: "online,offline", "valve.io/gpu-uuid-0": "G2", "valve.io/gpu-uuid-1": "G3"}
    # one GPU: the list alone (a single-GPU pod's sidecars mount by it)
    assert PodDevices("a", "on", ("G1",), ("online",)).annotations() == {ANN_GPU: "G1", ANN_ROLE: "online"}


def test_annotation_patch_sets_only_what_differs():
    wanted = {ANN_GPU: "G1", ANN_ROLE: "online"}
    assert annotation_patch(None, wanted, "u1") == {"metadata": {"annotations": wanted, "uid": "u1"}}
    assert annotation_patch({ANN_GPU: "G1", "x": "y"}, wanted) == {"metadata": {"annotations": {ANN_ROLE: "online"}}}
    assert annotation_patch({ANN_GPU: "G0", ANN_ROLE: "online"}, wanted)["metadata"]["annotations"] == {ANN_GPU: "G1"}
    assert annotation_patch({**wanted, "x": "y"}, wanted, "u1") is None


def test_annotate_by_default_follows_the_cluster_env():
    assert annotate_by_default(None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is True
    assert annotate_by_default(None, {}) is False
    assert annotate_by_default(False, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is False
    assert annotate_by_default(True, {}) is True


# The annotator against a real PodResources server and a fake API.

def test_sync_annotates_missing_and_wrong_pods_and_is_idempotent(kubelet_pods):
    kubelet_pods.assigned = [(ONLINE, ["G1"], "ns", "chat-online"), (OFFLINE, ["G1"], "ns", "chat-offline"),
                             ("nvidia.com/gpu", ["X"], "ns", "other")]
    api = FakePods()
    api.add("chat-online", "ns")
    api.add("chat-offline", "ns", **{ANN_GPU: "G9", ANN_ROLE: "offline", "keep": "me"})
    api.add("other", "ns")
    a = annotator(kubelet_pods, api)
    r = a.sync()
    assert sorted(r.pods) == [("ns", "chat-offline"), ("ns", "chat-online")] and not r.errors
    assert sorted(r.patched) == [("ns", "chat-offline"), ("ns", "chat-online")]
    assert api.pods["ns", "chat-online"].annotations == {ANN_GPU: "G1", ANN_ROLE: "online"}
    assert api.pods["ns", "chat-offline"].annotations == {ANN_GPU: "G1", ANN_ROLE: "offline", "keep": "me"}
    assert api.pods["ns", "other"].annotations == {}
    patches = [c[3] for c in api.calls if c[0] == "patch"]
    assert {"metadata": {"annotations": {ANN_GPU: "G1"}, "uid": "uid-chat-offline"}} in patches
    # Next pass: nothing to do, and no API call at all (confirmed pods are cached).
    api.calls.clear()
    assert a.sync().patched == [] and api.calls == []


def test_kick_rechecks_every_pod_and_catches_a_pod_recreated_under_the_same_name(kubelet_pods):
    kubelet_pods.assigned = [(ONLINE, ["G1"], "ns", "chat-online")]
    api, clock = FakePods(), Clock()
    api.add("chat-online", "ns", uid="old")
    a = annotator(kubelet_pods, api, clock, kick_window_s=5.0)
    assert a.sync().patched == [("ns", "chat-online")]
    api.add("chat-online", "ns", uid="new")  # deleted and recreated: same name, no annotations
    assert a.sync().patched == []  # cached: not looked at without a kick
    a.kick()  # its Allocate
    assert a.busy()
    assert a.sync().patched == [("ns", "chat-online")]
    assert api.pods["ns", "chat-online"].annotations[ANN_GPU] == "G1"
    clock.now += 5.0
    assert not a.busy()


def test_recheck_after_a_while_without_kicks(kubelet_pods):
    kubelet_pods.assigned = [(OFFLINE, ["G2"], "ns", "b")]
    api, clock = FakePods(), Clock()
    api.add("b", "ns")
    a = annotator(kubelet_pods, api, clock, recheck_s=60.0)
    a.sync()
    api.pods["ns", "b"].annotations.clear()  # someone removed them
    clock.now += 59
    assert a.sync().patched == []
    clock.now += 2
    assert a.sync().patched == [("ns", "b")]


def test_api_errors_are_reported_and_retried_next_pass(kubelet_pods, caplog):
    kubelet_pods.assigned = [(ONLINE, ["G1"], "ns", "a")]
    api = FakePods()
    api.add("a", "ns")
    api.fail = RuntimeError("403 Forbidden")
    a = annotator(kubelet_pods, api)
    with caplog.at_level("WARNING", logger="valve.device_plugin.annotate"):
        r1 = a.sync()
        r2 = a.sync()
    assert r1.errors == r2.errors == ["could not annotate pod ns/a: RuntimeError: 403 Forbidden"]
    assert caplog.text.count("403 Forbidden") == 1  # logged when it changes, not every pass
    api.fail = None
    assert a.sync().patched == [("ns", "a")]


def test_pod_on_another_node_or_gone_is_left_alone(kubelet_pods):
    kubelet_pods.assigned = [(ONLINE, ["G1"], "ns", "moved"), (OFFLINE, ["G1"], "ns", "gone")]
    api = FakePods()
    api.add("moved", "ns", node="n2")
    a = annotator(kubelet_pods, api, node_name="n1")
    r = a.sync()
    assert r.patched == [] and not r.errors
    assert api.verbs() == ["get", "get"]
    api.add("gone", "ns", node="n1")
    assert a.sync().patched == [("ns", "gone")]  # not cached while missing: retried


def test_pod_resources_down_is_an_error_not_a_crash(short_dir):
    a = Annotator(short_dir / "absent.sock", RESOURCES, FakePods(), clock=Clock())
    r = a.sync()
    assert r.pods == [] and "does not exist" in r.errors[0]
    (short_dir / "dead.sock").touch()  # exists, does not answer
    r = Annotator(short_dir / "dead.sock", RESOURCES, FakePods(), clock=Clock()).sync()
    assert "List" in r.errors[0] and "failed" in r.errors[0]


def test_run_loop_stops_promptly(kubelet_pods):
    api = FakePods()
    a = annotator(kubelet_pods, api, clock=time.monotonic, interval_s=60.0)
    import threading

    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    a.stop()
    t.join(5)
    assert not t.is_alive()


# Wired into the plugin: Allocate kicks the annotator.

def test_plugin_allocate_leads_to_the_pod_annotation(short_dir):
    kubelet = FakeKubelet(short_dir / "dp").start()
    kubelet_pods = FakePodResources(short_dir / "pr.sock").start()
    backend = SimBackend(2)
    api = FakePods()
    config = PluginConfig(device_plugin_dir=short_dir / "dp", runtime_root=short_dir / "run",
                          state_dir=short_dir / "state", pod_resources_socket=kubelet_pods.socket, metrics_port=None,
                          annotate=True, node_name="n1", annotate_interval_s=60.0)
    plugin = DevicePlugin(config, backend, pods=api)
    plugin.start()
    try:
        plugin.wait_registrations(1)
        gpu = backend.uuids[1]
        api.add("chat-offline", "ns")
        kubelet_pods.assigned = [(OFFLINE, [gpu], "ns", "chat-offline")]
        stub, channel = kubelet.stub(OFFLINE)
        with channel:
            stub.Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[gpu])]),
                          timeout=5)
        # the pass follows the Allocate (the periodic one is 60 s away)
        until(lambda: api.pods["ns", "chat-offline"].annotations.get(ANN_GPU) == gpu, f"the annotation ({api.calls})")
        assert api.pods["ns", "chat-offline"].annotations[ANN_ROLE] == "offline"
    finally:
        plugin.stop()
        kubelet_pods.stop()
        kubelet.stop()
    assert plugin.annotator is not None and plugin._threads and not any(t.is_alive() for t in plugin._threads)


def test_plugin_without_annotate_starts_no_annotator(short_dir):
    kubelet = FakeKubelet(short_dir / "dp").start()
    config = PluginConfig(device_plugin_dir=short_dir / "dp", runtime_root=short_dir / "run",
                          state_dir=short_dir / "state", pod_resources_socket=None, metrics_port=None, annotate=True)
    plugin = DevicePlugin(config, SimBackend(1), pods=FakePods())
    plugin.start()
    try:
        assert plugin.annotator is None  # no PodResources: nothing to annotate from
    finally:
        plugin.stop()
        kubelet.stop()


def test_cli_annotate_needs_pod_resources():
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:
        pass

    res = CliRunner().invoke(app, ["device-plugin", "--backend", "sim", "--annotate", "--pod-resources-socket",
                                   "none"])
    assert res.exit_code == 2 and "PodResources" in res.output
    res = CliRunner().invoke(app, ["device-plugin", "--help"], env={"COLUMNS": "200"})
    assert "--annotate" in res.output and "NODE_NAME" in res.output


class Nodes:
    def __init__(self, capacity=None, error: Exception | None = None) -> None:
        self.capacity, self.error, self.read = capacity or {}, error, []

    def node_capacity(self, node: str) -> dict:
        self.read.append(node)
        if self.error is not None:
            raise self.error
        return self.capacity


def test_nvidia_plugin_conflict_only_when_the_node_has_nvidia_gpus(caplog) -> None:
    from valve.device_plugin.coexist import nvidia_plugin_conflict

    assert "nvidia.com/gpu=4" in nvidia_plugin_conflict(Nodes({"nvidia.com/gpu": "4"}), "n1")
    assert nvidia_plugin_conflict(Nodes({"nvidia.com/gpu": "0", "valve.io/online-gpu": "4"}), "n1") is None
    nodes = Nodes({"nvidia.com/gpu": "4"})
    with caplog.at_level("WARNING"):
        assert nvidia_plugin_conflict(nodes, None) is None and nodes.read == []  # no NODE_NAME: cannot tell
        assert nvidia_plugin_conflict(Nodes(error=RuntimeError("403 Forbidden\nbody")), "n1") is None
    assert [r.getMessage() for r in caplog.records][-1].endswith("(403 Forbidden): going on")


# Against an API server (kmock): the requests it makes are exactly what rbac.RULES grants.

def test_annotator_against_kmock_uses_exactly_the_rbac_verbs(kubelet_pods, tmp_path):
    pytest.importorskip("kopf")
    kmock = pytest.importorskip("kmock")
    from operator_harness import Api, ValveKube, permission

    from valve.device_plugin.annotate import PodClient
    from valve.device_plugin.coexist import nvidia_plugin_conflict
    from valve.operator.rbac import allows

    kubeconfig = tmp_path / "kubeconfig"

    async def scenario():
        async with ValveKube() as kube, kmock.Server(kube):
            host = str(kube.url).rstrip("/")
            from valve.operator.kube import load_api_client

            api = Api(load_api_client(host))
            for name in ("p-online", "p-offline"):
                body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns"},
                        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}}
                code, _ = await api.call("POST", "/api/v1/namespaces/ns/pods", body)
                assert code in (200, 201)
            kubelet_pods.assigned = [(ONLINE, ["G1"], "ns", "p-online"), (OFFLINE, ["G1"], "ns", "p-offline"),
                                     (ONLINE, ["G2"], "ns", "not-in-api")]
            a = Annotator(kubelet_pods.socket, RESOURCES, PodClient(host), node_name="n1", clock=Clock())
            r = await asyncio.to_thread(a.sync)
            assert sorted(r.patched) == [("ns", "p-offline"), ("ns", "p-online")] and not r.errors
            pods = {p["metadata"]["name"]: p for p in await api.pods("ns")}
            assert pods["p-online"]["metadata"]["annotations"] == {ANN_GPU: "G1", ANN_ROLE: "online"}
            assert pods["p-offline"]["metadata"]["annotations"] == {ANN_GPU: "G1", ANN_ROLE: "offline"}
            # A pod replaced between get and patch: the uid in the patch makes the API server refuse it.
            client = PodClient(host)
            stale = await asyncio.to_thread(client.get, "ns", "p-online")
            from kubernetes.client.exceptions import ApiException

            with pytest.raises(ApiException, match="409|Conflict"):
                await asyncio.to_thread(client.patch, "ns", "p-online",
                                        annotation_patch({}, {ANN_GPU: "G7"}, "some-other-uid"))
            assert stale is not None and stale.node == "n1"
            listed = await asyncio.to_thread(client.list_node, "n1")
            assert sorted(p["metadata"]["name"] for p in listed) == ["p-offline", "p-online"]
            # Its own Node, read once at start: NVIDIA's plugin already serving it is a refusal.
            for node, capacity in (("n1", {"nvidia.com/gpu": "8", "cpu": "64"}), ("n2", {"cpu": "64"})):
                code, _ = await api.call("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                                    "metadata": {"name": node},
                                                                    "status": {"capacity": capacity}})
                assert code in (200, 201)
            refused = await asyncio.to_thread(nvidia_plugin_conflict, client, "n1")
            assert refused and refused.startswith("Node n1 already advertises nvidia.com/gpu=8: ")
            assert await asyncio.to_thread(nvidia_plugin_conflict, client, "n2") is None
            kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "k",
                "clusters": [{"name": "k", "cluster": {"server": host}}], "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "k", "context": {"cluster": "k", "user": "u"}}]}))
            proc = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "valve.device_plugin", "--backend", "sim", "--node-name", "n1",
                "--device-plugin-dir", str(kubeconfig.parent / "dp"), "--pod-resources-socket", "none",
                "--metrics-port", "0"], capture_output=True, text=True, timeout=60,
                env={**os.environ, "KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": "in-a-cluster",
                     "KUBERNETES_SERVICE_PORT": "443"})
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr
            assert lines[0].startswith("valve device-plugin: Node n1 already advertises nvidia.com/gpu=8: ")
            assert "--allow-nvidia-plugin" in lines[0] and not (kubeconfig.parent / "dp").exists()
            mine = [req for req in kube._requests if req.headers.get("User-Agent", "").startswith("valve-device-plugin/")]
            return {permission(req) for req in mine} - {None}

    used = asyncio.run(scenario())
    granted = {("", res, verb) for rule in rbac.RULES for res in rule["resources"] for verb in rule["verbs"]}
    assert used == granted
    assert all(allows(rbac.RULES, *p) for p in used)
