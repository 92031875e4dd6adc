"""ColocationPolicy against kmock: the operator's real kopf handlers follow a Deployment-like set of online pods.

The online pods are what a ReplicaSet would create, admitted through the webhook's own decision (`webhook.admit`,
kmock has no admission chain); FakeNodes binds and starts them with the device plugin's rule, as it does for
pairs. Every wait is a bounded poll on a condition.
"""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")
pytest_asyncio = pytest.importorskip("pytest_asyncio")

from operator_harness import emulated, operator_requests, permission  # noqa: E402

from valve.api import policy as pol  # noqa: E402
from valve.api.contract import (  # noqa: E402
    ANN_COMPLETION_INDEX,
    ANN_ONLINE_POD,
    ANN_WANT_GPU,
    OFFLINE,
    OFFLINE_RESOURCE,
    ONLINE,
    ONLINE_RESOURCE,
)
from valve.operator import rbac  # noqa: E402
from valve.operator.pods import OperatorConfig  # noqa: E402
from valve.operator.webhook import admit  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]
NS = "default"
POLICIES = f"/apis/{pol.API_VERSION}/namespaces/{NS}/{pol.PLURAL}"
CFG = OperatorConfig(sidecar_image="valve:t")
_names = itertools.count()


@pytest_asyncio.fixture
async def env():
    async with emulated() as e:
        yield e


def policy_body(name: str = "chat", **offline) -> dict:
    offline = offline or {"template": {"metadata": {"labels": {"app": "batch"}},
                                       "spec": {"containers": [{"name": "batch", "image": "batch:1"}],
                                                "restartPolicy": "OnFailure"}}}
    return {"apiVersion": pol.API_VERSION, "kind": pol.KIND, "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": "chat"}}, "offline": offline,
                     "runtime": {"idleHysteresisMs": 7}}}


def replica(gpus: int | None = 1, labels: dict | None = None) -> dict:
    """A pod as a ReplicaSet of `chat` creates it (generateName, its labels, an online-gpu request)."""
    res = {"limits": {ONLINE_RESOURCE: str(gpus)}} if gpus else {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"chat-7d9f-{next(_names)}", "namespace": NS,
                         "labels": labels or {"app": "chat", "pod-template-hash": "7d9f"}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm:1", "resources": res,
                                     "ports": [{"containerPort": 8000}]}]}}


async def create_policy(env, body: dict) -> None:
    code, resp = await env.api.call("POST", POLICIES, body)
    assert code in (200, 201), resp


async def get_policy(env, name: str = "chat") -> dict:
    return (await env.api.call("GET", f"{POLICIES}/{name}"))[1]


async def add_replica(env, node: str, webhook: bool = True, **kw) -> tuple[dict, str | None]:
    """Create one online pod (through the webhook's decision unless `webhook` is False), start it on `node`."""
    pod = replica(**kw)
    if webhook:
        code, body = await env.api.call("GET", POLICIES)
        pod = admit(pod, body["items"], CFG)[0] or pod
    code, created = await env.api.call("POST", env.pods_path, pod)
    assert code in (200, 201), created
    gpu = await env.nodes.start(created, node=node, role=ONLINE) if kw.get("gpus", 1) else None
    return created, gpu


async def remove(env, pod: dict) -> None:
    env.nodes.release(pod["metadata"]["uid"])
    assert await env.api.delete(f"{env.pods_path}/{pod['metadata']['name']}") == 200


async def offline_pods(env) -> dict[str, dict]:
    """The policy's offline pods, by the uid of the online pod each serves."""
    return {p["metadata"]["annotations"][ANN_ONLINE_POD]: p for p in await env.api.pods(NS, "valve.io/policy=chat")
            if p["metadata"]["labels"].get("valve.io/role") == OFFLINE
            and p["metadata"]["labels"].get("valve.io/policy") == "chat"}


async def follow(env, online: list[dict]) -> dict[str, dict]:
    """Start offline pods as the operator creates them (one per node at a time) until each online pod has one."""
    return await start_until(env, offline_pods, {p["metadata"]["uid"] for p in online})


async def start_until(env, collect, want: set) -> dict:
    """Start the offline pods `collect` returns as the operator creates them until their keys are `want`, all
    running."""
    async def step():
        pods = await collect(env)
        for pod in pods.values():
            if pod["status"].get("phase") == "Pending" and pod["metadata"]["uid"] not in env.nodes.placed:
                await env.nodes.start(pod)
        return pods if set(pods) == want and all(p["status"].get("phase") == "Running" for p in pods.values()) \
            else None
    return await env.until(step, f"offline pods for {len(want)} slot(s)")


