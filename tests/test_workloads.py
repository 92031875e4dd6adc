"""The workload examples (examples/vllm-deployment-policy.yaml, examples/kueue-offline-quota.yaml) hold together
with what the operator and its webhook do to them, and plan_policy's rules on their own (pure, no API server).

No cluster and no Kueue here: the Kueue objects are checked against the fields of Kueue's v1beta1 API the example
uses (scripts/chartcheck.py KUEUE_SCHEMAS), and against what Kueue needs of Valve's pods (every requested resource
covered by the ClusterQueue).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import chartcheck as cc
import pytest
import yaml

from valve.api import colocation as c
from valve.api import policy as pol
from valve.api.contract import (
    ANN_COMPLETION_INDEX,
    ANN_GPU,
    ANN_ONLINE_POD,
    ANN_WANT_GPU,
    OFFLINE_RESOURCE,
    ONLINE_RESOURCE,
)
from valve.operator.pods import OperatorConfig, render_policy_offline_pod
from valve.operator.policy import Create, Delete, job_view, offline_template, plan_policy, workload_pod
from valve.operator.webhook import admit, gpu_request

ROOT = Path(__file__).resolve().parent.parent
CFG = OperatorConfig(sidecar_image="valve:t")


def docs(name: str) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d
            for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d}


def as_created(policy: dict, namespace: str = "llm") -> dict:
    return {**policy, "metadata": {**policy["metadata"], "namespace": namespace, "uid": "p-uid"}}


def validate_pod(pod: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_the_vllm_deployment_example_goes_through_the_proxy_and_runs_the_job_by_index():
    objs = docs("vllm-deployment-policy.yaml")
    deployment, service = objs["Deployment/chat"], objs["Service/chat"]
    policy, job = as_created(objs["ColocationPolicy/chat"]), objs["Job/chat-batch"]
    spec = pol.ColocationPolicySpec.model_validate(policy["spec"])

    # A replica as its ReplicaSet creates it: selected, one GPU, gets the proxy the Service targets.
    template = deployment["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "chat-5c7d-x", "namespace": "llm",
                                                          **template["metadata"]}, "spec": template["spec"]}
    assert spec.selector.matches(pod["metadata"]["labels"]) and gpu_request(pod) == 1
    injected, warnings = admit(pod, [policy], CFG)
    assert warnings == [] and injected is not None
    validate_pod(injected)
    proxy = next(ct for ct in injected["spec"]["containers"] if ct["name"] == "valve-proxy")
    assert {"name": "valve-proxy", "containerPort": service["spec"]["ports"][0]["targetPort"]} in proxy["ports"]
    vllm_port = next(a.split("=")[1] for a in template["spec"]["containers"][0]["args"] if a.startswith("--port="))
    assert f"http://127.0.0.1:{vllm_port}" in proxy["args"]

    # The Job: suspended and Indexed; its template, run by index next to the replica's GPU.
    view = job_view(job)
    assert view.suspended and view.completions == 8
    tmpl, completions, problem = offline_template(spec, view)
    assert problem is None and completions == 8
    off = render_policy_offline_pod(policy, spec.offline, spec.runtime, tmpl, node="gpu-1", gpu="GPU-1",
                                    online_uid="u-1", index=3, cfg=CFG)
    off["metadata"]["ownerReferences"][0]["uid"] = "p-uid"
    validate_pod(off)
    batch = off["spec"]["containers"][0]
    assert {"name": "JOB_COMPLETION_INDEX", "value": "3"} in batch["env"]
    assert "--output=/data/out/shard-$(JOB_COMPLETION_INDEX).jsonl" in batch["args"]  # expanded by the kubelet
    assert batch["resources"]["limits"][OFFLINE_RESOURCE] == "1"


def test_the_kueue_example_covers_every_resource_valves_offline_pods_request():
    objs = docs("kueue-offline-quota.yaml")
    cq, lq = objs["ClusterQueue/valve-offline"], objs["LocalQueue/batch"]
    for obj in objs.values():
        if obj["apiVersion"].startswith("kueue.x-k8s.io/"):
            assert cc.validate_kueue(obj) == [], obj["kind"]
    assert lq["spec"]["clusterQueue"] == cq["metadata"]["name"]
    (group,) = cq["spec"]["resourceGroups"]
    flavors = {f["name"]: {r["name"]: r["nominalQuota"] for r in f["resources"]} for f in group["flavors"]}
    assert set(flavors) <= {o["metadata"]["name"] for o in objs.values() if o["kind"] == "ResourceFlavor"}
    assert flavors["valve-harvested"][OFFLINE_RESOURCE] == 16

    policy = as_created(objs["ColocationPolicy/chat-queued"])
    spec = pol.ColocationPolicySpec.model_validate(policy["spec"])
    pod = render_policy_offline_pod(policy, spec.offline, spec.runtime, spec.offline.template, node="n", gpu="G",
                                    online_uid="u", index=0, cfg=CFG)
    validate_pod(pod)
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == lq["metadata"]["name"]
    requested = {name for ct in pod["spec"]["containers"] + pod["spec"]["initContainers"]
                 for kind in ("requests", "limits") for name in (ct.get("resources", {}).get(kind) or {})}
    assert OFFLINE_RESOURCE in requested
    assert requested <= set(group["coveredResources"]), requested - set(group["coveredResources"])


def test_the_kueue_check_fails_on_a_misspelt_field():
    cq = docs("kueue-offline-quota.yaml")["ClusterQueue/valve-offline"]
    bad = {**cq, "spec": {**cq["spec"], "resourceGroup": []}}
    assert any("resourceGroup" in e for e in cc.validate_kueue(bad))
    assert cc.validate_kueue({"apiVersion": "kueue.x-k8s.io/v1beta9", "kind": "ClusterQueue"})


# ---- plan_policy on its own -------------------------------------------------------------------------------------


def _policy(**offline) -> dict:
    offline = offline or {"template": {"spec": {"containers": [{"name": "b", "image": "b:1"}]}}}
    return {"apiVersion": pol.API_VERSION, "kind": pol.KIND,
            "metadata": {"name": "p", "namespace": "ns", "uid": "p-uid", "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": "chat"}}, "offline": offline}}


def _online(name: str, node: str = "n1", gpu: str | None = "G1", injected: bool = True, gpus: int = 1) -> dict:
    containers = [{"name": "vllm", "image": "v", "resources": {"limits": {ONLINE_RESOURCE: str(gpus)}}}]
    if injected:
        containers.append({"name": "valve-proxy", "image": "valve:t"})
    return {"metadata": {"name": name, "uid": f"uid-{name}", "labels": {"app": "chat"},
                         "annotations": {ANN_GPU: gpu} if gpu else {}},
            "spec": {"nodeName": node, "containers": containers}, "status": {"phase": "Running"}}


def _plan(pods: list[dict], **kw):
    return plan_policy(kw.pop("policy", _policy()), [workload_pod(p) for p in pods], cfg=kw.pop("cfg", CFG),
                       now=kw.pop("now", "2026-01-01T00:00:00Z"), **kw)


def _offline(gpu: str, index: int, phase: str = "Running", online: str = "tp", node: str = "n1",
             uid: str | None = None) -> dict:
    """The policy's offline pod as the operator rendered it for (online pod `online`, GPU), then placed."""
    spec = pol.ColocationPolicySpec.model_validate(_policy()["spec"])
    pod = render_policy_offline_pod(_policy(), spec.offline, c.RuntimeSettings(), spec.offline.template, node=node,
                                    gpu=gpu, online_uid=f"uid-{online}", index=index, cfg=CFG)
    pod["metadata"].update(uid=uid or f"off-{gpu}")
    pod["metadata"]["annotations"][ANN_GPU] = gpu
    pod["spec"]["nodeName"] = node
    pod["status"] = {"phase": phase}
    return pod


