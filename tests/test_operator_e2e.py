"""The operator's real kopf handlers, in-process, against a kmock API server (tests/support/operator_harness.py).

Each test starts the emulator and the operator (in a thread), drives a fake scheduler/kubelet/device plugin
(FakeNodes) and waits for the operator's reactions with bounded polling (no timing asserts).
"""

from __future__ import annotations

import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")
pytest_asyncio = pytest.importorskip("pytest_asyncio")

from operator_harness import emulated, operator_requests, pair_body, permission  # noqa: E402

from valve.api import colocation as c  # noqa: E402
from valve.api.contract import ANN_GPU, OFFLINE_RESOURCE, ONLINE_RESOURCE  # noqa: E402
from valve.api.runtime import RuntimeSpec  # noqa: E402
from valve.operator import rbac  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
NS = "default"


@pytest_asyncio.fixture
async def env():
    async with emulated() as e:
        yield e


async def test_valid_pair_creates_two_pods_and_walks_placed_running(env):
    env.add_node("gpu-a", 2)
    await env.start_operator()
    code, body = await env.api.create_pair(pair_body(), NS)
    assert code in (200, 201), body

    online = await env.until(lambda: env.pod("chat-online"), "online pod")
    await env.until_phase("Placed")
    assert await env.pod("chat-offline") is None  # the offline pod follows the online pod's GPU allocation
    gpu = await env.nodes.start(online)
    offline = await env.until(lambda: env.pod("chat-offline"), "offline pod")
    assert await env.phase() == "Placed"
    await env.nodes.start(offline)
    pair = await env.until_phase("Running")

    assert env.status_phases() == ["Placed", "Running"]  # placed at first sight: no Pending write
    status = pair["status"]
    assert status["node"] == "gpu-a" and status["gpuUUID"] == gpu
    assert status["onlinePod"] == "chat-online" and status["offlinePod"] == "chat-offline"
    conds = {cd["type"]: cd for cd in status["conditions"]}
    assert {t: cd["status"] for t, cd in conds.items()} == {
        "Placed": "True", "OnlineReady": "True", "OfflineReady": "True", "Paired": "True", "Ready": "True"}
    assert all(cd["observedGeneration"] == 1 for cd in conds.values())

    pods = {p["metadata"]["name"]: p for p in await env.api.pods(NS)}
    assert sorted(pods) == ["chat-offline", "chat-online"]
    assert sorted(env.pod_creations()) == ["chat-offline", "chat-online"]
    uid = pair["metadata"]["uid"]
    for pod in pods.values():
        (ref,) = pod["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "chat", "uid": uid,
                       "controller": True, "blockOwnerDeletion": True}
        terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["gpu-a"]

    on, off = pods["chat-online"]["spec"], pods["chat-offline"]["spec"]
    assert on["containers"][0]["resources"]["requests"] == {ONLINE_RESOURCE: "1"}
    assert on["containers"][0]["resources"]["limits"] == {ONLINE_RESOURCE: "1"}
    assert off["containers"][0]["resources"]["requests"] == {OFFLINE_RESOURCE: "1"}
    proxy = on["containers"][1]
    assert proxy["name"] == "valve-proxy" and proxy["image"] == "valve:t"
    assert proxy["command"] + proxy["args"] == ["valve", "runtime", "proxy", "--listen", ":9000",
                                                "--upstream", "http://127.0.0.1:8000",
                                                "--gpu-from", "/etc/valve/podinfo/annotations", "--metrics-port", "9400"]
    arbiter = off["containers"][1]
    assert arbiter["command"] + arbiter["args"] == ["valve", "runtime", "arbiter",
                                                    "--gpu-from", "/etc/valve/podinfo/annotations",
                                                    "--metrics-port", "9400"]
    assert {"name": "valve-metrics", "containerPort": 9400} in arbiter["ports"]
    env_vars = {e["name"]: e for e in arbiter["env"]}
    spec = RuntimeSpec.model_validate_json(env_vars["VALVE_RUNTIME_SPEC"]["value"])
    assert spec.idle_hysteresis_ms == 7 and spec.eviction_policy == "fifo" and spec.reserve.min_bytes == 1024
    # from the annotation, resolved at start: after the init container waited for it
    assert env_vars["VALVE_GPU_UUID"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{ANN_GPU}']"
    assert [ct["name"] for ct in off["initContainers"]] == ["valve-gpu-dir"]
    assert {v["name"] for v in off["volumes"]} == {"data", "valve-runtime", "valve-links", "valve-podinfo"}
    podinfo = next(v for v in off["volumes"] if v["name"] == "valve-podinfo")
    assert podinfo["downwardAPI"]["items"] == [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]
    assert {m["name"]: m["mountPath"] for m in arbiter["volumeMounts"]} == {
        "valve-runtime": "/var/run/valve-gpu", "valve-links": "/var/run/valve", "valve-podinfo": "/etc/valve/podinfo"}
    # The GPU annotation, as the device plugin writes it.
    for name, role in (("chat-online", "online"), ("chat-offline", "offline")):
        ann = pods[name]["metadata"]["annotations"]
        assert ann[ANN_GPU] == gpu and ann["valve.io/role"] == role

    assert pods["chat-offline"]["metadata"]["annotations"]["valve.io/want-gpu"] == gpu
    assert "valve.io/want-gpu" not in pods["chat-online"]["metadata"]["annotations"]
    # Events on phase transitions only (first pod creations are told by them): 2 requests.
    async def told():  # the Running event is posted beside the status write, not before it
        return "Running" in [e["reason"] for e in env.events()]
    await env.until(told, "the Running event")
    assert sorted(e["reason"] for e in env.events()) == ["Placed", "Running"]


async def test_deleted_pod_is_recreated_once(env):
    env.add_node("gpu-a", 1)
    await env.start_operator()
    _, offline = await env.run_pair()
    env.nodes.release(offline["metadata"]["uid"])
    assert await env.api.delete(f"{env.pods_path}/chat-offline") == 200

    pod = await env.until(lambda: _recreated(env, offline), "recreated offline pod")
    await env.nodes.start(pod)
    await env.until_phase("Running")
    await env.resyncs()  # a few more resyncs: nothing else is created
    assert env.pod_creations().count("chat-offline") == 2
    assert env.pod_creations().count("chat-online") == 1
    assert len(await env.api.pods(NS)) == 2
    assert "RecreatedPod" in [e["reason"] for e in env.events()]


async def test_operator_restart_midway_creates_nothing_twice(env):
    env.add_node("gpu-a", 1)
    await env.start_operator()
    await env.api.create_pair(pair_body(), NS)
    online = await env.until(lambda: env.pod("chat-online"), "online pod")
    await env.stop_operator()

    await env.nodes.start(online)  # the online pod starts while no operator runs
    await env.start_operator()
    offline = await env.until(lambda: env.pod("chat-offline"), "offline pod after restart")
    await env.nodes.start(offline)
    await env.until_phase("Running")
    await env.stop_operator()
    await env.start_operator()  # and once more once everything runs
    await env.resyncs()
    assert sorted(env.pod_creations()) == ["chat-offline", "chat-online"]
    assert len(await env.api.pods(NS)) == 2
    assert await env.phase() == "Running"


async def test_deleting_the_pair_deletes_its_pods(env):
    env.add_node("gpu-a", 1)
    await env.start_operator()
    await env.run_pair()
    assert await env.api.delete(f"/apis/{c.API_VERSION}/namespaces/{NS}/{c.PLURAL}/chat") == 200
    await env.until(lambda: _none(env.api.pods(NS)), "pods gone")


async def test_a_pod_created_for_a_deleted_pair_is_collected(env):
    """The operator may recreate a pod from a view of its pair older than the pair's deletion (the two watch
    streams are not ordered); the garbage collector removes such a pod, and the emulator does the same."""
    env.add_node("gpu-a", 1)
    await env.start_operator()
    online, _ = await env.run_pair()
    await env.stop_operator()
    assert await env.api.delete(f"/apis/{c.API_VERSION}/namespaces/{NS}/{c.PLURAL}/chat") == 200
    assert await env.api.pods(NS) == []
    late = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "chat-online", "ownerReferences": online["metadata"]["ownerReferences"]},
            "spec": online["spec"]}
    code, _ = await env.api.call("POST", env.pods_path, late)
    assert code in (200, 201)
    assert await env.api.pods(NS) == []


async def _none(coro):
    return not await coro


async def test_api_requests_are_exactly_the_rbac_rules(env):
    """Both directions: every request the operator makes is allowed by RULES, and every rule is used."""
    env.add_node("gpu-a", 1)
    await env.start_operator()
    _, offline = await env.run_pair()
    await env.api.patch(f"{env.pods_path}/chat-offline/status", {"status": {"phase": "Failed"}})  # recreate: delete
    await env.until(lambda: _recreated(env, offline), "offline pod replaced")
    await env.stop_operator()

    used = {p for r in operator_requests(env.kube) if (p := permission(r)) is not None}
    granted = {(g, res, v) for rule in rbac.RULES for g in rule["apiGroups"]
               for res in rule["resources"] for v in rule["verbs"]}
    assert used - granted == set(), "requests not covered by rbac.RULES"
    # the policy-only rules are used by tests/test_operator_policy.py's own check
    assert granted - used == rbac.POLICY_ONLY, "rbac.RULES grants more than the operator uses"


async def _recreated(env, old):
    """The offline pod once it is a new one (another uid than `old`), else None."""
    pod = await env.pod("chat-offline")
    return pod if pod is not None and pod["metadata"]["uid"] != old["metadata"]["uid"] else None