async def status_is(env, **fields) -> dict:
    async def check():
        status = (await get_policy(env)).get("status") or {}
        return status if all(status.get(k) == v for k, v in fields.items()) else None
    return await env.until(check, f"policy status {fields}")


def indexes(pods: dict[str, dict]) -> list[int]:
    return sorted(int(p["metadata"]["annotations"][ANN_COMPLETION_INDEX]) for p in pods.values())


async def two_harvested(env) -> tuple[tuple[dict, str | None], tuple[dict, str | None], dict[str, dict]]:
    """The operator with the policy `chat`, one replica on each of two nodes and their offline pods running."""
    env.add_node("gpu-a", 4)
    env.add_node("gpu-b", 2)
    await env.start_operator(cfg=CFG)
    await create_policy(env, policy_body())
    a = await add_replica(env, "gpu-a")
    b = await add_replica(env, "gpu-b")
    return a, b, await follow(env, [a[0], b[0]])


async def test_offline_pods_follow_the_online_replicas_through_scale_up_down_and_rollout(env):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    (a, gpu_a), (b, gpu_b), pods = await two_harvested(env)
    status = await status_is(env, onlinePods=2, harvestedGPUs=2, offlineRunning=2)
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Matched": "True", "OfflineWorkload": "True", "Harvesting": "True", "Ready": "True"}
    assert indexes(pods) == [0, 1]
    for online, gpu, node in ((a, gpu_a, "gpu-a"), (b, gpu_b, "gpu-b")):
        off = pods[online["metadata"]["uid"]]
        assert off["metadata"]["annotations"][ANN_WANT_GPU] == gpu
        assert off["metadata"]["annotations"]["valve.io/gpu-uuid"] == gpu  # the plugin put it on that GPU
        assert off["spec"]["nodeName"] == node
        assert off["spec"]["containers"][0]["resources"]["limits"] == {OFFLINE_RESOURCE: "1"}
        assert [ct["name"] for ct in off["spec"]["containers"]] == ["batch", "valve-arbiter"]
        env_of = {e["name"]: e.get("value") for e in off["spec"]["containers"][0]["env"]}
        assert env_of["JOB_COMPLETION_INDEX"] == off["metadata"]["annotations"][ANN_COMPLETION_INDEX]
        (ref,) = off["metadata"]["ownerReferences"]
        assert ref["kind"] == pol.KIND and ref["name"] == "chat" and ref["controller"] is True
        stored = {k: v for k, v in off.items() if k != "status"}
        stored["metadata"] = {k: v for k, v in off["metadata"].items()
                              if k in ("name", "namespace", "labels", "annotations", "ownerReferences")}
        kubernetes_validate.validate(stored, kubernetes_validate.latest_version(), strict=True)
    # the online pods kept their own spec, plus the proxy
    assert [ct["name"] for ct in a["spec"]["containers"]] == ["vllm", "valve-proxy"]

    # Scale up: a third replica gets the next index.
    c, _ = await add_replica(env, "gpu-a")
    pods = await follow(env, [a, b, c])
    assert indexes(pods) == [0, 1, 2]
    await status_is(env, onlinePods=3, harvestedGPUs=3, offlineRunning=3)

    # Scale down: the replica's offline pod goes with it.
    gone = pods[b["metadata"]["uid"]]
    await remove(env, b)
    pods = await env.until(lambda: _exactly(env, {a["metadata"]["uid"], c["metadata"]["uid"]}), "offline pod removed")
    assert gone["metadata"]["name"] not in {p["metadata"]["name"] for p in pods.values()}
    env.nodes.release(gone["metadata"]["uid"])
    await status_is(env, onlinePods=2, harvestedGPUs=2, offlineRunning=2)

    # Rollout: a new replica replaces a; a's offline pod is deleted, the new one takes a free index (0 or 1).
    env.nodes.release(pods[a["metadata"]["uid"]]["metadata"]["uid"])
    await remove(env, a)
    d, _ = await add_replica(env, "gpu-b")
    pods = await follow(env, [c, d])
    assert int(pods[d["metadata"]["uid"]]["metadata"]["annotations"][ANN_COMPLETION_INDEX]) in (0, 1)
    assert len(set(indexes(pods))) == 2
    await status_is(env, onlinePods=2, harvestedGPUs=2, offlineRunning=2)

    # One offline pod per online pod that held a GPU, each created once; two deleted with their online pods.
    assert len(env.pod_creations()) == 4, env.pod_creations()
    await env.resyncs()
    assert len(env.pod_creations()) == 4

    async def told():
        reasons = [e["reason"] for e in env.events() if e["involvedObject"]["kind"] == pol.KIND]
        return reasons if reasons.count("DeletingOfflinePod") == 2 else None
    reasons = await env.until(told, "two DeletingOfflinePod events")
    assert reasons.count("CreatedOfflinePod") == 4