def test_one_create_per_node_and_none_on_a_busy_node():
    pods = [_online("a", "n1", "G1"), _online("b", "n1", "G2"), _online("c", "n2", "G3")]
    todo = _plan(pods)
    creates = [a for a in todo.actions if isinstance(a, Create)]
    assert sorted(a.node for a in creates) == ["n1", "n2"]  # one pending offline pod per node
    assert sorted(a.pod["metadata"]["name"] for a in creates) == ["p-offline-0", "p-offline-1"]
    assert [a.node for a in _plan(pods, busy_nodes=frozenset({"n1"})).actions] == ["n2"]


def test_an_index_held_by_a_terminating_pod_is_not_reused():
    a, b = _online("a", "n1", "G1"), _online("b", "n2", "G2")
    old = render_policy_offline_pod(_policy(), pol.ColocationPolicySpec.model_validate(_policy()["spec"]).offline,
                                    c.RuntimeSettings(), c.PodTemplate.model_validate(
                                        {"spec": {"containers": [{"name": "b", "image": "b:1"}]}}),
                                    node="n9", gpu="G9", online_uid="uid-gone", index=0, cfg=CFG)
    old["metadata"].update(uid="old", deletionTimestamp="2026-01-01T00:00:00Z")
    todo = _plan([a, b, old])
    names = sorted(x.pod["metadata"]["name"] for x in todo.actions if isinstance(x, Create))
    assert names == ["p-offline-1", "p-offline-2"]  # 0 waits until its pod is gone
    assert not [x for x in todo.actions if isinstance(x, Delete)]  # already terminating


def test_bad_input_creates_nothing_and_warns_once_per_pod():
    pods = [_online("a", injected=False), _online("b", gpus="two"), _online("c", gpu=None)]
    todo = _plan(pods)
    assert todo.actions == []
    reasons = sorted(e.reason for e in todo.events if e.type == "Warning")
    assert reasons == ["NoGPU", "NoGPURequest", "NotInjected"]
    again = _plan(pods, warned=frozenset(todo.warned), policy={**_policy(), "status": todo.status})
    assert again.events == []  # nothing new: no event
    assert todo.status["onlinePods"] == 3 and todo.status["harvestedGPUs"] == 0

    invalid = _policy()
    invalid["spec"]["offline"]["jobRef"] = {"name": "j"}  # both template and jobRef
    refused = _plan([_online("a")], policy=invalid)
    assert refused.actions == []
    cond = next(cd for cd in refused.status["conditions"] if cd["type"] == "OfflineWorkload")
    assert cond["reason"] == "InvalidSpec" and "exactly one of template and jobRef" in cond["message"]


def test_each_gpu_of_a_multi_gpu_replica_is_a_slot_with_its_own_offline_pod():
    # the device plugin has reported one of the two GPUs so far: nothing to harvest yet, nothing to warn about
    partial = _plan([_online("tp", "n1", "G1", gpus=2)])
    assert partial.actions == [] and partial.status["harvestedGPUs"] == 0
    assert not [e for e in partial.events if e.reason not in ("PodsMatched", "TemplateReady", "NoGPU")]

    tp = _online("tp", "n1", "G1,G2", gpus=2)
    first = _plan([tp])
    (create,) = first.actions  # one pending offline pod per node at a time
    assert create.node == "n1" and create.pod["metadata"]["annotations"][ANN_WANT_GPU] == "G1"
    assert first.status["harvestedGPUs"] == 2 and first.status["onlinePods"] == 1
    assert [r["gpuUUID"] for r in first.status["slots"]] == ["G1", "G2"]

    second = _plan([tp, _offline("G1", 0)])
    (create,) = second.actions  # the other GPU, with the next index
    assert create.pod["metadata"]["annotations"][ANN_WANT_GPU] == "G2"
    assert create.pod["metadata"]["annotations"][ANN_COMPLETION_INDEX] == "1"
    both = _plan([tp, _offline("G1", 0), _offline("G2", 1)])
    assert both.actions == [] and both.status["offlineRunning"] == 2
    harvesting = next(cd for cd in both.status["conditions"] if cd["type"] == "Harvesting")
    assert (harvesting["reason"], harvesting["message"]) == ("AllGPUsHarvested", "2 offline pod(s) run on 2 GPU(s)")
    assert [(r["gpuUUID"], r["offlinePod"], r["index"]) for r in both.status["slots"]] == [
        ("G1", "p-offline-0", 0), ("G2", "p-offline-1", 1)]

    # the replica goes (scale down): both its offline pods go with it
    gone = _plan([_offline("G1", 0), _offline("G2", 1)])
    assert sorted((a.name, a.why) for a in gone.actions if isinstance(a, Delete)) == [
        ("p-offline-0", "OnlinePodGone"), ("p-offline-1", "OnlinePodGone")]


def test_completions_bound_the_indexes():
    pods = [_online(n, f"n{i}", f"G{i}") for i, n in enumerate("abc")]
    policy = _policy()
    policy["spec"]["offline"]["completions"] = 2
    policy["status"] = {"completedIndexes": [0]}
    todo = _plan(pods, policy=policy)
    assert [x.pod["metadata"]["name"] for x in todo.actions if isinstance(x, Create)] == ["p-offline-1"]
    policy["status"] = {"completedIndexes": [0, 1]}
    done = _plan(pods, policy=policy)
    assert done.actions == []
    cond = next(cd for cd in done.status["conditions"] if cd["type"] == "Harvesting")
    assert (cond["status"], cond["reason"]) == ("True", "Complete")


T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _at(seconds: float) -> str:
    return (T0 + datetime.timedelta(seconds=seconds)).isoformat()


def _seconds(stamp: str) -> float:
    return (datetime.datetime.fromisoformat(stamp) - T0).total_seconds()


def _row(todo) -> dict:
    (row,) = todo.status["slots"]
    return row


def _harvesting(todo) -> dict:
    return next(cd for cd in todo.status["conditions"] if cd["type"] == "Harvesting")