async def offline_by_gpu(env) -> dict[tuple[str, str], dict]:
    """The policy's offline pods, by (uid of the online pod it serves, the GPU it wishes)."""
    return {(p["metadata"]["annotations"][ANN_ONLINE_POD], p["metadata"]["annotations"][ANN_WANT_GPU]): p
            for p in await env.api.pods(NS, "valve.io/policy=chat")
            if p["metadata"]["labels"].get("valve.io/role") == OFFLINE}


async def follow_gpus(env, online: list[tuple[dict, str]]) -> dict[tuple[str, str], dict]:
    """Start offline pods as the operator creates them until every GPU of every online pod runs one."""
    return await start_until(env, offline_by_gpu, {(p["metadata"]["uid"], g) for p, gpus in online
                                                   for g in gpus.split(",")})


async def test_a_replica_on_two_gpus_gets_an_offline_pod_on_each_and_scaling_down_removes_both(env):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    env.add_node("gpu-a", 4)
    env.add_node("gpu-b", 2)
    await env.start_operator(cfg=CFG)
    await create_policy(env, policy_body())
    a = await add_replica(env, "gpu-a", gpus=2)
    b = await add_replica(env, "gpu-b", gpus=2)
    for created, gpus in (a, b):
        online = await env.pod(created["metadata"]["name"])  # as the device plugin annotated it
        assert len(gpus.split(",")) == 2 and online["metadata"]["annotations"]["valve.io/gpu-uuid"] == gpus
        assert [online["metadata"]["annotations"][f"valve.io/gpu-uuid-{i}"] for i in (0, 1)] == gpus.split(",")
        assert [ct["name"] for ct in online["spec"]["containers"]] == ["vllm", "valve-proxy"]
        assert online["spec"]["initContainers"][0]["args"][-2:] == ["--gpus", "2"]
    pods = await follow_gpus(env, [a, b])
    status = await status_is(env, onlinePods=2, harvestedGPUs=4, offlinePods=4, offlineRunning=4)
    assert sorted((r["onlinePod"], r["gpuUUID"], r["node"]) for r in status["slots"]) == sorted(
        (o["metadata"]["name"], g, node) for (o, gpus), node in ((a, "gpu-a"), (b, "gpu-b")) for g in gpus.split(","))
    assert indexes(pods) == [0, 1, 2, 3]
    for (uid, gpu), off in pods.items():
        node = "gpu-a" if uid == a[0]["metadata"]["uid"] else "gpu-b"
        assert off["spec"]["nodeName"] == node and off["metadata"]["annotations"]["valve.io/gpu-uuid"] == gpu
        assert off["spec"]["containers"][0]["resources"]["limits"] == {OFFLINE_RESOURCE: "1"}
        stored = {k: v for k, v in off.items() if k != "status"}
        stored["metadata"] = {k: v for k, v in off["metadata"].items()
                              if k in ("name", "namespace", "labels", "annotations", "ownerReferences")}
        kubernetes_validate.validate(stored, kubernetes_validate.latest_version(), strict=True)
    for online, _ in (a, b):  # the online pods as admitted, validated too
        stored = {k: v for k, v in online.items() if k != "status"}
        stored["metadata"] = {k: v for k, v in online["metadata"].items()
                              if k in ("name", "namespace", "labels", "annotations")}
        kubernetes_validate.validate(stored, kubernetes_validate.latest_version(), strict=True)

    # Scale down: replica b goes, both its offline pods go with it; a's two stay.
    for (uid, _), off in pods.items():
        if uid == b[0]["metadata"]["uid"]:
            env.nodes.release(off["metadata"]["uid"])
    await remove(env, b[0])
    keep = {k for k in pods if k[0] == a[0]["metadata"]["uid"]}

    async def only_a():
        now = await offline_by_gpu(env)
        return now if set(now) == keep else None
    await env.until(only_a, "b's two offline pods removed")
    await status_is(env, onlinePods=1, harvestedGPUs=2, offlineRunning=2)
    assert len(env.pod_creations()) == 4
    await env.resyncs()
    assert len(env.pod_creations()) == 4  # each created once