def test_a_failed_offline_pod_is_recreated_after_a_backoff_that_doubles_to_a_cap_and_resets():
    online = _online("a")
    status: dict = {}

    def plan(pods: list[dict], t: float):
        nonlocal status
        todo = _plan([online, *pods], policy={**_policy(), "status": status}, now=_at(t))
        status = todo.status
        return todo

    def creates(todo) -> list[str]:
        return [x.pod["metadata"]["name"] for x in todo.actions if isinstance(x, Create)]

    assert creates(plan([], 0)) == ["p-offline-0"]
    failed = _offline("G1", 0, "Failed", online="a", uid="off-1")
    first = plan([failed], 5)
    assert [(x.name, x.why) for x in first.actions] == [("p-offline-0", "PodFailed")]
    (told,) = [e for e in first.events if e.reason == "OfflinePodFailed"]
    assert told.type == "Warning" and "the next one in 10 s" in told.message
    assert {k: _row(first).get(k) for k in ("failures", "retryAfter", "failedPodUID")} == {
        "failures": 1, "retryAfter": "2026-01-01T00:00:15.000Z", "failedPodUID": "off-1"}
    assert first.retry_at == T0 + datetime.timedelta(seconds=15)
    assert (_harvesting(first)["reason"], _harvesting(first)["status"]) == ("OfflineBackoff", "False")
    assert "next attempt at 2026-01-01T00:00:15.000Z" in _harvesting(first)["message"]

    again = plan([failed], 6)  # the same failed pod, seen again before its delete shows: not a new failure
    assert not [e for e in again.events if e.reason == "OfflinePodFailed"] and _row(again)["failures"] == 1
    early = plan([], 14.999)  # gone, but its slot still waits
    assert creates(early) == [] and early.retry_at == T0 + datetime.timedelta(seconds=15)
    retried = plan([], 15)
    assert creates(retried) == ["p-offline-0"] and retried.retry_at is None
    assert _row(retried)["failures"] == 1  # the history stays until it expires

    # Each failure in a row doubles the wait, up to 300 s; each is told once.
    waits, t = [], 15.0
    for n in range(2, 9):
        t += 1  # the recreated pod fails a second after it was created
        todo = plan([_offline("G1", 0, "Failed", online="a", uid=f"off-{n}")], t)
        assert _row(todo)["failures"] == n
        assert len([e for e in todo.events if e.reason == "OfflinePodFailed"]) == 1
        waits.append(_seconds(_row(todo)["retryAfter"]) - t)
        t = _seconds(_row(todo)["retryAfter"])
        assert creates(plan([], t - 0.001)) == [] and creates(plan([], t)) == ["p-offline-0"]
    assert waits == [20, 40, 80, 160, 300, 300, 300]

    # The pod created at the last retry runs for longer than 2 x cap: the history goes, the next failure is a first.
    ran = plan([_offline("G1", 0, "Running", online="a", uid="off-ok")], t + 601)
    assert not {"failures", "retryAfter", "failedPodUID"} & set(_row(ran))
    assert _harvesting(ran)["reason"] == "AllGPUsHarvested"
    later = plan([_offline("G1", 0, "Failed", online="a", uid="off-ok")], t + 700)
    assert _row(later)["failures"] == 1 and _seconds(_row(later)["retryAfter"]) == t + 710


def test_a_new_online_replica_is_a_new_slot_without_the_old_ones_backoff_and_the_base_is_configurable():
    cfg = OperatorConfig(sidecar_image="valve:t", offline_backoff_s=(0.25, 1.0))
    failed = _plan([_online("a"), _offline("G1", 0, "Failed", online="a", uid="off-1")], cfg=cfg, now=_at(0))
    assert _row(failed)["retryAfter"] == "2026-01-01T00:00:00.250Z"
    # a rollout: replica b replaces a on the same GPU while a's slot still backs off; b's slot starts clean
    todo = _plan([_online("b")], cfg=cfg, now=_at(0.1), policy={**_policy(), "status": failed.status})
    assert [x.pod["metadata"]["annotations"][ANN_ONLINE_POD] for x in todo.actions if isinstance(x, Create)] \
        == ["uid-b"]
    assert "failures" not in _row(todo) and todo.retry_at is None
    # a history that is not a time (a hand-edited status) is forgotten, not a reconcile that fails forever
    edited = {**failed.status, "slots": [{**_row(failed), "retryAfter": "soon"}]}
    todo = _plan([_online("a")], cfg=cfg, now=_at(0.1), policy={**_policy(), "status": edited})
    assert [x.node for x in todo.actions if isinstance(x, Create)] == ["n1"] and "failures" not in _row(todo)