async def _exactly(env, uids: set[str]):
    pods = await offline_pods(env)
    return pods if set(pods) == uids else None


async def _events(env, *reasons: str):
    got = [e["reason"] for e in env.events() if e["involvedObject"]["kind"] == pol.KIND]
    return got if all(r in got for r in reasons) else None


async def test_bad_input_says_why_and_creates_nothing(env):
    env.add_node("gpu-a", 2)
    await env.start_operator(cfg=CFG)
    await create_policy(env, policy_body())
    status = await status_is(env, onlinePods=0)
    matched = next(c for c in status["conditions"] if c["type"] == "Matched")
    assert (matched["status"], matched["reason"]) == ("False", "NoPodsMatched")
    await env.until(lambda: _events(env, "NoPodsMatched"), "a NoPodsMatched event")

    # a selected pod without a GPU request, and one created while the webhook was down (no proxy)
    await add_replica(env, "gpu-a", gpus=None)
    bare, _ = await add_replica(env, "gpu-a", webhook=False)
    assert [ct["name"] for ct in bare["spec"]["containers"]] == ["vllm"]
    await env.until(lambda: _events(env, "NoGPURequest", "NotInjected"), "the per-pod warnings")
    status = await status_is(env, onlinePods=2, harvestedGPUs=0)
    harvesting = next(c for c in status["conditions"] if c["type"] == "Harvesting")
    assert (harvesting["status"], harvesting["reason"]) == ("False", "NoGPU")
    await env.resyncs()
    assert env.pod_creations() == []
    warnings = [e for e in env.events() if e["reason"] in ("NoGPURequest", "NotInjected")]
    assert len(warnings) == 2 and all(e["type"] == "Warning" for e in warnings)  # once per pod, not per pass


def job_body(name: str = "batch", suspend: bool = True, completions: int = 2) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NS},
            "spec": {"suspend": suspend, "completionMode": "Indexed", "completions": completions,
                     "parallelism": completions,
                     "template": {"metadata": {"labels": {"app": "batch", "job-name": name,
                                                          "batch.kubernetes.io/controller-uid": "u-1"}},
                                  "spec": {"containers": [{"name": "runner", "image": "runner:1"}],
                                           "restartPolicy": "Never"}}}}


async def test_a_job_as_offline_workload_missing_unsuspended_then_run_by_index(env):
    env.add_node("gpu-a", 4)
    await env.start_operator(cfg=CFG)
    await create_policy(env, policy_body(jobRef={"name": "batch"}))
    a, _ = await add_replica(env, "gpu-a")
    b, _ = await add_replica(env, "gpu-a")
    c, _ = await add_replica(env, "gpu-a")
    status = await status_is(env, harvestedGPUs=3)
    workload = next(cd for cd in status["conditions"] if cd["type"] == "OfflineWorkload")
    assert (workload["status"], workload["reason"]) == ("False", "JobNotFound")

    jobs = f"/apis/batch/v1/namespaces/{NS}/jobs"
    assert (await env.api.call("POST", jobs, job_body(suspend=False)))[0] in (200, 201)

    async def reason():
        status = (await get_policy(env)).get("status") or {}
        return next((cd["reason"] for cd in status.get("conditions", []) if cd["type"] == "OfflineWorkload"
                     and cd["reason"] == "JobNotSuspended"), None)
    await env.until(reason, "JobNotSuspended")
    assert env.pod_creations() == []

    assert await env.api.patch(f"{jobs}/batch", {"spec": {"suspend": True}}) == 200
    # Indexed Job with 2 completions on 3 GPUs: indexes 0 and 1 only (started as they come: one pending per node).
    pods = await env.until(lambda: _count(env, 2, start=True), "two offline pods")
    await env.resyncs()
    assert len(await offline_pods(env)) == 2
    for pod in pods.values():
        labels = pod["metadata"]["labels"]
        assert "job-name" not in labels and "batch.kubernetes.io/controller-uid" not in labels  # not the Job's
        assert pod["spec"]["containers"][0]["name"] == "runner"
    assert indexes(pods) == [0, 1]

    # Index 0 succeeds: recorded, never run again, even once its online pod is gone.
    first = next(p for p in pods.values() if p["metadata"]["annotations"][ANN_COMPLETION_INDEX] == "0")
    path = f"{env.pods_path}/{first['metadata']['name']}/status"
    assert await env.api.patch(path, {"status": {"phase": "Succeeded"}}) == 200
    await status_is(env, completedIndexes=[0])
    online = next(p for p in (a, b, c) if p["metadata"]["uid"] == first["metadata"]["annotations"][ANN_ONLINE_POD])
    await remove(env, online)
    await env.until(lambda: _gone(env, first["metadata"]["name"]), "the succeeded pod removed with its online pod")
    await env.resyncs()
    assert "0" not in [p["metadata"]["annotations"][ANN_COMPLETION_INDEX] for p in (await offline_pods(env)).values()]
    assert (await get_policy(env))["status"]["completedIndexes"] == [0]


async def _count(env, n: int, start: bool = False):
    pods = await offline_pods(env)
    for pod in pods.values() if start else ():
        if pod["metadata"]["uid"] not in env.nodes.placed:
            await env.nodes.start(pod)
    return pods if len(pods) == n else None


async def _gone(env, name: str):
    return await env.pod(name) is None


async def test_api_requests_of_pairs_and_policies_are_exactly_the_rbac_rules(env):
    env.add_node("gpu-a", 4)
    await env.start_operator(cfg=CFG)
    await env.run_pair("duo")
    jobs = f"/apis/batch/v1/namespaces/{NS}/jobs"
    assert (await env.api.call("POST", jobs, job_body()))[0] in (200, 201)
    await create_policy(env, policy_body(jobRef={"name": "batch"}))
    await add_replica(env, "gpu-a")
    await env.until(lambda: _count(env, 1, start=True), "the policy's offline pod")
    old = await env.pod("duo-offline")
    await env.api.patch(f"{env.pods_path}/duo-offline/status", {"status": {"phase": "Failed"}})  # delete, recreate

    async def recreated():
        pod = await env.pod("duo-offline")
        return pod is not None and pod["metadata"]["uid"] != old["metadata"]["uid"]
    await env.until(recreated, "the pair's offline pod recreated (a get of the pair first)")
    await env.until(lambda: _events(env, "CreatedOfflinePod"), "the policy's event")
    await env.stop_operator()

    used = {p for r in operator_requests(env.kube) if (p := permission(r)) is not None}
    granted = {(g, res, v) for rule in rbac.RULES for g in rule["apiGroups"]
               for res in rule["resources"] for v in rule["verbs"]}
    assert used - granted == set(), "requests not covered by rbac.RULES"
    assert granted - used == set(), "rbac.RULES grants more than the operator uses"


async def test_a_refused_offline_pod_says_why_and_is_tried_again_on_resync(env):
    env.add_node("gpu-a", 2)
    await env.start_operator(cfg=CFG)
    env.kube.refuse["chat-offline-0"] = (403, 'pods "chat-offline-0" is forbidden: violates PodSecurity "restricted"')
    await create_policy(env, policy_body())
    await add_replica(env, "gpu-a")

    async def refused():
        status = (await get_policy(env)).get("status") or {}
        cond = next((cd for cd in status.get("conditions", []) if cd["type"] == "OfflineWorkload"), {})
        return cond if cond.get("reason") == "PodCreateFailed" else None
    cond = await env.until(refused, "OfflineWorkload=False/PodCreateFailed")
    assert cond["status"] == "False" and "PodSecurity" in cond["message"]
    await env.until(lambda: _events(env, "PodCreateFailed"), "a PodCreateFailed event")
    assert await offline_pods(env) == {}

    del env.kube.refuse["chat-offline-0"]  # e.g. the namespace's PodSecurity label changed
    await env.until(lambda: _count(env, 1), "the offline pod, created on a resync")
    await status_is(env, offlinePods=1)


def policy_series(name: str = "chat") -> dict[str, float | None]:
    """The operator's per-policy series for `name` in NS, as its registry exports them (None: no such series)."""
    from prometheus_client import REGISTRY

    from valve.operator.metrics import POD_PHASES

    labels = {"namespace": NS, "policy": name}
    got = {m: REGISTRY.get_sample_value(f"valve_policy_{m}", labels) for m in ("online_pods", "harvested_gpus")}
    got.update({p: REGISTRY.get_sample_value("valve_policy_offline_pods", {**labels, "phase": p}) for p in POD_PHASES})
    return got


async def test_policy_metrics_are_its_status_counts_and_go_with_the_policy(env):
    await two_harvested(env)
    await add_replica(env, "gpu-a", gpus=None)  # selected, holds no GPU: counted online, not harvested
    await add_replica(env, "gpu-b")  # its offline pod is created and left Pending (nothing starts it)
    status = await status_is(env, onlinePods=4, harvestedGPUs=3, offlinePods=3, offlineRunning=2)

    def expect(status: dict) -> dict[str, float]:
        pending = status["offlinePods"] - status["offlineRunning"]
        return {"online_pods": status["onlinePods"], "harvested_gpus": status["harvestedGPUs"],
                "Running": status["offlineRunning"], "Pending": pending, "Succeeded": 0, "Failed": 0, "Unknown": 0}

    async def metrics_match(want: dict[str, float]):
        got = policy_series()
        return got if got == want else None
    assert (await env.until(lambda: metrics_match(expect(status)), "the policy's series = its status")) == {
        "online_pods": 4, "harvested_gpus": 3, "Running": 2, "Pending": 1, "Succeeded": 0, "Failed": 0, "Unknown": 0}

    # One offline pod succeeds: its phase moves, the status and the series together.
    done = next(p for p in (await offline_pods(env)).values() if p["status"].get("phase") == "Running")
    assert await env.api.patch(f"{env.pods_path}/{done['metadata']['name']}/status",
                               {"status": {"phase": "Succeeded"}}) == 200
    await status_is(env, offlineRunning=1)
    await env.until(lambda: metrics_match({**expect(status), "Running": 1, "Succeeded": 1}), "Succeeded counted")

    assert await env.api.delete(f"{POLICIES}/chat") == 200

    async def removed():
        return all(v is None for v in policy_series().values())
    await env.until(removed, "the deleted policy's series removed")


async def test_an_offline_pod_that_keeps_failing_is_recreated_after_a_growing_backoff(env):
    """Base 0.3 s doubling to 0.6 s (the defaults are 10 s to 5 min); resyncs every 60 s, so only the backoff's own
    timer can bring the next pod within the waits' 20 s bound."""
    loop = asyncio.get_running_loop()
    env.add_node("gpu-a", 2)
    await env.start_operator(cfg=OperatorConfig(sidecar_image="valve:t", offline_backoff_s=(0.3, 0.6)),
                             resync_seconds=60)
    await create_policy(env, policy_body())
    online, _ = await add_replica(env, "gpu-a")
    uid = online["metadata"]["uid"]
    pod = (await follow(env, [online]))[uid]
    for n, wait in enumerate((0.3, 0.6, 0.6), start=1):
        env.nodes.release(pod["metadata"]["uid"])  # the kubelet frees a failed pod's devices
        failed_at = loop.time()
        assert await env.api.patch(f"{env.pods_path}/{pod['metadata']['name']}/status",
                                   {"status": {"phase": "Failed"}}) == 200

        async def recreated(old: str = pod["metadata"]["uid"]):
            now = (await offline_pods(env)).get(uid)
            return now if now is not None and now["metadata"]["uid"] != old else None
        new = await env.until(recreated, f"the offline pod recreated after failure {n}", timeout=20)
        assert loop.time() - failed_at >= wait - 0.02, f"recreated before its {wait} s backoff (failure {n})"

        async def counted(n: int = n, name: str = new["metadata"]["name"]):
            rows = (await get_policy(env))["status"]["slots"]
            return rows if [(r.get("failures"), r.get("offlinePod")) for r in rows] == [(n, name)] else None
        await env.until(counted, f"the slot's row: {n} failure(s), the new pod")
        await env.nodes.start(new)
        pod = new
    await status_is(env, offlineRunning=1)
    failures = [e for e in env.events() if e["reason"] == "OfflinePodFailed"]
    assert len(failures) == 3 and all(e["type"] == "Warning" for e in failures)  # one per failure
    assert sorted(re.search(r"\((\d+) in a row", e["message"]).group(1) for e in failures) == ["1", "2", "3"]
    assert await _events(env, "OfflineBackoff")  # the Harvesting condition said so while the slot waited
    assert len(env.pod_creations()) == 4
